"""Read an ext4 image with ``debugfs`` (no mount, no root needed); compare it with a host tree.

    from tests import debugfs
    fs = debugfs.Image(img); fs.stat("/bin")["target"]; fs.ls("/etc"); fs.xattrs("/bin/ping")
    st = debugfs.stat(img, "/etc/passwd")        # {'ino', 'type', 'mode', 'uid', 'gid', 'size', 'links', ...}
    debugfs.xattrs(img, "/bin/ping")              # {'security.capability': b'...'}
    debugfs.listdir(img, "/etc")                  # {'passwd': (ino, mode), ...}
    meta = debugfs.walk(img)                      # {'etc/passwd': {...}, ...}  (no root, no lost+found)
    assert debugfs.comparable(meta) == debugfs.comparable(debugfs.host_tree(rootdir))

Metadata dicts have: ino, type ('reg', 'dir', 'lnk', 'chr', 'blk', 'fifo', 'sock'), mode (the
full st_mode), uid, gid, size, links, mtime, ctime, atime, crtime (seconds; None if absent),
mtime_ns/ctime_ns/atime_ns (extra nanoseconds), rdev (major, minor) and major, minor for
devices (else None), target (str, surrogateescape) for symlinks, xattrs ({name: bytes}).
``walk`` paths are relative, ``/``-joined, no leading slash. The image root has one more link
than a host tree's root (lost+found). ``Image(path)`` bundles the functions as methods.

Inodes are addressed by number (``<ino>``) wherever possible, so odd file names never meet
the debugfs command parser.
"""
from __future__ import annotations

import os
import re
import stat as stat_mod
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "COMPARED",
    "Image",
    "comparable",
    "host_tree",
    "listdir",
    "quote",
    "run",
    "run_script",
    "stat",
    "stat_ino",
    "superblock",
    "walk",
    "xattrs",
]

_ENV = {"LC_ALL": "C", "PATH": os.environ.get("PATH", os.defpath)}
_TYPES = {"regular": "reg", "directory": "dir", "symlink": "lnk", "character special": "chr",
          "block special": "blk", "FIFO": "fifo", "socket": "sock"}
_IFMT = {"reg": stat_mod.S_IFREG, "dir": stat_mod.S_IFDIR, "lnk": stat_mod.S_IFLNK, "chr": stat_mod.S_IFCHR,
         "blk": stat_mod.S_IFBLK, "fifo": stat_mod.S_IFIFO, "sock": stat_mod.S_IFSOCK}


def quote(word: str) -> str:
    """A debugfs command word (ss quoting: double quotes, a literal ``"`` doubled)."""
    if any(c in word for c in "\n\r\0"):
        raise ValueError(f"{word!r} cannot be written as a debugfs command word")
    return '"' + word.replace('"', '""') + '"'


def _spec(path: str | int) -> str:
    if isinstance(path, int):
        return f"<{path}>"
    return quote(path if path.startswith("/") else "/" + path)


def run(image: Path | str, command: str, *, write: bool = False) -> bytes:
    """stdout of ``debugfs [-w] -R command image``; raises on a non-empty error on stderr."""
    argv = ["debugfs", *(["-w"] if write else []), "-R", command, os.fspath(image)]
    p = subprocess.run(argv, capture_output=True, env=_ENV, timeout=120, check=False)
    errs = [ln for ln in p.stderr.decode("utf-8", "replace").splitlines() if ln.strip()
            and not re.match(r"debugfs \d", ln)]
    if p.returncode != 0 or errs:
        raise RuntimeError(f"debugfs {command!r} on {image}: rc {p.returncode}: {' | '.join(errs)}")
    return p.stdout


def run_script(image: Path | str, commands: Iterable[str]) -> list[bytes]:
    """Run many read-only commands in one debugfs process; the stdout of each, in order."""
    cmds = list(commands)
    if not cmds:
        return []
    with tempfile.NamedTemporaryFile("w", suffix=".cmd", delete=False) as f:
        f.write("".join(c + "\n" for c in cmds))
        name = f.name
    try:
        p = subprocess.run(["debugfs", "-f", name, os.fspath(image)], capture_output=True, env=_ENV,
                           timeout=300, check=False)
    finally:
        os.unlink(name)
    if p.returncode != 0:
        raise RuntimeError(f"debugfs -f on {image}: rc {p.returncode}: {p.stderr[-2000:]!r}")
    # Each command is echoed as "debugfs: CMD\n"; split on exactly those echoes, in order.
    out, res, pos = p.stdout, [], 0
    marks = []
    for c in cmds:
        echo = ("debugfs: " + c + "\n").encode()
        m = out.find(echo, pos)
        if m < 0:
            raise RuntimeError(f"debugfs -f: no echo of {c!r}")
        marks.append((m, m + len(echo)))
        pos = m + len(echo)
    for i, (_start, body) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else len(out)
        res.append(out[body:end])
    return res


# -- stat ---------------------------------------------------------------------------------------

