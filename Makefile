# templatecenter — set-up, demo and tests on a fresh Debian 12 machine (run as root or with sudo for apt-get).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# docker-registry, apache2-utils (htpasswd) and debootstrap serve the image tests (issue 4).
DEB_PACKAGES := python3-venv postgresql systemd e2fsprogs iproute2 procps docker-registry apache2-utils debootstrap busybox-static
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: deps demo demo-stop test test-fast bench clean

deps: $(VENV)/.installed

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
	$(PY) -m pytest -q tests/unit tests/integration tests/e2e

test-fast: deps
	$(PY) -m pytest -q -x tests/unit

bench: deps
	$(PY) tests/bench/heartbeats.py
	$(PY) tests/bench/build.py

clean:
	rm -rf .demo .pytest_cache .hypothesis
