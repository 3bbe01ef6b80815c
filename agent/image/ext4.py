"""The reproducible ext4 builder (SPEC IMG-17 to IMG-20).

``size_tree`` walks an unpacked tree and applies the IMG-17 formula; ``build_ext4`` makes a
sparse file of that size, populates it with ``mke2fs -d`` (IMG-18, growing it on "Could not
allocate block/inode"), runs the reproducibility post-pass (IMG-20) and gates on ``e2fsck
-fn`` (IMG-19).

Reproducibility. ``mke2fs -d`` is deterministic given the same tree *content*: it reads
directories with ``scandir``/``alphasort`` (we pin ``LC_ALL=C``), takes uuid and hash seed
from ``-U``/``-E hash_seed`` and every library timestamp (superblock times, crtimes, the
root and ``lost+found`` times) from ``E2FSPROGS_FAKE_TIME``. What it copies from the host
and what therefore varies is pinned afterwards, in ONE ``debugfs -w`` run over all inodes:

* ``ctime`` (and ``crtime``) of every inode := the build epoch;
* ``atime`` := ``mtime`` (IMG-12), with nanoseconds;
* ``mtime`` := the tree's mtime again with its nanoseconds (``mke2fs -d`` copies whole
  seconds only), or the epoch for directories that had no tar header
  (``dir_times`` given; IMG-20) — this includes the root when the layers have no ``./``;
* the root directory's mode, uid and gid, which ``mke2fs -d`` does not copy from the source.
* the order of xattrs on inodes that have several: ``mke2fs`` keeps the host's
  ``llistxattr`` order (insertion order on ext4/xfs, hash order on btrfs), so they are removed
  and set again in sorted name order.

The ``mke2fs`` profile is pinned too (``MKE2FS_CONFIG`` points at a copy of the 1.47.0
defaults written next to the output), so a host's ``/etc/mke2fs.conf`` cannot change the
feature set. Inodes are addressed by number (``<ino>``), found by a level-by-level ``ls -p``
walk of the new file system, so no file name is ever parsed as a debugfs command word.
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
import time
import uuid as uuid_mod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from protocol.config import BuildConfig
from protocol.fingerprints import image_fingerprint, image_fingerprint_doc
from protocol.errors import Ext4BuildFailed, JobCancelled

from .ext4pin import postpass, source_tree
from .ext4size import (BLOCK, GIB, MIB, Sizing, TreeCounts, ceil_div, count_stats, count_tree, exact, size_for,
                       size_tree)
from .ext4tools import build_env, fail, run

__all__ = [
    "BLOCK",
    "GIB",
    "MIB",
    "MKE2FS_PROFILE",
    "Ext4Result",
    "Sizing",
    "TreeCounts",
    "build_env",
    "build_ext4",
    "count_tree",
    "fingerprint",
    "fingerprint_doc",
    "fs_uuid",
    "image_sha256",
    "size_for",
    "size_tree",
]

_RETRYABLE = ("Could not allocate block", "Could not allocate inode")

# The e2fsprogs 1.47.0 default profile, pinned so the host's /etc/mke2fs.conf cannot change
# the features of what we build (IMG-20: same fingerprint + same e2fsprogs = same sha256).
MKE2FS_PROFILE = """\
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384

