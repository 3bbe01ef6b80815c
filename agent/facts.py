"""What the agent reports about its host (SPEC NODE-10, NODE-15, WIRE-8): facts, versions,
capabilities, storage and free memory.

Every probe degrades instead of failing: a host where netlink, /proc/cpuinfo or QEMU is
unavailable still joins, reporting a fallback ("127.0.0.1", "", "none", False). Names and
value shapes are those ``protocol.messages.Hello`` validates (``[a-z_]`` names, scalars).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

import psutil

from .config import AgentConfig
from .image.preflight import preflight

log = logging.getLogger("facts")

FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int)
VERSION_NAMES = ("agent", "guest_image", "host_kernel", "hypervisor")
QEMU = "qemu-system-x86_64"
# The agent runs as root under systemd, whose PATH has the sbin directories; a developer
# shell may not, and mke2fs/e2fsck live there.
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def _which(tool: str) -> str | None:
    path = os.environ.get("PATH", os.defpath)
    return shutil.which(tool, path=os.pathsep.join([path, *_SBIN]))


def _run(argv: list[str], timeout: float = 10.0) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("%s failed: %s", argv[0], exc)
        return None


# --- facts (NODE-10) ------------------------------------------------------------------

def collect_facts(cfg: AgentConfig) -> dict[str, Any]:
    """The facts map for HELLO. Touches the state dir (reflink probe), so call it after start-up created it."""
    model, _ = _cpuinfo()
    return {
        "host_name": socket.gethostname(),
        "address": node_address(cfg),
        "cpu_model": model,
        "cpu_flags_hash": cpu_flags_hash(),
        "cores": psutil.cpu_count(logical=True) or 1,
        "memory": psutil.virtual_memory().total,
        "accelerator": accelerator(),
        "store_fs": store_fs(cfg.agent.state_dir),
        "reflink": reflink_supported(cfg.agent.state_dir),
        "boot_id": _read("/proc/sys/kernel/random/boot_id").strip(),
    }


def node_address(cfg: AgentConfig) -> str:
    """NODE-15: the configured address, else the default-route interface's IPv4, else 127.0.0.1."""
    if cfg.agent.address:
        return cfg.agent.address
    try:
        from pyroute2 import IPRoute  # imported here: ~0.1 s, and only this probe needs netlink

        with IPRoute() as ipr:
            for route in ipr.get_routes(family=socket.AF_INET):
                if route["dst_len"] != 0:
                    continue
                oif = route.get_attr("RTA_OIF")
                for addr in ipr.get_addr(index=oif, family=socket.AF_INET):
                    ip = addr.get_attr("IFA_ADDRESS")
                    if ip:
                        return str(ip)
    except Exception as exc:  # noqa: BLE001 — no netlink (container, seccomp): fall back
        log.warning("default-route address lookup failed: %s", exc)
    return "127.0.0.1"


def _cpuinfo() -> tuple[str, list[str]]:
    model = ""
    flags: list[str] = []
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = value.split()
        if model and flags:
            break
    return model[:1024], flags


def cpu_flags_hash() -> str:
    """First 16 hex of sha256 of the sorted CPU flags: memory snapshots pin it (COMPAT-1)."""
    return hashlib.sha256(" ".join(sorted(_cpuinfo()[1])).encode()).hexdigest()[:16]


def accelerator() -> str:
    """"kvm" if /dev/kvm opens read-write, else "tcg". (A canary boot refines this later, RT-3.)"""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return "tcg"
    os.close(fd)
    return "kvm"


