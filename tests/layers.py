"""Build tar layers in memory from a declarative entry list (no internet, no tools).

    data = layer([Dir("etc"), File("etc/os-release", b"ID=test\n"), Symlink("bin", "usr/bin"),
                  Whiteout("usr/share/doc"), Opaque("etc/conf.d")])

The result is an uncompressed PAX tar, deterministic (fixed mtimes, entry order as given,
empty user/group names). ``gzip_layer`` compresses it deterministically. Reusable by the
OCI image writer: ``digest(data)`` gives the ``sha256:`` diff id.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from dataclasses import KW_ONLY, dataclass, field
from typing import Sequence, Union

__all__ = ["MTIME", "File", "Dir", "Symlink", "Hardlink", "Char", "Block", "Fifo", "Whiteout", "Opaque",
           "Raw", "Entry", "layer", "gzip_layer", "digest"]

MTIME = 1_700_000_000


@dataclass(frozen=True)
class _Meta:
    path: str
    _: KW_ONLY
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = MTIME
    xattrs: dict[str, bytes] = field(default_factory=dict)

    def info(self, kind: bytes) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(self.path)
        ti.type = kind
        ti.mode, ti.uid, ti.gid, ti.mtime = self.mode, self.uid, self.gid, self.mtime
        ti.uname = ti.gname = ""
        if self.xattrs:
            ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                              for k, v in self.xattrs.items()}
        return ti


@dataclass(frozen=True)
class File(_Meta):
    data: bytes = b""


@dataclass(frozen=True)
class Dir(_Meta):
    mode: int = field(default=0o755, kw_only=True)


@dataclass(frozen=True)
class Symlink(_Meta):
    target: str = ""
    mode: int = field(default=0o777, kw_only=True)


@dataclass(frozen=True)
class Hardlink(_Meta):
    target: str = ""


@dataclass(frozen=True)
class Char(_Meta):
    major: int = 0
    minor: int = 0
    mode: int = field(default=0o666, kw_only=True)


@dataclass(frozen=True)
class Block(_Meta):
    major: int = 0
    minor: int = 0
    mode: int = field(default=0o660, kw_only=True)


@dataclass(frozen=True)
class Fifo(_Meta):
    pass


@dataclass(frozen=True)
class Whiteout:
    """Deletes ``path`` from lower layers: an empty file ``dir/.wh.name``."""

    path: str


@dataclass(frozen=True)
class Opaque:
    """Hides the lower-layer children of directory ``path``: ``path/.wh..wh..opq``."""

    path: str


@dataclass(frozen=True)
class Raw:
    """A hand-made header; ``data`` is written after it (its length need not match ``info.size``)."""

    info: tarfile.TarInfo
    data: bytes = b""


Entry = Union[File, Dir, Symlink, Hardlink, Char, Block, Fifo, Whiteout, Opaque, Raw]


def _marker(path: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(path)
    ti.mode, ti.mtime, ti.uname, ti.gname = 0o644, MTIME, "", ""
    return ti


def _write(tf: tarfile.TarFile, buf: io.BytesIO, e: Entry) -> None:
    if isinstance(e, Raw):
        # Written by hand so a header may lie about its size (truncation fixtures).
        buf.write(e.info.tobuf(tarfile.PAX_FORMAT, tf.encoding, tf.errors))
        buf.write(e.data)
        if len(e.data) % tarfile.BLOCKSIZE:
            buf.write(b"\0" * (tarfile.BLOCKSIZE - len(e.data) % tarfile.BLOCKSIZE))
        tf.offset = buf.tell()
        return
    if isinstance(e, Whiteout):
        head, _, name = e.path.rstrip("/").rpartition("/")
        tf.addfile(_marker(f"{head}/.wh.{name}" if head else f".wh.{name}"))
        return
    if isinstance(e, Opaque):
        tf.addfile(_marker(f"{e.path.rstrip('/')}/.wh..wh..opq"))
        return
    if isinstance(e, File):
        ti = e.info(tarfile.REGTYPE)
        ti.size = len(e.data)
        tf.addfile(ti, io.BytesIO(e.data))
        return
    if isinstance(e, Dir):
        tf.addfile(e.info(tarfile.DIRTYPE))
    elif isinstance(e, Symlink):
        ti = e.info(tarfile.SYMTYPE)
        ti.linkname = e.target
        tf.addfile(ti)
    elif isinstance(e, Hardlink):
        ti = e.info(tarfile.LNKTYPE)
        ti.linkname = e.target
        tf.addfile(ti)
    elif isinstance(e, (Char, Block)):
        ti = e.info(tarfile.CHRTYPE if isinstance(e, Char) else tarfile.BLKTYPE)
        ti.devmajor, ti.devminor = e.major, e.minor
        tf.addfile(ti)
    elif isinstance(e, Fifo):
        tf.addfile(e.info(tarfile.FIFOTYPE))
    else:
        raise TypeError(f"not a layer entry: {e!r}")


def layer(entries: Sequence[Entry], *, trailer: bool = True) -> bytes:
    """An uncompressed PAX tar of ``entries`` in order; ``trailer=False`` omits the end-of-archive blocks."""
    buf = io.BytesIO()
    tf = tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT)
    for e in entries:
        _write(tf, buf, e)
    if not trailer:
        return buf.getvalue()
    tf.close()
    return buf.getvalue()


def gzip_layer(data: bytes) -> bytes:
    """Deterministic gzip (no name, mtime 0), as ``application/vnd.oci.image.layer.v1.tar+gzip``."""
    return gzip.compress(data, compresslevel=6, mtime=0)


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