[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
"""


# -- identity (IMG-19, IMG-20) ---------------------------------------------------------------

# IMG-19: one definition for agents and the coordinator (protocol/fingerprints.py).
fingerprint_doc = image_fingerprint_doc
fingerprint = image_fingerprint


def fs_uuid(fp: str) -> str:
    """IMG-20: the fingerprint's first 16 bytes as a UUID (also the directory hash seed)."""
    raw = bytes.fromhex(fp)
    if len(raw) < 16:
        raise ValueError("fingerprint must be at least 16 bytes of hex")
    return str(uuid_mod.UUID(bytes=raw[:16]))



# -- hashing ---------------------------------------------------------------------------------

_ZEROS = bytes(4 * MIB)


def image_sha256(path: Path, bufsize: int = 4 * MIB) -> str:
    """sha256 of the whole file; holes (SEEK_HOLE) are hashed as zeros without being read."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        buf = bytearray(bufsize)
        view = memoryview(buf)
        zeros = memoryview(_ZEROS)
        while pos < size:
            try:
                data = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:       # ENXIO: only a hole is left
                data = size
            while pos < data:     # a hole
                k = min(data - pos, len(zeros))
                h.update(zeros[:k])
                pos += k
            if pos >= size:
                break
            try:
                hole = os.lseek(f.fileno(), pos, os.SEEK_HOLE)
            except OSError:
                hole = size
            os.lseek(f.fileno(), pos, os.SEEK_SET)
            while pos < hole:
                k = f.readinto(view[:min(bufsize, hole - pos)])
                if not k:
                    raise OSError(f"short read in {path} at {pos}")
                h.update(view[:k])
                pos += k
    return h.hexdigest()


# -- the build (IMG-18..IMG-20) ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ext4Result:
    path: Path
    size: int               # apparent bytes
    sha256: str
    allocated: int          # st_blocks * 512
    sizing: Sizing          # the IMG-17 sizing (size of the first attempt)
    attempts: int           # mke2fs runs (1 + grow retries used)
    uuid: str = ""
    seconds: float = 0.0


def _check_cancel(cancel: threading.Event | None, stage: str) -> None:
    if cancel is not None and cancel.is_set():
        raise JobCancelled("build cancelled", {"stage": stage})


def build_ext4(root: Path, out: Path, *, writable: int, fingerprint: str, epoch: int, cfg: BuildConfig,
               cancel: threading.Event | None = None, dir_times: Mapping[str, int] | None = None,
               size: int | None = None, extra_args: Sequence[str] = (), timeout: float = 3600.0) -> Ext4Result:
    """Build the ext4 image of the tree ``root`` at ``out`` (IMG-18..IMG-20).

    ``dir_times``: the unpacker's ``UnpackState.dir_times``; when given, directories not in it
    (no tar header, including a header-less root) get mtime = ``epoch``. ``size`` overrides
    the first attempt's size and ``extra_args`` are put before ``-d`` (both test hooks).
    Raises Ext4BuildFailed (details: stage, rc, stderr tail) or JobCancelled; on failure
    ``out`` is removed.
    """
    t0 = time.monotonic()
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise Ext4BuildFailed(f"source tree {os.fspath(root)!r} is not a directory",
                              {"stage": "prepare", "rc": None, "stderr": ""})
    _check_cancel(cancel, "prepare")
    uid = fs_uuid(fingerprint)
    tree = source_tree(root)
    counts = count_stats(st for key, st in tree.items() if key)
    sizing = size_for(counts.alloc, counts.entries, writable, cfg)
    cur = int(size) if size is not None else sizing.size
    workdir = out.parent
    profile = workdir / (out.name + ".mke2fs.conf")
    ok = False
    try:
        profile.write_text(MKE2FS_PROFILE)
        env = build_env(epoch, profile=profile)
        attempts = 0
        while True:
            attempts += 1
            with open(out, "wb") as f:          # a fresh sparse file each attempt
                f.truncate(cur)
            argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-N", str(sizing.inodes),
                    "-J", f"size={ceil_div(sizing.journal, MIB)}", "-L", "rootfs", "-U", uid,
                    "-E", f"root_owner=0:0,hash_seed={uid},lazy_itable_init=0,lazy_journal_init=0",
                    *extra_args, "-d", os.fspath(root), os.fspath(out)]
            rc, _o, err = run(argv, stage="mke2fs", env=env, timeout=timeout, cancel=cancel)
            if rc == 0:
                break
            text = err.decode("utf-8", "replace")
            if any(s in text for s in _RETRYABLE) and attempts <= int(cfg.grow_retries):
                cur = math.ceil(cur * exact(cfg.grow_factor) / MIB) * MIB
                continue
            raise fail("mke2fs", rc, err, "mke2fs failed" + (f" after {attempts} attempts" if attempts > 1 else ""))
        _check_cancel(cancel, "postpass")
        postpass(out, root, tree, epoch=int(epoch), dir_times=dir_times, env=env, workdir=workdir,
                  timeout=timeout, cancel=cancel)
        rc, _o, err = run(["e2fsck", "-fn", os.fspath(out)], stage="e2fsck", env=build_env(epoch),
                           timeout=timeout, cancel=cancel)
        if rc != 0:
            raise fail("e2fsck", rc, _o + err, "e2fsck -fn found problems")
        _check_cancel(cancel, "hash")
        digest = image_sha256(out)
        st = os.stat(out)
        ok = True
        return Ext4Result(path=out, size=st.st_size, sha256=digest, allocated=st.st_blocks * 512, sizing=sizing,
                          attempts=attempts, uuid=uid, seconds=time.monotonic() - t0)
    finally:
        profile.unlink(missing_ok=True)
        if not ok:
            out.unlink(missing_ok=True)
