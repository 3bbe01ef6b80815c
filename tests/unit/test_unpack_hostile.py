"""A hostile layer corpus (SPEC IMG-14, IMG-15, IMG-16): nothing outside the root may change.

Every case runs next to a SENTINEL directory outside the root and compares a full snapshot
of it (names, modes, owners, sizes, mtimes, contents, link targets) before and after.
"""
from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path
from typing import Callable

import pytest

from agent.image.unpack import UnpackLimits, unpack_layers
from protocol.errors import ImageInvalid, ImageLimitExceeded
from tests.layers import MTIME, Char, Dir, File, Hardlink, Opaque, Raw, Symlink, Whiteout, layer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="owners and devices need root")

Snapshot = dict[str, tuple]


def snapshot(top: Path) -> Snapshot:
    out: Snapshot = {}
    for path in [top, *sorted(top.rglob("*"))]:
        st = os.lstat(path)
        body: object = None
        if stat.S_ISREG(st.st_mode):
            body = path.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            body = os.readlink(path)
        xattrs = {} if stat.S_ISLNK(st.st_mode) else {k: os.getxattr(path, k) for k in os.listxattr(path)}
        out[str(path.relative_to(top))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                                           st.st_nlink, body, xattrs)
    return out


class Env:
    """``tmp/sentinel`` (outside) and ``tmp/root`` (the unpack dir), two levels below tmp."""

    def __init__(self, tmp_path: Path) -> None:
        self.base = tmp_path / "a" / "b"
        self.sentinel = self.base / "sentinel"
        self.sentinel.mkdir(parents=True)
        (self.sentinel / "secret").write_bytes(b"do not touch")
        (self.sentinel / "secret").chmod(0o600)
        (self.sentinel / "dir").mkdir()
        (self.sentinel / "dir" / "inner").write_bytes(b"inner")
        os.setxattr(self.sentinel / "secret", "user.keep", b"1")
        os.utime(self.sentinel / "dir", ns=(MTIME * 10**9, MTIME * 10**9))
        self.root = self.base / "root"
        self.before = snapshot(self.base.parent.parent)
        self.names_before = sorted(os.listdir(self.base))

    def unpack(self, *layers: bytes, limits: UnpackLimits = UnpackLimits()) -> Path:
        unpack_layers(self.root, [io.BytesIO(d) for d in layers], limits)
        return self.root

    def assert_host_untouched(self) -> None:
        after = {k: v for k, v in snapshot(self.base.parent.parent).items()
                 if not (k.startswith("a/b/root") or k in ("", "a", "a/b"))}
        before = {k: v for k, v in self.before.items() if k not in ("", "a", "a/b")}
        assert after == before
        assert sorted(n for n in os.listdir(self.base) if n != "root") == self.names_before


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def _inside(env: Env, rel: str, body: bytes) -> None:
    assert (env.root / rel).read_bytes() == body


