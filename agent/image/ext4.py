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
import re
import shutil
import stat
import subprocess
import threading
import time
import uuid as uuid_mod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from protocol.config import BuildConfig
from protocol.fingerprints import image_fingerprint, image_fingerprint_doc
from protocol.errors import BuilderPreflightFailed, Ext4BuildFailed, JobCancelled

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

BLOCK = 4096
MIB = 1 << 20
GIB = 1 << 30
FAST_SYMLINK_MAX = 59          # ext4 keeps targets up to 59 bytes inside the inode
INODE_BYTES = 256
_STDERR_TAIL = 2048
_RETRYABLE = ("Could not allocate block", "Could not allocate inode")
_POLL = 0.05

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


# -- sizing (IMG-17) -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TreeCounts:
    """What the IMG-17 formula needs from a tree walk."""

    alloc: int = 0          # bytes: regular files 4 KiB-rounded (each inode once) + 4 KiB per dir/long symlink
    entries: int = 0        # paths below the root (every name, hardlinks included)
    regular: int = 0
    dirs: int = 0
    long_symlinks: int = 0


@dataclass(frozen=True, slots=True)
class Sizing:
    alloc: int              # bytes of data blocks the tree needs
    inodes: int             # mke2fs -N
    journal: int            # bytes (-J size= in MiB)
    size: int               # bytes of the image, a multiple of 1 MiB, >= min_size
    entries: int


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _exact(x: float) -> Fraction:
    """A config float as the decimal the operator wrote (1.2 is 6/5, not its binary neighbour)."""
    return Fraction(str(x))


def size_for(alloc: int, entries: int, writable: int, cfg: BuildConfig) -> Sizing:
    """The IMG-17 formula from counts: pure integer/rational arithmetic.

    inodes = ceil(entries*inode_factor) + inode_extra + ceil(writable/inode_per_writable);
    journal = journal_small if alloc + writable < 1 GiB else journal_large;
    size = ceil_MiB(alloc*(1+slack%) + inodes*256 + journal + writable), at least min_size.
    """
    if alloc < 0 or entries < 0 or writable < 0:
        raise ValueError("alloc, entries and writable must be >= 0")
    inodes = (math.ceil(entries * _exact(cfg.inode_factor)) + int(cfg.inode_extra)
              + _ceil_div(writable, int(cfg.inode_per_writable)))
    journal = int(cfg.journal_small) if alloc + writable < GIB else int(cfg.journal_large)
    raw = alloc * (1 + _exact(cfg.slack) / 100) + inodes * INODE_BYTES + journal + writable
    size = max(math.ceil(raw / MIB) * MIB, _ceil_div(int(cfg.min_size), MIB) * MIB)
    return Sizing(alloc=alloc, inodes=inodes, journal=journal, size=size, entries=entries)


def _walk(root: Path) -> Iterable[tuple[str, os.stat_result]]:
    """(relative path, lstat) of every entry below ``root``, depth first, never following links."""
    stack = [("", os.fspath(root))]
    while stack:
        rel, path = stack.pop()
        with os.scandir(path) as it:
            for de in it:
                st = de.stat(follow_symlinks=False)
                key = f"{rel}/{de.name}" if rel else de.name
                yield key, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append((key, de.path))


def count_tree(root: Path) -> TreeCounts:
    """Walk ``root`` with lstat only; hardlinked files are counted once (by device and inode)."""
    return _count(st for _key, st in _walk(Path(root)))


def _count(stats: Iterable[os.stat_result]) -> TreeCounts:
    alloc = entries = regular = dirs = long_links = 0
    seen: set[tuple[int, int]] = set()
    for st in stats:
        entries += 1
        mode = st.st_mode
        if stat.S_ISREG(mode):
            if st.st_nlink > 1:
                ident = (st.st_dev, st.st_ino)
                if ident in seen:
                    continue
                seen.add(ident)
            regular += 1
            alloc += _ceil_div(st.st_size, BLOCK) * BLOCK
        elif stat.S_ISDIR(mode):
            dirs += 1
            alloc += BLOCK
        elif stat.S_ISLNK(mode) and st.st_size > FAST_SYMLINK_MAX:
            long_links += 1
            alloc += BLOCK
    return TreeCounts(alloc=alloc, entries=entries, regular=regular, dirs=dirs, long_symlinks=long_links)


