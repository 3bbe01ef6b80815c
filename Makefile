# templatecenter — set-up, demo and tests on a fresh Debian 12 machine (run as root or with sudo for apt-get).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# docker-registry, apache2-utils (htpasswd) and debootstrap serve the image tests (issue 4).
DEB_PACKAGES := python3-venv postgresql systemd e2fsprogs iproute2 procps docker-registry apache2-utils debootstrap busybox-static \
                qemu-system-x86 qemu-utils cpio
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: deps guest-kernel demo demo-stop test test-fast bench clean

# The sandbox guest kernel (RT-5): the Debian cloud kernel's vmlinuz plus the virtio modules the
# agent's initramfs loads, unpacked into a cache dir without installing the package on the host.
# The agent finds it through runtime.guest_kernel (runtime.guest_modules defaults to the
# lib/modules/<release> next to it); tests/integration fixtures pass the same path.
GUEST_CACHE ?= $(HOME)/.cache/templatecenter/guest
GUEST_STAMP := $(GUEST_CACHE)/.fetched

deps: $(VENV)/.installed $(GUEST_STAMP)

guest-kernel: $(GUEST_STAMP)

$(GUEST_STAMP):
	@set -e; pkg=$$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[0-9].*-cloud-amd64\).*/\1/p' | head -1); \
	if [ -z "$$pkg" ]; then $(SUDO) apt-get update -qq; \
	  pkg=$$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/.*Depends: \(linux-image-[0-9].*-cloud-amd64\).*/\1/p' | head -1); fi; \
	test -n "$$pkg" || { echo "cannot resolve the cloud kernel package from linux-image-cloud-amd64"; exit 1; }; \
	echo "fetching guest kernel $$pkg into $(GUEST_CACHE)"; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	(cd "$$tmp" && apt-get download -q "$$pkg" >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && apt-get download -q "$$pkg"; }); \
	dpkg-deb -x "$$tmp"/linux-image-*.deb "$$tmp/x"; \
	rel=$${pkg#linux-image-}; mods="$$tmp/x/lib/modules/$$rel/kernel/drivers"; \
	mkdir -p "$(GUEST_CACHE)/boot" "$(GUEST_CACHE)/lib/modules/$$rel/kernel/drivers/block" "$(GUEST_CACHE)/lib/modules/$$rel/kernel/drivers/char"; \
	cp "$$tmp/x/boot/vmlinuz-$$rel" "$(GUEST_CACHE)/boot/"; \
	rm -rf "$(GUEST_CACHE)/lib/modules/$$rel/kernel/drivers/virtio"; \
	cp -r "$$mods/virtio" "$(GUEST_CACHE)/lib/modules/$$rel/kernel/drivers/"; \
	cp "$$mods/block/virtio_blk.ko" "$(GUEST_CACHE)/lib/modules/$$rel/kernel/drivers/block/"; \
	cp "$$mods/char/virtio_console.ko" "$(GUEST_CACHE)/lib/modules/$$rel/kernel/drivers/char/"; \
	touch $@
	@ls $(GUEST_CACHE)/boot/vmlinuz-*

$(VENV)/.installed: pyproject.toml Makefile
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: deps
	$(PY) scripts/demo.py

demo-stop:
	$(PY) scripts/demo.py --stop

test: deps
	$(PY) -m pytest -q --durations=25 tests/unit tests/integration tests/e2e

test-fast: deps
	$(PY) -m pytest -q -x tests/unit

bench: deps
	$(PY) tests/bench/heartbeats.py
	$(PY) tests/bench/build.py
	$(PY) tests/bench/distribution.py
	$(PY) tests/bench/sandbox.py
	$(PY) tests/bench/snapshot.py

clean:
	rm -rf .demo .pytest_cache .hypothesis