_TIME = re.compile(rb"^\s*(ctime|atime|mtime|crtime|dtime): 0x([0-9a-f]+):([0-9a-f]+)", re.MULTILINE)
_TIME_SHORT = re.compile(rb"^\s*(ctime|atime|mtime|crtime|dtime): 0x([0-9a-f]+) ", re.MULTILINE)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _decode_time(lo: int, extra: int | None) -> tuple[int, int]:
    sec = lo - (1 << 32) if lo & 0x80000000 else lo
    if extra is None:
        return sec, 0
    sec += (extra & 3) << 32
    return sec, extra >> 2


def parse_stat(out: bytes) -> dict[str, Any] | None:
    """Parse the text of ``debugfs stat``; None if the inode does not exist."""
    m = re.search(rb"Inode: (\d+)\s+Type: ([A-Za-z ]+?)\s+Mode:\s+(\d+)", out)
    if not m:
        return None
    kind = _TYPES.get(m.group(2).decode(), m.group(2).decode())
    meta: dict[str, Any] = {"ino": int(m.group(1)), "type": kind,
                            "mode": _IFMT.get(kind, 0) | int(m.group(3), 8)}
    m = re.search(rb"User:\s+(\d+)\s+Group:\s+(\d+).*?Size: (\d+)", out)
    meta.update(uid=int(m.group(1)), gid=int(m.group(2)), size=int(m.group(3)))
    meta["links"] = int(re.search(rb"Links: (\d+)", out).group(1))
    for f in ("ctime", "atime", "mtime", "crtime"):
        meta[f] = None
        meta[f + "_ns"] = 0
    for tm in _TIME.finditer(out):
        sec, ns = _decode_time(int(tm.group(2), 16), int(tm.group(3), 16))
        meta[tm.group(1).decode()], meta[tm.group(1).decode() + "_ns"] = sec, ns
    for tm in _TIME_SHORT.finditer(out):
        meta[tm.group(1).decode()] = _decode_time(int(tm.group(2), 16), None)[0]
    meta.pop("dtime", None)
    meta.pop("dtime_ns", None)
    dev = re.search(rb"Device major/minor number: ([0-9]+):([0-9]+)", out)
    meta["rdev"] = (int(dev.group(1)), int(dev.group(2))) if dev and kind in ("chr", "blk") else None
    meta["major"], meta["minor"] = meta["rdev"] if meta["rdev"] else (None, None)
    fast = out.find(b'Fast link dest: "')
    meta["target"] = _text(out[fast + 17:fast + 17 + meta["size"]]) if fast >= 0 and kind == "lnk" else None
    meta["xattrs_listed"] = [x.decode("utf-8", "surrogateescape")
                             for x in re.findall(rb"^  (\S+) \(\d+\)", out, re.MULTILINE)] \
        if b"Extended attributes:" in out else []
    return meta


def stat(image: Path | str, path: str | int) -> dict[str, Any] | None:
    """Metadata of ``path`` (or inode number) in the image, incl. symlink target and xattrs; None if absent."""
    try:
        out = run(image, f"stat {_spec(path)}")
    except RuntimeError as exc:
        if "File not found" in str(exc) or "not found" in str(exc):
            return None
        raise
    meta = parse_stat(out)
    if meta is None:
        return None
    _complete(image, [meta])
    return meta


stat_ino = stat


def _complete(image: Path | str, metas: list[dict[str, Any]]) -> None:
    """Fill slow symlink targets and xattr values (by inode number, batched)."""
    with tempfile.TemporaryDirectory() as td:
        cmds: list[str] = []
        wants: list[tuple[dict[str, Any], str, Path]] = []
        for meta in metas:
            if meta["type"] == "lnk" and meta["target"] is None:
                dest = Path(td) / f"l{meta['ino']}"
                cmds.append(f"dump <{meta['ino']}> {quote(os.fspath(dest))}")
                wants.append((meta, "", dest))
            meta["xattrs"] = {}
            for i, name in enumerate(meta.pop("xattrs_listed", [])):
                dest = Path(td) / f"x{meta['ino']}_{i}"
                cmds.append(f"ea_get -f {quote(os.fspath(dest))} <{meta['ino']}> {quote(name)}")
                wants.append((meta, name, dest))
        run_script(image, cmds)
        for meta, name, dest in wants:
            data = dest.read_bytes()
            if name:
                meta["xattrs"][name] = data
            else:
                meta["target"] = _text(data)


def xattrs(image: Path | str, path: str | int) -> dict[str, bytes]:
    """{name: value} of the path's extended attributes (``ea_list`` names, ``ea_get -f`` values)."""
    meta = stat(image, path)
    if meta is None:
        raise FileNotFoundError(path)
    return meta["xattrs"]


# -- directories --------------------------------------------------------------------------------

_ENTRY = re.compile(rb"/(\d+)/([0-7]+)/(\d+)/(\d+)/([^/]*)/(\d*)/\n")


def _parse_ls(out: bytes) -> dict[str, tuple[int, int]]:
    res = {}
    for m in _ENTRY.finditer(out):
        name = m.group(5).decode("utf-8", "surrogateescape")
        if name not in (".", ".."):
            res[name] = (int(m.group(1)), int(m.group(2), 8))
    return res