# name, layers (given the Env), what must hold inside the root afterwards
ESCAPES_THAT_LAND_INSIDE: list[tuple[str, Callable[[Env], list[bytes]], Callable[[Env], None]]] = [
    ("dotdot", lambda e: [layer([File("../x", b"1"), File("../sentinel/secret", b"pwn")])],
     lambda e: (_inside(e, "x", b"1"), _inside(e, "sentinel/secret", b"pwn"))),
    ("a-dotdot-dotdot", lambda e: [layer([File("a/../../x", b"2"), File("a/../../../../../../etc/tc-img14", b"3")])],
     lambda e: (_inside(e, "x", b"2"), _inside(e, "etc/tc-img14", b"3"))),
    ("absolute", lambda e: [layer([File(str(e.sentinel / "secret"), b"pwn"), File("/etc/tc-img14-abs", b"4")])],
     lambda e: (_inside(e, str(e.sentinel / "secret")[1:], b"pwn"), _inside(e, "etc/tc-img14-abs", b"4"))),
    ("symlink-to-slash-then-write", lambda e: [
        layer([Symlink("evil", "/")]),
        layer([File(f"evil{e.sentinel}/secret", b"pwn"), Dir(f"evil{e.sentinel}/dir", mode=0o777, uid=99),
               Char(f"evil{e.sentinel}/dev", 1, 3)])],
     lambda e: _inside(e, f"{e.sentinel}/secret"[1:], b"pwn")),
    ("symlink-to-sentinel-then-write", lambda e: [
        layer([Symlink("evil", str(e.sentinel)), File("evil/secret", b"pwn"), File("evil/dir/inner", b"pwn"),
               Symlink("evil/new", "/etc/passwd")])],
     lambda e: _inside(e, f"{e.sentinel}/secret"[1:], b"pwn")),
    ("relative-symlink-up-then-write", lambda e: [
        layer([Symlink("up", "../../.."), Dir("d"), Symlink("d/up2", "../../sentinel")]),
        layer([File("up/sentinel/secret", b"pwn"), File("d/up2/secret", b"pwn2")])],
     lambda e: (_inside(e, "sentinel/secret", b"pwn2"),)),
    ("last-component-symlink-is-replaced", lambda e: [
        layer([Symlink("s", str(e.sentinel / "secret")), Symlink("t", str(e.sentinel / "dir"))]),
        layer([File("s", b"mine", mode=0o4777, uid=5), Dir("t", mode=0o777, uid=5)])],
     lambda e: (_inside(e, "s", b"mine"), os.path.isdir(e.root / "t") and not os.path.islink(e.root / "t"))),
    ("whiteout-and-opaque-through-symlink", lambda e: [
        layer([Symlink("evil", str(e.sentinel)), Symlink("up", "../../sentinel")]),
        layer([Whiteout("evil/secret"), Whiteout("up/dir"), Opaque("evil"), Opaque("up"),
               Whiteout("../../sentinel/secret")])],
     lambda e: None),
]


@pytest.mark.parametrize("case", ESCAPES_THAT_LAND_INSIDE, ids=[c[0] for c in ESCAPES_THAT_LAND_INSIDE])
def test_escape_attempts_land_inside_the_root(env: Env, case) -> None:
    """IMG-14: '..' stops at the root, absolute names and symlink targets are re-rooted; the host is untouched."""
    _, make, check = case
    env.unpack(*make(env))
    check(env)
    env.assert_host_untouched()


def _loop(e: Env) -> list[bytes]:
    return [layer([Symlink("a", "b"), Symlink("b", "/a"), File("a/x", b"1")])]


FAILURES: list[tuple[str, Callable[[Env], list[bytes]], type, str]] = [
    ("hardlink-to-outside-absolute", lambda e: [layer([Hardlink("h", target=str(e.sentinel / "secret"))])],
     ImageInvalid, "hardlink target"),
    ("hardlink-to-outside-dotdot", lambda e: [layer([Hardlink("h", target="../sentinel/secret")])],
     ImageInvalid, "hardlink target"),
    ("hardlink-through-symlink", lambda e: [layer([Symlink("e", str(e.sentinel)), Hardlink("h", target="e/secret")])],
     ImageInvalid, "hardlink target"),
    ("hardlink-to-directory", lambda e: [layer([Dir("d"), Hardlink("h", target="d")])], ImageInvalid, "hardlink"),
    ("hardlink-to-missing", lambda e: [layer([Hardlink("h", target="nope")])], ImageInvalid, "'h'"),
    ("symlink-loop", _loop, ImageInvalid, "too many levels of symbolic links"),
    ("self-loop", lambda e: [layer([Symlink("l", "l/l"), File("l/x")])], ImageInvalid, "too many levels"),
    ("file-as-directory", lambda e: [layer([File("f"), File("f/x")])], ImageInvalid, "not a directory"),
    ("garbage", lambda e: [b"this is not a tar archive at all" * 40], ImageInvalid, "corrupt"),
    ("empty-stream", lambda e: [b""], ImageInvalid, "corrupt"),
    ("truncated-entry", lambda e: [layer([File("ok", b"1")], trailer=False) + _short_entry()],
     ImageInvalid, "'short'"),
    ("truncated-raw-entry", lambda e: [layer([Raw(_sized("lie", 4096), b"only this")], trailer=False)],
     ImageInvalid, "'lie'"),
    ("truncated-header", lambda e: [layer([File("ok", b"1")], trailer=False) + _short_entry()[:300]],
     ImageInvalid, "truncated"),
    ("corrupt-second-header", lambda e: [layer([File("ok", b"1")], trailer=False) + b"\x01" * 512 + b"\0" * 1024],
     ImageInvalid, "corrupt"),
    ("unsupported-type", lambda e: [layer([Raw(_typed("weird", b"Z"))])], ImageInvalid, "unsupported"),
]


