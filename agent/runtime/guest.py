"""The guest side of the qemu driver (SPEC RT-5, RT-6, RT-7): kernel discovery, the
reproducible initramfs and the runtime-config channel.

The initramfs is written here as a ``newc`` cpio by hand so that it is reproducible without
depending on the host's cpio: entries sorted, inode numbers assigned in that order, every
mtime 0, uid/gid 0, then gzip with mtime 0 — the same kernel and busybox give the same bytes,
hence the same RT-6 guest image version on every host.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import InvalidRequest, RuntimeFailed

# RT-5's list, in load order; each module's own ``depends=`` are loaded before it.
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
           "virtio_mmio", "virtio_blk", "virtio_console")
BUSYBOX = "/bin/busybox"
INIT = Path(__file__).with_name("init.sh")
CONFIG_BLOCK = 4096          # the config disk is padded to whole blocks (newlines: still a shell file)
CONFIG_MAX = 1 << 20
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class GuestImage:
    kernel: str
    release: str
    initramfs: str
    version: str   # RT-6: <release>+<12 hex of sha256(kernel ‖ initramfs)>


def find_kernel(configured: str) -> str:
    """``runtime.guest_kernel``, else the newest ``/boot/vmlinuz-*-cloud-amd64`` (RT-5)."""
    if configured:
        if not os.path.isfile(configured):
            raise RuntimeFailed(f"runtime.guest_kernel {configured} does not exist", {"stage": "kernel"})
        return configured
    found = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"), key=_version_key)
    if not found:
        raise RuntimeFailed("no guest kernel: set runtime.guest_kernel (make guest-kernel fetches one)",
                            {"stage": "kernel"})
    return found[-1]


def _version_key(path: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def kernel_release(kernel: str) -> str:
    name = os.path.basename(kernel)
    return name[len("vmlinuz-"):] if name.startswith("vmlinuz-") else name


def modules_dir(kernel: str, configured: str) -> str:
    """``runtime.guest_modules``; else ``lib/modules/<release>`` beside the kernel's ``boot/``
    (the Makefile's cache layout), else the host's ``/lib/modules/<release>``."""
    if configured:
        return configured
    release = kernel_release(kernel)
    beside = Path(kernel).resolve().parent.parent / "lib" / "modules" / release
    return str(beside) if beside.is_dir() else f"/lib/modules/{release}"


def module_order(mod_dir: str) -> list[tuple[str, str]]:
    """(name, path) for RT-5's modules and their dependencies, dependencies first. A module
    missing from the tree is taken to be built in (ext4 is, in the cloud kernel)."""
    paths: dict[str, str] = {}
    for path in sorted(Path(mod_dir).rglob("*.ko")):
        paths.setdefault(path.name[:-3].replace("-", "_"), str(path))
    order: list[tuple[str, str]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in paths:
            return
        seen.add(name)
        for dep in _depends(paths[name]):
            visit(dep)
        order.append((name, paths[name]))

    for name in MODULES:
        visit(name)
    if not any(n == "virtio_blk" for n, _ in order) and not os.path.isdir(mod_dir):
        raise RuntimeFailed(f"guest modules directory {mod_dir} does not exist (runtime.guest_modules)",
                            {"stage": "initramfs"})
    return order


def _depends(path: str) -> list[str]:
    data = Path(path).read_bytes()
    m = re.search(rb"depends=([A-Za-z0-9_,-]*)\0", data)
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d] if m else []


def build(kernel_configured: str, modules_configured: str, out_dir: str) -> GuestImage:
    """Build (or rebuild: cheap) ``out_dir/initramfs.cpio.gz`` and compute RT-6's version."""
    kernel = find_kernel(kernel_configured)
    release = kernel_release(kernel)
    mods = module_order(modules_dir(kernel, modules_configured))
    files: dict[str, tuple[int, bytes]] = {
        "init": (0o100755, INIT.read_bytes()),
        "bin/busybox": (0o100755, Path(BUSYBOX).read_bytes()),
        "lib/modules/order": (0o100644, "".join(f"{n}\n" for n, _ in mods).encode()),
    }
    for name, path in mods:
        files[f"lib/modules/{name}.ko"] = (0o100644, Path(path).read_bytes())
    dirs = ["bin", "dev", "lib", "lib/modules", "newroot", "proc", "sys"]
    archive = _newc(dirs, files, devices={"dev/console": (0o020600, 5, 1)})
    data = gzip.compress(archive, compresslevel=6, mtime=0)
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, "initramfs.cpio.gz")
    tmp = target + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, target)
    h = hashlib.sha256()
    with open(kernel, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    h.update(data)
    return GuestImage(kernel=kernel, release=release, initramfs=target, version=f"{release}+{h.hexdigest()[:12]}")


def _newc(dirs: list[str], files: dict[str, tuple[int, bytes]],
          devices: dict[str, tuple[int, int, int]]) -> bytes:
    entries: list[tuple[str, int, bytes, int, int]] = [(d, 0o040755, b"", 0, 0) for d in dirs]
    entries += [(p, mode, data, 0, 0) for p, (mode, data) in files.items()]
    entries += [(p, mode, b"", major, minor) for p, (mode, major, minor) in devices.items()]
    out = bytearray()
    for ino, (name, mode, data, rmaj, rmin) in enumerate(sorted(entries), start=1):
        out += _header(ino, mode, 2 if mode & 0o040000 else 1, len(data), rmaj, rmin, name)
        out += data + b"\0" * (-len(data) % 4)
    out += _header(0, 0, 1, 0, 0, 0, "TRAILER!!!")
    return bytes(out) + b"\0" * (-len(out) % 512)


def _header(ino: int, mode: int, nlink: int, size: int, rmaj: int, rmin: int, name: str) -> bytes:
    raw = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, rmaj, rmin, len(raw), 0)
    head = b"070701" + b"".join(b"%08x" % f for f in fields) + raw
    return head + b"\0" * (-len(head) % 4)


