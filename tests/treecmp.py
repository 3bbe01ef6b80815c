"""Full metadata snapshots of a directory tree, and their differences.

Compared per path: type, permission bits incl. setuid/setgid/sticky, uid, gid, size (regular
files), content sha256, symlink target, device numbers, xattrs, mtime (ns), and hardlink
groups (paths sharing an inode). atime and ctime are host facts, not image content.
"""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Meta:
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    link: str
    rdev: tuple[int, int]
    xattrs: tuple[tuple[str, bytes], ...]
    sha256: str
    ino: int
    nlink: int


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "chr"), (stat.S_ISBLK, "blk"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "sock")):
        if test(mode):
            return name
    return "?"


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))


def sha256_file(path: "str | Path") -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: Path, *, skip: tuple[str, ...] = ()) -> dict[str, Meta]:
    """Every path under ``root`` ("" is the root itself) except those in ``skip`` (and below)."""
    out: dict[str, Meta] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        dirnames[:] = [d for d in dirnames if os.path.join(rel_dir, d) not in skip]
        names = [""] if rel_dir == "" else []
        names += [os.path.join(rel_dir, n) for n in (*dirnames, *filenames)
                  if os.path.join(rel_dir, n) not in skip]
        for rel in names:
            path = os.path.join(root, rel) if rel else str(root)
            st = os.lstat(path)
            kind = _kind(st.st_mode)
            out[rel] = Meta(
                kind=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                size=st.st_size if kind == "file" else 0, mtime_ns=st.st_mtime_ns,
                link=os.readlink(path) if kind == "symlink" else "",
                rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chr", "blk") else (0, 0),
                xattrs=_xattrs(path), sha256=sha256_file(path) if kind == "file" else "", ino=st.st_ino,
                nlink=st.st_nlink if kind != "dir" else 0)
    return out


def _groups(snap: dict[str, Meta]) -> set[tuple[str, ...]]:
    by_ino: dict[int, list[str]] = {}
    for path, m in snap.items():
        if m.kind != "dir" and m.nlink > 1:
            by_ino.setdefault(m.ino, []).append(path)
    return {tuple(sorted(paths)) for paths in by_ino.values()}


def diff(expected: dict[str, Meta], actual: dict[str, Meta], *, limit: int = 50) -> list[str]:
    """Human-readable differences (at most ``limit``); empty when the trees match."""
    out: list[str] = []
    for path in sorted(set(expected) - set(actual)):
        out.append(f"missing: /{path}")
    for path in sorted(set(actual) - set(expected)):
        out.append(f"unexpected: /{path}")
    fields = ("kind", "mode", "uid", "gid", "size", "mtime_ns", "link", "rdev", "xattrs", "sha256", "nlink")
    for path in sorted(set(expected) & set(actual)):
        a, b = expected[path], actual[path]
        for f in fields:
            if getattr(a, f) != getattr(b, f):
                out.append(f"/{path}: {f} {getattr(a, f)!r} != {getattr(b, f)!r}")
    ga, gb = _groups(expected), _groups(actual)
    for g in sorted(ga ^ gb):
        out.append(f"hardlink group differs: {g} ({'expected' if g in ga else 'actual'} only)")
    return out[:limit]