def size_tree(root: Path, writable: int, cfg: BuildConfig) -> Sizing:
    """IMG-17 sizing of the unpacked tree at ``root`` for a ``writable``-byte guest allowance."""
    c = count_tree(root)
    return size_for(c.alloc, c.entries, writable, cfg)


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


# -- running the tools ----------------------------------------------------------------------

def build_env(epoch: int | None = None, path: str | None = None, profile: Path | None = None) -> dict[str, str]:
    """A minimal, locale-free environment for e2fsprogs."""
    env = {"LC_ALL": "C", "LANG": "C", "PATH": path if path is not None else os.environ.get("PATH", os.defpath)}
    if epoch is not None:
        env["E2FSPROGS_FAKE_TIME"] = str(int(epoch))
    if profile is not None:
        env["MKE2FS_CONFIG"] = os.fspath(profile)
    return env


def _tail(data: bytes) -> str:
    return data[-_STDERR_TAIL:].decode("utf-8", "replace")


def _run(argv: Sequence[str], *, stage: str, env: Mapping[str, str], timeout: float,
         cancel: threading.Event | None) -> tuple[int, bytes, bytes]:
    """Run ``argv``; kill it when ``cancel`` is set (JobCancelled) or ``timeout`` passes (Ext4BuildFailed)."""
    if cancel is not None and cancel.is_set():
        raise JobCancelled("build cancelled", {"stage": stage})
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=dict(env), close_fds=True)
    except (FileNotFoundError, PermissionError) as exc:
        # The tool vanished or lost its x bit since the start-up preflight (IMG-22).
        raise BuilderPreflightFailed(f"{stage}: build tool {argv[0]} cannot run on this builder: {exc.strerror}",
                                     {"stage": stage, "tool": argv[0]}) from None
    except OSError as exc:
        raise Ext4BuildFailed(f"{stage}: cannot run {argv[0]}: {exc}",
                              {"stage": stage, "rc": None, "stderr": str(exc)}) from None
    deadline = time.monotonic() + timeout
    out_chunks: list[bytes] = []
    err_chunks: list[bytes] = []
    # Drain both pipes in threads so a chatty tool never blocks on a full pipe.
    def drain(src, sink: list[bytes]) -> None:
        sink.extend(iter(lambda: src.read(65536), b""))
    readers = [threading.Thread(target=drain, args=(proc.stdout, out_chunks), daemon=True),
               threading.Thread(target=drain, args=(proc.stderr, err_chunks), daemon=True)]
    for t in readers:
        t.start()
    try:
        while True:
            try:
                proc.wait(timeout=_POLL)
                break
            except subprocess.TimeoutExpired:
                pass
            if cancel is not None and cancel.is_set():
                proc.kill()
                proc.wait()
                raise JobCancelled("build cancelled", {"stage": stage})
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise Ext4BuildFailed(f"{stage}: {argv[0]} timed out after {timeout:g} s",
                                      {"stage": stage, "rc": None, "stderr": _tail(b"".join(err_chunks))})
    finally:
        for t in readers:
            t.join(timeout=5)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    return proc.returncode, b"".join(out_chunks), b"".join(err_chunks)


def _fail(stage: str, rc: int | None, err: bytes, what: str) -> Ext4BuildFailed:
    tail = _tail(err)
    last = tail.strip().splitlines()[-1] if tail.strip() else ""
    return Ext4BuildFailed(f"{stage}: {what} (rc {rc}){': ' + last if last else ''}",
                           {"stage": stage, "rc": rc, "stderr": tail})


# -- the debugfs post-pass (IMG-20) ----------------------------------------------------------

_ECHO = re.compile(rb"debugfs: [^\n]*\n")
_ENTRY = re.compile(rb"/(\d+)/([0-7]+)/(\d+)/(\d+)/([^/]*)/(\d*)/\n")


def _parse_ls(out: bytes) -> list[tuple[int, list[tuple[int, int, bytes]]]]:
    """Parse ``debugfs -f`` output of ``ls -p <ino>`` commands: [(dir ino, [(ino, mode, name)])].

    Names cannot contain ``/`` but may contain newlines, so entries are matched as whole
    ``/ino/mode/uid/gid/name/size/`` records rather than split into lines.
    """
    res: list[tuple[int, list[tuple[int, int, bytes]]]] = []
    pos, n = 0, len(out)
    while pos < n:
        if out[pos:pos + 1] == b"\n":
            pos += 1
            continue
        m = _ECHO.match(out, pos)
        if m:
            cmd = m.group(0)
            im = re.search(rb"<(\d+)>", cmd)
            res.append((int(im.group(1)) if im else -1, []))
            pos = m.end()
            continue
        m = _ENTRY.match(out, pos)
        if m and res:
            res[-1][1].append((int(m.group(1)), int(m.group(2), 8), m.group(5)))
            pos = m.end()
            continue
        raise ValueError(f"unexpected debugfs output at byte {pos}: {out[pos:pos + 80]!r}")
    return res