def _short_entry() -> bytes:
    """A header promising 5000 bytes followed by only 1024."""
    info = tarfile.TarInfo("short")
    info.size, info.mtime = 5000, MTIME
    return info.tobuf(tarfile.PAX_FORMAT) + b"z" * 1024


def _sized(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = size, MTIME
    return info


def _typed(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mtime = kind, MTIME
    return info


@pytest.mark.parametrize("case", FAILURES, ids=[c[0] for c in FAILURES])
def test_hostile_layers_are_rejected_and_the_unpack_dir_removed(env: Env, case) -> None:
    """IMG-14/IMG-15/IMG-16: escapes, loops and corrupt tars give ImageInvalid naming the entry; root removed."""
    _, make, exc, needle = case
    with pytest.raises(exc) as info:
        env.unpack(*make(env), limits=UnpackLimits(max_symlink_hops=40))
    assert type(info.value) is exc
    assert needle in info.value.message
    assert not env.root.exists()
    env.assert_host_untouched()


LIMITS: list[tuple[str, list[bytes], UnpackLimits, str]] = [
    ("entries", [layer([File("a"), File("b")]), layer([Dir("c"), Whiteout("a")])], UnpackLimits(max_entries=3),
     "entries"),
    ("bytes", [layer([File("a", b"x" * 600)]), layer([File("b", b"y" * 500)])], UnpackLimits(max_bytes=1000),
     "bytes"),
    ("path", [layer([File("d/" + "p" * 60)])], UnpackLimits(max_path=50), "path"),
    ("symlink-target-path", [layer([Symlink("s", "t" * 60)])], UnpackLimits(max_path=50), "path"),
    ("xattr", [layer([File("f", xattrs={"user.big": b"v" * 101})])], UnpackLimits(max_xattr=100), "xattr"),
]


@pytest.mark.parametrize("case", LIMITS, ids=[c[0] for c in LIMITS])
def test_limits_give_image_limit_exceeded_and_remove_the_unpack_dir(env: Env, case) -> None:
    """IMG-16: each limit breach is ImageLimitExceeded naming the limit and the entry; the unpack dir is removed."""
    _, layers, limits, which = case
    with pytest.raises(ImageLimitExceeded) as info:
        env.unpack(*layers, limits=limits)
    assert info.value.details["limit"] == which
    assert not env.root.exists()
    env.assert_host_untouched()


def test_limits_at_the_boundary_are_accepted(env: Env) -> None:
    """IMG-16: exactly the limit is allowed (the check is 'more than')."""
    env.unpack(layer([File("a", b"x" * 10), File("b" * 10, xattrs={"user.v": b"1" * 8})]),
               limits=UnpackLimits(max_entries=2, max_bytes=10, max_path=10, max_xattr=8))
    assert (env.root / "a").read_bytes() == b"x" * 10


def test_error_messages_are_sanitised_and_bounded(env: Env) -> None:
    """IMG-16: the offending path is shown as a repr, truncated to about 200 characters."""
    evil = "x\n\x1b[31m" + "y" * 3000
    with pytest.raises(ImageLimitExceeded) as info:
        env.unpack(layer([File(evil)]), limits=UnpackLimits(max_path=100))
    assert "\n" not in info.value.message and "\x1b" not in info.value.message
    assert len(info.value.message) < 320


def test_symlink_hops_are_counted(env: Env) -> None:
    """IMG-14: a chain of N symlinks passes with max_symlink_hops >= N and fails with fewer."""
    chain = [Symlink(f"l{i}", f"l{i + 1}") for i in range(5)] + [Dir("l5"), File("l0/x", b"ok")]
    env.unpack(layer(chain), limits=UnpackLimits(max_symlink_hops=5))
    _inside(env, "l5/x", b"ok")
    env2 = Env(env.base.parent.parent / "second")
    with pytest.raises(ImageInvalid, match="too many levels"):
        env2.unpack(layer(chain), limits=UnpackLimits(max_symlink_hops=4))