def listdir(image: Path | str, path: str | int = "/") -> dict[str, tuple[int, int]]:
    """{name: (ino, mode)} of a directory, without ``.`` and ``..``."""
    return _parse_ls(run(image, f"ls -p {_spec(path)}"))


def walk(image: Path | str, *, include_lost_found: bool = False, include_root: bool = False) -> dict[str, dict]:
    """{relative path: metadata} of the whole tree; a few debugfs processes, one per depth level."""
    paths: dict[str, int] = {}
    level = [(2, "")]
    while level:
        outs = run_script(image, [f"ls -p <{ino}>" for ino, _ in level])
        nxt = []
        for (_dino, prefix), out in zip(level, outs):
            for name, (ino, mode) in sorted(_parse_ls(out).items()):
                key = f"{prefix}/{name}" if prefix else name
                if key == "lost+found" and not include_lost_found:
                    continue
                paths[key] = ino
                if stat_mod.S_ISDIR(mode):
                    nxt.append((ino, key))
        level = nxt
    if include_root:
        paths[""] = 2
    inos = sorted(set(paths.values()))
    metas = {}
    for ino, out in zip(inos, run_script(image, [f"stat <{i}>" for i in inos])):
        meta = parse_stat(out)
        if meta is None:
            raise RuntimeError(f"inode {ino} has no stat")
        metas[ino] = meta
    _complete(image, list(metas.values()))
    return {k: dict(metas[ino]) for k, ino in sorted(paths.items())}


def superblock(image: Path | str) -> dict[str, str]:
    """``dumpe2fs -h`` as {field: value}."""
    p = subprocess.run(["dumpe2fs", "-h", os.fspath(image)], capture_output=True, env=_ENV, timeout=60, check=True)
    res = {}
    for ln in p.stdout.decode("utf-8", "replace").splitlines():
        k, sep, v = ln.partition(":")
        if sep:
            res[k.strip()] = v.strip()
    return res


# -- the reference side ---------------------------------------------------------------------------

def host_tree(root: Path | str, *, include_root: bool = False) -> dict[str, dict]:
    """The same shape as :func:`walk`, from a host directory (lstat, llistxattr; no following)."""
    root = Path(root)
    res: dict[str, dict] = {}

    def meta(p: str) -> dict[str, Any]:
        st = os.lstat(p)
        kind = next((k for k, v in _IFMT.items() if stat_mod.S_IFMT(st.st_mode) == v), "?")
        names = os.listxattr(p, follow_symlinks=False)
        return {"ino": st.st_ino, "type": kind, "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
                "size": st.st_size if kind in ("reg", "lnk", "dir") else 0, "links": st.st_nlink,
                "mtime": int(st.st_mtime_ns // 10**9), "mtime_ns": st.st_mtime_ns % 10**9,
                "atime": int(st.st_atime_ns // 10**9), "atime_ns": st.st_atime_ns % 10**9,
                "ctime": int(st.st_ctime_ns // 10**9), "ctime_ns": st.st_ctime_ns % 10**9, "crtime": None,
                "crtime_ns": 0,
                "rdev": (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chr", "blk") else None,
                "major": os.major(st.st_rdev) if kind in ("chr", "blk") else None,
                "minor": os.minor(st.st_rdev) if kind in ("chr", "blk") else None,
                "target": _text(os.fsencode(os.readlink(p))) if kind == "lnk" else None,
                "xattrs": {n: os.getxattr(p, n, follow_symlinks=False) for n in names}}

    if include_root:
        res[""] = meta(os.fspath(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            key = os.path.relpath(p, root).replace(os.sep, "/")
            res[key] = meta(p)
    return dict(sorted(res.items()))


# The fields an ext4 built from a tree should reproduce; dir sizes, inode numbers and
# ctime/atime/crtime (host- or build-dependent) are left out, as are sub-second mtimes.
COMPARED = ("type", "mode", "uid", "gid", "links", "mtime", "rdev", "target", "xattrs")


def comparable(tree: dict[str, dict], fields: Iterable[str] = COMPARED, *, with_size: bool = True) -> dict:
    """Project metadata to ``fields`` (plus size for non-directories) for an equality check."""
    fields = tuple(fields)
    res = {}
    for k, m in tree.items():
        d = {f: m.get(f) for f in fields}
        if with_size and m["type"] != "dir":
            d["size"] = m["size"]
        res[k] = d
    return res


class Image:
    """The helpers bound to one image file."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def stat(self, path: str | int) -> dict[str, Any] | None:
        return stat(self.path, path)

    def xattrs(self, path: str | int) -> dict[str, bytes]:
        return xattrs(self.path, path)

    def listdir(self, path: str | int = "/") -> dict[str, tuple[int, int]]:
        return listdir(self.path, path)

    def ls(self, path: str | int = "/") -> list[str]:
        """Sorted names in a directory (no ``.``/``..``)."""
        return sorted(listdir(self.path, path))

    def exists(self, path: str) -> bool:
        return stat(self.path, path) is not None

    def walk(self, **kw: Any) -> dict[str, dict]:
        return walk(self.path, **kw)

    def superblock(self) -> dict[str, str]:
        return superblock(self.path)