def _debugfs_errors(err: bytes) -> list[str]:
    return [ln for ln in err.decode("utf-8", "replace").splitlines()
            if ln.strip() and not re.match(r"debugfs \d", ln)]


def _map_inodes(image: Path, tree: Mapping[str, os.stat_result], *, env: Mapping[str, str], workdir: Path,
                timeout: float, cancel: threading.Event | None) -> dict[str, int]:
    """{relative path: inode number} for every source path, by a level-wise ``ls -p`` walk."""
    result: dict[str, int] = {"": 2}
    level: list[tuple[int, str]] = [(2, "")]
    cmdfile = workdir / (image.name + ".ls.cmd")
    while level:
        cmdfile.write_text("".join(f"ls -p <{ino}>\n" for ino, _ in level))
        rc, out, err = _run(["debugfs", "-f", os.fspath(cmdfile), os.fspath(image)], stage="postpass",
                            env=env, timeout=timeout, cancel=cancel)
        if rc != 0 or _debugfs_errors(err):
            raise _fail("postpass", rc, err, "debugfs ls walk failed")
        try:
            parsed = _parse_ls(out)
        except ValueError as exc:
            raise Ext4BuildFailed(f"postpass: {exc}", {"stage": "postpass", "rc": rc, "stderr": _tail(err)}) from None
        by_ino = dict(parsed)
        nxt: list[tuple[int, str]] = []
        for dino, prefix in level:
            for ino, mode, raw in by_ino.get(dino, []):
                if raw in (b".", b".."):
                    continue
                name = os.fsdecode(raw)
                key = f"{prefix}/{name}" if prefix else name
                if key not in tree:
                    if key == "lost+found":
                        continue
                    raise Ext4BuildFailed(f"postpass: {key!r} is in the image but not in the tree",
                                          {"stage": "postpass", "rc": rc, "stderr": ""})
                result[key] = ino
                if stat.S_ISDIR(mode):
                    nxt.append((ino, key))
        level = nxt
    cmdfile.unlink(missing_ok=True)
    missing = [k for k in tree if k not in result]
    if missing:
        raise Ext4BuildFailed(f"postpass: {len(missing)} tree entries are missing from the image, "
                              f"e.g. {missing[0]!r}", {"stage": "postpass", "rc": 0, "stderr": ""})
    return result


def _time_cmds(ino: int, field: str, sec: int, nsec: int = 0) -> list[str]:
    # ``<field> @sec`` sets the low 32 bits and keeps ``<field>_extra``; the extra word is set
    # after it in full: nanoseconds << 2 | the two epoch bits (times past 2038). mke2fs -d
    # copies whole seconds only, so this is also what keeps sub-second mtimes (IMG-12).
    extra = (nsec << 2) | (((sec + (1 << 31)) >> 32) & 3)
    return [f"sif <{ino}> {field} @{sec}\n", f"sif <{ino}> {field}_extra {extra}\n"]


def _quote(word: str) -> str | None:
    """A debugfs (ss library) command word: double-quoted, ``"`` doubled; None if it cannot be one."""
    if any(c in word for c in "\n\r\0"):
        return None
    return '"' + word.replace('"', '""') + '"'


def _xattr_cmds(root: Path, want: Mapping[int, tuple[int, os.stat_result, str]], valdir: Path) -> list[str]:
    """Rewrite xattrs in sorted name order where an inode has several.

    ``mke2fs -d`` stores them in the host's ``llistxattr`` order, which depends on the host
    file system; removing them all and setting them again sorted makes the layout canonical.
    """
    lines: list[str] = []
    n = 0
    for ino in sorted(want):
        key = want[ino][2]
        path = os.path.join(root, key) if key else os.fspath(root)
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError:
            continue
        if len(names) < 2:
            continue
        quoted = [_quote(x) for x in names]
        if any(q is None for q in quoted):
            continue
        cmds = [f"ea_rm <{ino}> {' '.join(q for q in quoted if q)}\n"]
        for name in sorted(names):
            valdir.mkdir(exist_ok=True)
            vf = valdir / str(n)
            n += 1
            vf.write_bytes(os.getxattr(path, name, follow_symlinks=False))
            cmds.append(f"ea_set -f {_quote(os.fspath(vf))} <{ino}> {_quote(name)}\n")
        lines += cmds
    return lines


