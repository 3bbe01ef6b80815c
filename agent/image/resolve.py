"""In-root path resolution for the layer unpacker (SPEC IMG-14, IMG-15).

Every lookup walks the path one component at a time with ``*at`` system calls relative
to directory file descriptors opened ``O_PATH | O_NOFOLLOW``, so a symlink planted by an
earlier entry can never redirect a later write outside the root: ``..`` stops at the
root, intermediate symlinks are followed *inside* the root (absolute targets re-rooted),
at most ``max_hops`` of them per lookup, and the last component is never followed.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import Callable

from protocol.errors import ImageInvalid

__all__ = ["Resolved", "Resolver", "split", "show", "O_DIRPATH"]

O_DIRPATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def split(path: str) -> list[str]:
    """Components of a tar path, without empty and ``.`` parts (a leading ``/`` vanishes)."""
    return [p for p in path.split("/") if p not in ("", ".")]


def show(name: object) -> str:
    """A tar path made safe for an error message: repr, at most about 200 characters."""
    text = repr(name)
    return text if len(text) <= 200 else text[:197] + "..."


@dataclass(slots=True)
class Resolved:
    """A resolved entry: ``name`` inside the directory ``parent_fd`` (``name`` is None for the root).

    ``parts`` are the symlink-free components from the root, the last one being ``name``.
    The caller must ``close()`` it; the root's own descriptor is never closed here.
    """

    parent_fd: int
    name: str | None
    parts: tuple[str, ...]
    owned: bool

    @property
    def key(self) -> str:
        return "/".join(self.parts)

    def close(self) -> None:
        if self.owned:
            os.close(self.parent_fd)
            self.owned = False


class _Walk:
    """The stack of directories opened so far, below the root descriptor."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.names: list[str] = []
        self.fds: list[int] = []

    @property
    def fd(self) -> int:
        return self.fds[-1] if self.fds else self.root_fd

    def push(self, name: str, fd: int) -> None:
        self.names.append(name)
        self.fds.append(fd)

    def pop(self) -> None:
        self.names.pop()
        os.close(self.fds.pop())

    def reset(self) -> None:
        while self.fds:
            self.pop()

    def finish(self, name: str | None) -> Resolved:
        if name is None and self.names:
            name = self.names[-1]
            self.pop()
        for fd in self.fds[:-1]:
            os.close(fd)
        parts = tuple(self.names) + ((name,) if name is not None else ())
        res = Resolved(self.fd, name, parts, bool(self.fds))
        self.fds, self.names = [], []
        return res


class Resolver:
    """Resolves tar paths inside the directory open as ``root_fd``.

    With ``create=True`` missing intermediate directories are made (mode 0755, owned by
    the caller) and reported to ``on_mkdir`` with their key; otherwise a missing or
    non-directory intermediate component makes ``resolve`` return None.
    """

    def __init__(self, root_fd: int, max_hops: int, on_mkdir: Callable[[str], None] | None = None) -> None:
        self.root_fd = root_fd
        self.max_hops = max_hops
        self.on_mkdir = on_mkdir

    def resolve(self, path: str, *, create: bool = False, entry: str | None = None) -> Resolved | None:
        parts = split(path)
        hops = 0
        walk = _Walk(self.root_fd)
        try:
            while parts:
                comp = parts.pop(0)
                if comp == "..":
                    if walk.names:
                        walk.pop()
                    continue
                if not parts:
                    return walk.finish(comp)  # the last component is never followed
                try:
                    st = os.stat(comp, dir_fd=walk.fd, follow_symlinks=False)
                except FileNotFoundError:
                    if not create:
                        walk.reset()
                        return None
                    os.mkdir(comp, 0o755, dir_fd=walk.fd)
                    # Explicitly: the agent's umask (0077 under systemd) must not reach the image.
                    os.chmod(comp, 0o755, dir_fd=walk.fd)
                    if self.on_mkdir is not None:
                        self.on_mkdir("/".join(walk.names + [comp]))
                    st = os.stat(comp, dir_fd=walk.fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    hops += 1
                    if hops > self.max_hops:
                        raise ImageInvalid(f"layer entry {show(entry if entry is not None else path)}: "
                                           "too many levels of symbolic links")
                    target = os.readlink(comp, dir_fd=walk.fd)
                    if target.startswith("/"):
                        walk.reset()  # absolute targets are re-rooted at the root
                    parts[:0] = split(target)
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    if not create:
                        walk.reset()
                        return None
                    raise ImageInvalid(f"layer entry {show(entry if entry is not None else path)}: "
                                       f"path component {show(comp)} is not a directory")
                walk.push(comp, os.open(comp, O_DIRPATH, dir_fd=walk.fd))
            return walk.finish(None)
        except BaseException:
            walk.reset()
            raise

    def open_exact(self, parts: tuple[str, ...]) -> int | None:
        """Open the directory at symlink-free ``parts`` for reading, refusing any symlink; None if gone."""
        fd = os.dup(self.root_fd)
        try:
            for comp in parts:
                nxt = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None
            raise
        return fd