def store_fs(path: str) -> str:
    """File-system type of the mount holding ``path`` (longest matching mount point)."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    try:
        parts = psutil.disk_partitions(all=True)
    except OSError as exc:
        log.warning("cannot list mounts: %s", exc)
        return ""
    for p in parts:
        mp = p.mountpoint.rstrip("/") or "/"
        if (real == mp or real.startswith(mp + "/") or mp == "/") and len(mp) >= len(best):
            best, fstype = mp, p.fstype
    return fstype


def reflink_supported(directory: str) -> bool:
    """Whether FICLONE works in ``directory``: tried for real between two temporary files."""
    try:
        with tempfile.TemporaryFile(dir=directory) as src, tempfile.TemporaryFile(dir=directory) as dst:
            src.write(b"\0" * 4096)
            src.flush()
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        return True
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV, errno.ENOSYS):
            log.warning("reflink probe in %s failed: %s", directory, exc)
        return False


# --- versions (NODE-10, WIRE-9) ---------------------------------------------------------

def collect_versions(cfg: AgentConfig, runtime: dict[str, str] | None = None) -> dict[str, str]:
    """agent, guest_image, host_kernel, hypervisor; ``runtime`` (the driver's RT-6 values) fills
    what it knows; each is overridable by agent.versions.<name>."""
    found = {
        "agent": _package_version(),
        # "" = unknown unless the runtime driver computes it (RT-6: agent/runtime/guest.py).
        "guest_image": "",
        "host_kernel": os.uname().release,
        "hypervisor": hypervisor_version(cfg),
    }
    found.update({k: v for k, v in (runtime or {}).items() if v})
    # An empty override leaves the computed value (RT-6 fills guest_image, CFG-2 pins the rest).
    found.update({k: v for k, v in cfg.agent.versions.items() if v})
    return found


def _package_version() -> str:
    try:
        return importlib.metadata.version("templatecenter")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def hypervisor_version(cfg: AgentConfig) -> str:
    """QEMU's version ("7.2.22"), or "none" when the driver is none or QEMU is missing."""
    if "hypervisor" in cfg.agent.versions or cfg.runtime.driver == "none":
        return cfg.agent.versions.get("hypervisor", "none")
    qemu = _which(QEMU)
    if qemu is None:
        return "none"
    res = _run([qemu, "--version"])
    if res is None or res.returncode != 0:
        return "none"
    first = (res.stdout.splitlines() or [""])[0]
    m = re.search(r"version\s+([0-9][0-9A-Za-z.+~-]*)", first)
    return m.group(1) if m else first.strip()[:256] or "none"


class VersionsCache:
    """Versions are recomputed at most every ``max_age`` seconds, or sooner after ``invalidate()``
    (SIGHUP): heartbeats read the cache, so a beat never forks QEMU (WIRE-8 stays cheap)."""

    def __init__(self, cfg: AgentConfig, max_age: float = 30.0) -> None:
        self._cfg = cfg
        self._max_age = max_age
        self._value: dict[str, str] | None = None
        self._at = 0.0
        self.runtime: dict[str, str] = {}  # the runtime driver's versions (RT-6), set at start

    def due(self) -> bool:
        return self._value is None or time.monotonic() - self._at >= self._max_age

    def invalidate(self) -> None:
        self._value = None

    def refresh(self) -> dict[str, str]:
        """Recompute now (blocking: run it in a thread from the event loop)."""
        self._value = collect_versions(self._cfg, self.runtime)
        self._at = time.monotonic()
        return dict(self._value)

    def get(self) -> dict[str, str]:
        return dict(self._value) if self._value is not None else self.refresh()


# --- capabilities (build preflight, IMG-21; sandbox, RT-1) -----------------------------

def capabilities(cfg: AgentConfig) -> dict[str, bool]:
    return {"build": build_preflight(), "sandbox": sandbox_capable(cfg)}


def build_preflight() -> bool:
    """IMG-22: mke2fs populates from a directory, e2fsck and debugfs run (a real 8 MiB build)."""
    result = preflight()
    if not result.ok:
        log.warning("build capability off: %s", result.reason)
    return result.ok


def sandbox_capable(cfg: AgentConfig) -> bool:
    return cfg.runtime.driver == "qemu" and _which(QEMU) is not None


# --- per-heartbeat numbers (WIRE-8) ----------------------------------------------------

def storage(path: str) -> dict[str, int]:
    u = psutil.disk_usage(path)
    return {"total": int(u.total), "used": int(u.used), "free": int(u.free)}


def mem_free() -> int:
    return int(psutil.virtual_memory().available)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""