def _postpass(image: Path, root: Path, tree: dict[str, os.stat_result], *, epoch: int,
              dir_times: Mapping[str, int] | None, env: Mapping[str, str], workdir: Path, timeout: float,
              cancel: threading.Event | None) -> None:
    inos = _map_inodes(image, tree, env=env, workdir=workdir, timeout=timeout, cancel=cancel)
    want: dict[int, tuple[int, os.stat_result, str]] = {}      # ino -> (mtime ns, stat, key)
    for key, ino in inos.items():
        st = tree[key]
        mtime_ns = int(st.st_mtime_ns)
        if stat.S_ISDIR(st.st_mode) and dir_times is not None and key not in dir_times:
            mtime_ns = int(epoch) * 1_000_000_000                # a header-less directory (IMG-20)
        want.setdefault(ino, (mtime_ns, st, key))
    lines: list[str] = []
    root_st = tree[""]
    lines += [f"sif <2> mode 0{root_st.st_mode:o}\n", f"sif <2> uid {root_st.st_uid}\n",
              f"sif <2> gid {root_st.st_gid}\n"]
    for ino in sorted(want):
        mtime_ns, _st, _key = want[ino]
        sec, nsec = divmod(mtime_ns, 1_000_000_000)
        lines += _time_cmds(ino, "mtime", sec, nsec)
        lines += _time_cmds(ino, "atime", sec, nsec)
        lines += _time_cmds(ino, "ctime", epoch)
        lines += _time_cmds(ino, "crtime", epoch)
    if 11 not in want:                                         # lost+found, made by mke2fs itself
        for field in ("mtime", "atime", "ctime", "crtime"):
            lines += _time_cmds(11, field, epoch)
    valdir = workdir / (image.name + ".xattrs")
    lines += _xattr_cmds(root, want, valdir)
    cmdfile = workdir / (image.name + ".pin.cmd")
    cmdfile.write_text("".join(lines))
    try:
        rc, _out, err = _run(["debugfs", "-w", "-f", os.fspath(cmdfile), os.fspath(image)], stage="postpass",
                             env=env, timeout=timeout, cancel=cancel)
    finally:
        cmdfile.unlink(missing_ok=True)
        shutil.rmtree(valdir, ignore_errors=True)
    if rc != 0 or _debugfs_errors(err):
        raise _fail("postpass", rc, err, "debugfs post-pass failed")


def _source_tree(root: Path) -> dict[str, os.stat_result]:
    """{relative path: lstat} of the tree (root is ""); sockets are left out, as ``mke2fs -d`` skips them."""
    tree = {"": os.lstat(root)}
    for key, st in _walk(root):
        if not stat.S_ISSOCK(st.st_mode):
            tree[key] = st
    return tree


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
    tree = _source_tree(root)
    counts = _count(st for key, st in tree.items() if key)
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
                    "-J", f"size={_ceil_div(sizing.journal, MIB)}", "-L", "rootfs", "-U", uid,
                    "-E", f"root_owner=0:0,hash_seed={uid},lazy_itable_init=0,lazy_journal_init=0",
                    *extra_args, "-d", os.fspath(root), os.fspath(out)]
            rc, _o, err = _run(argv, stage="mke2fs", env=env, timeout=timeout, cancel=cancel)
            if rc == 0:
                break
            text = err.decode("utf-8", "replace")
            if any(s in text for s in _RETRYABLE) and attempts <= int(cfg.grow_retries):
                cur = math.ceil(cur * _exact(cfg.grow_factor) / MIB) * MIB
                continue
            raise _fail("mke2fs", rc, err, "mke2fs failed" + (f" after {attempts} attempts" if attempts > 1 else ""))
        _check_cancel(cancel, "postpass")
        _postpass(out, root, tree, epoch=int(epoch), dir_times=dir_times, env=env, workdir=workdir,
                  timeout=timeout, cancel=cancel)
        rc, _o, err = _run(["e2fsck", "-fn", os.fspath(out)], stage="e2fsck", env=build_env(epoch),
                           timeout=timeout, cancel=cancel)
        if rc != 0:
            raise _fail("e2fsck", rc, _o + err, "e2fsck -fn found problems")
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