# --- the runtime config channel (RT-7) ------------------------------------------------

def config_env(runtime_config: dict[str, Any], probe: str) -> bytes:
    """The read-only config disk's content: shell-quoted assignments the init sources.
    Raises InvalidRequest naming the field that cannot be passed to the guest."""
    rc = runtime_config or {}
    argv = [*_strings(rc.get("entrypoint"), "entrypoint"), *_strings(rc.get("cmd"), "cmd")]
    env = rc.get("env") or {}
    if isinstance(env, list):  # ["K=V", ...] as in an OCI config
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in _strings(env, "env"))
    if not isinstance(env, dict):
        raise InvalidRequest("runtime_config.env must be a map", {"field": "runtime_config.env", "reason": "type"})
    for k, v in env.items():
        if not isinstance(k, str) or not _ENV_KEY.match(k) or not isinstance(v, str) or "\0" in v:
            raise InvalidRequest(f"runtime_config.env key {str(k)[:80]!r} is not a valid variable",
                                 {"field": "runtime_config.env", "reason": "format"})
    workdir = rc.get("workdir") or "/"
    user = str(rc.get("user") or "0:0")
    for field, value in (("workdir", workdir), ("user", user), ("probe", probe)):
        if not isinstance(value, str) or "\0" in value or "\n" in value:
            raise InvalidRequest(f"{field} is not a single-line string", {"field": field, "reason": "format"})
    lines = [
        "TC_ARGV=" + shlex.quote(" ".join(shlex.quote(a) for a in argv)),
        "TC_ENVARGS=" + shlex.quote(" ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()))),
        "TC_WORKDIR=" + shlex.quote(workdir),
        "TC_USER=" + shlex.quote(user),
        "TC_PROBE=" + shlex.quote(probe),
    ]
    text = ("\n".join(lines) + "\n").encode()
    if len(text) > CONFIG_MAX:
        raise InvalidRequest("runtime_config is larger than 1 MiB", {"field": "runtime_config", "reason": "size"})
    return text + b"\n" * (-len(text) % CONFIG_BLOCK)


def _strings(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "\0" not in v for v in value):
        raise InvalidRequest(f"runtime_config.{field} must be a list of strings",
                             {"field": f"runtime_config.{field}", "reason": "type"})
    return list(value)
