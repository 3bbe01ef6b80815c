"""The safe, whiteout-aware layer unpacker (SPEC IMG-12 to IMG-16).

Layers are read as streams with the standard ``tarfile`` reader only; nothing is ever
extracted by ``tarfile`` itself. Every entry is placed through :mod:`agent.image.resolve`,
so all writes happen relative to directory descriptors inside the root.

Order of metadata per entry: ``lchown`` first (it clears setuid/setgid and file
capabilities), then ``chmod``, then xattrs, then times. Directory times are set once at
the very end, deepest first, because creating children changes a directory's mtime.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable

from agent.config import UnpackConfig
from protocol.errors import ImageInvalid, ImageLimitExceeded

from .resolve import Resolved, Resolver, show, split

__all__ = ["UnpackLimits", "UnpackState", "apply_layer", "unpack_layers", "finish_dirs"]

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_WH_WH = ".wh..wh."
_XATTR = "SCHILY.xattr."
_CHUNK = 1 << 20
# Host faults, not image faults: these propagate unchanged.
_HOST_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM)


@dataclass(frozen=True, slots=True)
class UnpackLimits:
    """The IMG-14/IMG-16 limits (``unpack.*`` keys in SPEC §17)."""

    max_bytes: int = 64 << 30
    max_entries: int = 1_000_000
    max_path: int = 4096
    max_xattr: int = 64 << 10
    max_symlink_hops: int = 255

    @classmethod
    def from_config(cls, cfg: UnpackConfig) -> "UnpackLimits":
        return cls(int(cfg.max_bytes), int(cfg.max_entries), int(cfg.max_path), int(cfg.max_xattr),
                   int(cfg.max_symlink_hops))


@dataclass(slots=True)
class UnpackState:
    """Running totals across the layers of one unpack, and the directory times still to set."""

    bytes: int = 0
    entries: int = 0
    dir_times: dict[str, int] = field(default_factory=dict)


class _StrictTar(tarfile.TarFile):
    """``TarFile`` whose ``next()`` ends only at a clean boundary.

    The stock reader silently stops at a corrupt or short header after the first one; here
    those are errors. A stream ending exactly at an entry boundary, without the two zero
    blocks, is still accepted (IMG-16; umoci's own ``insert`` writes such layers).
    """

    def next(self) -> tarfile.TarInfo | None:  # noqa: A003 - the TarFile API name
        self._check("ra")
        if self.firstmember is not None:
            m, self.firstmember = self.firstmember, None
            return m
        if self.offset != self.fileobj.tell():
            if self.offset == 0:
                return None
            self.fileobj.seek(self.offset - 1)
            if not self.fileobj.read(1):
                raise tarfile.ReadError("unexpected end of data")
        try:
            info = self.tarinfo.fromtarfile(self)
        except tarfile.EOFHeaderError:
            info = None  # the end-of-archive zero block; a layer of nothing else is a valid empty layer
        except tarfile.EmptyHeaderError:
            if self.offset == 0:
                raise tarfile.ReadError("empty file") from None
            info = None
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError, tarfile.SubsequentHeaderError) as exc:
            raise tarfile.ReadError(str(exc) or type(exc).__name__) from None
        if info is None:
            self._loaded = True
        return info


def _ns(m: tarfile.TarInfo) -> int:
    """The entry's mtime in nanoseconds, exact: tarfile turns a PAX ``mtime`` such as
    ``1700000000.810114102`` into a float, which keeps only ~7 of its 9 decimals."""
    text = m.pax_headers.get("mtime")
    if text:
        whole, _, frac = text.strip().partition(".")
        try:
            sec = int(whole)
            digits = (frac[:9] if frac.isdigit() else "").ljust(9, "0")
            return sec * 1_000_000_000 + (-int(digits) if sec < 0 or whole.startswith("-") else int(digits))
        except ValueError:
            pass
    return int(round(m.mtime * 1_000_000_000))


class _Layer:
    """Applies one layer's entries; ``touched`` holds this layer's paths and their ancestors."""

    def __init__(self, root_fd: int, limits: UnpackLimits, state: UnpackState) -> None:
        self.root_fd = root_fd
        self.limits = limits
        self.state = state
        self.touched: set[str] = set()
        self.opaque: list[tuple[str, ...]] = []
        self.resolver = Resolver(root_fd, limits.max_symlink_hops, on_mkdir=self._implicit_dir)

    def _implicit_dir(self, key: str) -> None:
        self._touch(key)
        self.state.dir_times.pop(key, None)

    def _touch(self, key: str) -> None:
        parts = key.split("/")
        for i in range(1, len(parts) + 1):
            self.touched.add("/".join(parts[:i]))

    # -- checks -------------------------------------------------------------------------

    def _check(self, m: tarfile.TarInfo) -> dict[str, bytes]:
        lim, st = self.limits, self.state
        st.entries += 1
        if st.entries > lim.max_entries:
            raise ImageLimitExceeded(f"layer entry {show(m.name)}: more than {lim.max_entries} entries",
                                     {"limit": "entries", "path": show(m.name)})
        for text in (m.name, m.linkname):
            if len(os.fsencode(text)) > lim.max_path:
                raise ImageLimitExceeded(f"layer entry {show(m.name)}: path longer than {lim.max_path} bytes",
                                         {"limit": "path", "path": show(m.name)})
        xattrs: dict[str, bytes] = {}
        for key, value in m.pax_headers.items():
            if key.startswith(_XATTR):
                raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
                if len(raw) > lim.max_xattr:
                    raise ImageLimitExceeded(
                        f"layer entry {show(m.name)}: xattr {show(key[len(_XATTR):])} value larger than "
                        f"{lim.max_xattr} bytes", {"limit": "xattr", "path": show(m.name)})
                xattrs[key[len(_XATTR):]] = raw
        if m.isreg():
            if st.bytes + m.size > lim.max_bytes:
                raise ImageLimitExceeded(f"layer entry {show(m.name)}: unpacked size over {lim.max_bytes} bytes",
                                         {"limit": "bytes", "path": show(m.name)})
            st.bytes += m.size
        return xattrs

    # -- entries ------------------------------------------------------------------------

    def entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        xattrs = self._check(m)
        parts = split(m.name)
        base = parts[-1] if parts else ""
        if any(p.startswith(_WH_WH) for p in parts[:-1]):
            return  # inside an aufs .wh..wh.* directory (e.g. .wh..wh.plnk): ignored (IMG-13)
        if base.startswith(WHITEOUT):
            self._whiteout(m, base)
            return
        if not (m.isreg() or m.isdir() or m.issym() or m.islnk() or m.ischr() or m.isblk() or m.isfifo()):
            raise ImageInvalid(f"layer entry {show(m.name)}: unsupported tar entry type {m.type!r}")
        res = self.resolver.resolve(m.name, create=True, entry=m.name)
        assert res is not None  # create=True never answers None
        try:
            self._place(tf, m, res, xattrs)
        finally:
            res.close()

    def _whiteout(self, m: tarfile.TarInfo, base: str) -> None:
        res = self.resolver.resolve(m.name, entry=m.name)
        if res is None:
            return  # the directory does not exist: nothing to hide
        try:
            parent = res.parts[:-1]
            if base == OPAQUE:
                self.opaque.append(parent)
            elif base.startswith(_WH_WH) or base[len(WHITEOUT):] in ("", ".", ".."):
                return  # other .wh..wh.* markers are ignored (IMG-13)
            else:
                name = base[len(WHITEOUT):]
                key = "/".join(parent + (name,))
                if key not in self.touched:
                    _remove(res.parent_fd, name)
        finally:
            res.close()

    def _place(self, tf: tarfile.TarFile, m: tarfile.TarInfo, res: Resolved, xattrs: dict[str, bytes]) -> None:
        pfd, name = res.parent_fd, res.name
        if name is None:  # the root itself
            if not m.isdir():
                raise ImageInvalid(f"layer entry {show(m.name)}: only a directory may stand for the root")
            os.chown(self.root_fd, m.uid, m.gid)
            os.chmod(self.root_fd, stat.S_IMODE(m.mode))
            _set_xattrs_fd(self.root_fd, xattrs)
            self.state.dir_times[""] = _ns(m)
            return
        try:
            cur = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            cur = None
        target: Resolved | None = None
        if m.islnk():
            target = self.resolver.resolve(m.linkname, entry=m.name)
            try:
                tst = os.stat(target.name, dir_fd=target.parent_fd, follow_symlinks=False) \
                    if target is not None and target.name is not None else None
            except FileNotFoundError:
                tst = None
            if tst is None or stat.S_ISDIR(tst.st_mode):
                if target is not None:
                    target.close()
                raise ImageInvalid(f"layer entry {show(m.name)}: hardlink target {show(m.linkname)} "
                                   "is not an existing non-directory inside the root")
            if target.parts == res.parts:
                target.close()
                self._touch(res.key)
                return
        try:
            if cur is not None and not (m.isdir() and stat.S_ISDIR(cur.st_mode)):
                _remove(pfd, name)  # any entry but dir-over-dir replaces what is there (IMG-13)
            self._touch(res.key)
            if m.isreg():
                self._file(tf, m, pfd, name, xattrs)
                return
            if m.isdir():
                if cur is None or not stat.S_ISDIR(cur.st_mode):
                    os.mkdir(name, 0o700, dir_fd=pfd)
                self.state.dir_times[res.key] = _ns(m)
            elif m.issym():
                os.symlink(m.linkname, name, dir_fd=pfd)
            elif m.islnk():
                assert target is not None and target.name is not None
                os.link(target.name, name, src_dir_fd=target.parent_fd, dst_dir_fd=pfd, follow_symlinks=False)
                return  # a hardlink shares the target's inode and its metadata
            elif m.ischr() or m.isblk():
                kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                os.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)
            else:
                os.mkfifo(name, 0o600, dir_fd=pfd)
        finally:
            if target is not None:
                target.close()
        os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        if not m.issym():  # Linux symlinks have no mode of their own
            os.chmod(name, stat.S_IMODE(m.mode), dir_fd=pfd)  # just created or lstat'ed: not a symlink
        if xattrs:
            for key, value in xattrs.items():
                try:
                    os.setxattr(f"/proc/self/fd/{pfd}/{name}", key, value, follow_symlinks=False)
                except OSError as exc:
                    if not (m.issym() and exc.errno in (errno.EPERM, errno.ENOTSUP)):
                        raise
        if not m.isdir():
            t = _ns(m)
            os.utime(name, ns=(t, t), dir_fd=pfd, follow_symlinks=False)

    def _file(self, tf: tarfile.TarFile, m: tarfile.TarInfo, pfd: int, name: str, xattrs: dict[str, bytes]) -> None:
        src = tf.extractfile(m)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
        try:
            if src is not None:
                while chunk := src.read(_CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            os.fchown(fd, m.uid, m.gid)
            os.fchmod(fd, stat.S_IMODE(m.mode))
            _set_xattrs_fd(fd, xattrs)
            t = _ns(m)
            os.utime(fd, ns=(t, t))
        finally:
            os.close(fd)

    def finish(self) -> None:
        """Hide lower-layer children of this layer's opaque directories (IMG-13)."""
        for parts in self.opaque:
            fd = self.resolver.open_exact(parts)
            if fd is None:
                continue
            todo = [(fd, "/".join(parts))]
            while todo:
                dfd, prefix = todo.pop()
                try:
                    for child in os.listdir(dfd):
                        key = f"{prefix}/{child}" if prefix else child
                        if key not in self.touched:
                            _remove(dfd, child)
                            continue
                        st = os.stat(child, dir_fd=dfd, follow_symlinks=False)
                        if stat.S_ISDIR(st.st_mode):
                            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                            todo.append((os.open(child, flags, dir_fd=dfd), key))
                finally:
                    os.close(dfd)


def _set_xattrs_fd(fd: int, xattrs: dict[str, bytes]) -> None:
    for key, value in xattrs.items():
        os.setxattr(fd, key, value)


def _remove(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd`` without following symlinks; a directory goes with its tree."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def apply_layer(root: Path, stream: BinaryIO, limits: UnpackLimits, state: UnpackState) -> None:
    """Apply one decompressed tar layer onto ``root`` (IMG-12..IMG-16).

    Raises ImageInvalid for a corrupt or truncated tar or an entry breaking the rules, and
    ImageLimitExceeded (``details.limit``: bytes, entries, path or xattr) for a limit breach.
    Directory times are not set here; :func:`finish_dirs` does that after the last layer.
    """
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    current = "<header>"
    try:
        layer = _Layer(root_fd, limits, state)
        try:
            tf = _StrictTar.open(fileobj=stream, mode="r|", errorlevel=2)
            for m in tf:
                current = m.name
                layer.entry(tf, m)
                tf.members.clear()  # a streamed layer may hold a million entries
            layer.finish()
        except tarfile.TarError as exc:
            raise ImageInvalid(f"corrupt or truncated tar at layer entry {show(current)}: {exc}",
                               {"path": show(current)}) from None
        except (ImageInvalid, ImageLimitExceeded):
            raise
        except OSError as exc:
            if exc.errno in _HOST_ERRNOS:
                raise
            raise ImageInvalid(f"layer entry {show(current)}: {exc.strerror or exc}",
                               {"path": show(current)}) from None
    finally:
        os.close(root_fd)


def finish_dirs(root: Path, state: UnpackState, only: Iterable[str] | None = None) -> None:
    """Set recorded directory times, children before parents (atime = mtime); with ``only``,
    just for those directory keys (the ones an upper layer changed, see ``chains``)."""
    keys = state.dir_times if only is None else [k for k in only if k in state.dir_times]
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        resolver = Resolver(root_fd, 0)
        for key in sorted(keys, key=lambda k: (-k.count("/") if k else 1, k)):
            t = state.dir_times[key]
            if not key:
                os.utime(root_fd, ns=(t, t))
                continue
            parts = tuple(key.split("/"))
            pfd = resolver.open_exact(parts[:-1])
            if pfd is None:
                continue
            try:
                st = os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    os.utime(parts[-1], ns=(t, t), dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            finally:
                os.close(pfd)
    finally:
        os.close(root_fd)


def unpack_layers(root: Path, streams: Iterable[BinaryIO], limits: UnpackLimits) -> UnpackState:
    """Apply ``streams`` in order onto the empty (or missing) directory ``root``.

    On any failure ``root`` is removed entirely and the error re-raised (IMG-16).
    """
    root = Path(root)
    root.mkdir(mode=0o755, exist_ok=True)
    os.chmod(root, 0o755)  # a header-less root is 0755 whatever the umask (IMG-20)
    if any(root.iterdir()):
        raise ImageInvalid(f"unpack directory {show(str(root))} is not empty")
    state = UnpackState()
    try:
        for stream in streams:
            apply_layer(root, stream, limits, state)
        finish_dirs(root, state)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return state
