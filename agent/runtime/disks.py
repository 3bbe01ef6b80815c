"""Copy-on-write sandbox disks and file clones (SPEC RT-10, RT-11, RT-12).

A sandbox's root disk is a reflink clone of its base (the template ext4, or a replica's
frozen disk) where the store supports FICLONE, else a qcow2 overlay with the base as a raw,
read-only backing file. Either way the base file is never opened for writing.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess

from protocol.errors import RuntimeFailed

FICLONE = 0x40049409


def reflink_works(directory: str) -> bool:
    from ..facts import reflink_supported

    return reflink_supported(directory)


def disk_mode(configured: str, directory: str) -> str:
    """``runtime.disk_mode``: reflink | qcow2, auto → reflink if FICLONE works in ``directory``."""
    if configured == "auto":
        return "reflink" if reflink_works(directory) else "qcow2"
    return configured


def reflink(src: str, dst: str) -> None:
    with open(src, "rb") as s, open(dst + ".tmp", "wb") as d:
        fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
    os.replace(dst + ".tmp", dst)


def clone(src: str, dst: str) -> None:
    """Reflink, else a sparse copy (memory files, frozen disks)."""
    try:
        reflink(src, dst)
        return
    except OSError:
        pass
    res = subprocess.run(["cp", "--sparse=always", src, dst + ".tmp"], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeFailed(f"cannot copy {src}: {res.stderr.strip()[:300]}", {"stage": "copy"})
    os.replace(dst + ".tmp", dst)


def layer(mode: str, base: str, vm_dir: str) -> tuple[str, str]:
    """Create the sandbox's writable disk over ``base``; returns (file name, QEMU format)."""
    if mode == "reflink":
        reflink(base, os.path.join(vm_dir, "disk.raw"))
        return "disk.raw", "raw"
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise RuntimeFailed("qemu-img is missing (package qemu-utils)", {"stage": "disk"})
    res = subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", _pin_base(base, vm_dir),
                          os.path.join(vm_dir, "disk.qcow2")], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeFailed(f"cannot create the qcow2 overlay: {res.stderr.strip()[:300]}", {"stage": "disk"})
    return "disk.qcow2", "qcow2"


def _pin_base(base: str, vm_dir: str) -> str:
    """The backing file an overlay names: a hard link to ``base`` inside the sandbox's own dir,
    so a REDO, REMOVE_REPLICA or artifact removal that unlinks the template ext4 or a replica's
    frozen disk cannot pull the base from under a sandbox (or its restart); the bytes go when
    the last sandbox using them is destroyed. Another file system: the base path itself."""
    pinned = os.path.join(vm_dir, "base.raw")
    try:
        if os.path.lexists(pinned):
            os.unlink(pinned)
        os.link(base, pinned)
        return os.path.abspath(pinned)
    except OSError:
        return os.path.abspath(base)


def freeze(disk: str, fmt: str, dest: str) -> None:
    """RT-12: a standalone read-only raw copy of what the guest sees (layers merged)."""
    standalone(disk, fmt, dest)
    os.chmod(dest, 0o444)


def standalone(disk: str, fmt: str, dest: str) -> None:
    """A raw copy of what the guest sees, needing no other file (reflink, else sparse copy;
    a qcow2 overlay is merged with its base). RT-12 snapshots, RT-14 exports."""
    if fmt == "raw":
        clone(disk, dest)
    else:
        res = subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", disk, dest + ".tmp"],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeFailed(f"cannot copy the disk: {res.stderr.strip()[:300]}", {"stage": "disk"})
        os.replace(dest + ".tmp", dest)
