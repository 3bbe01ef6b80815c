"""The layer unpacker on well-formed layers (SPEC IMG-12, IMG-13, IMG-16), checked with os.lstat."""
from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from agent.config import UnpackConfig
from agent.image.unpack import UnpackLimits, UnpackState, apply_layer, unpack_layers
from tests.layers import (MTIME, Block, Char, Dir, Fifo, File, Hardlink, Opaque, Raw, Symlink, Whiteout,
                          gzip_layer, layer)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="owners and devices need root")

NS = MTIME * 1_000_000_000


def unpack(tmp_path: Path, *layers: bytes, limits: UnpackLimits = UnpackLimits()) -> Path:
    root = tmp_path / "root"
    unpack_layers(root, [io.BytesIO(data) for data in layers], limits)
    return root


def listing(root: Path) -> set[str]:
    out = set()
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


def test_regular_file_keeps_content_owner_mode_and_times(tmp_path: Path) -> None:
    """IMG-12: content, numeric uid/gid, setuid/setgid bits (chown before chmod), mtime and atime = mtime."""
    root = unpack(tmp_path, layer([File("usr/bin/su", b"#!x\n", mode=0o6755, uid=1234, gid=4321, mtime=MTIME + 7)]))
    st = os.lstat(root / "usr/bin/su")
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o6755
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    assert st.st_mtime_ns == st.st_atime_ns == NS + 7_000_000_000
    assert (root / "usr/bin/su").read_bytes() == b"#!x\n"


def test_directories_keep_sticky_setgid_owner_and_times_after_children(tmp_path: Path) -> None:
    """IMG-12: dir modes incl. sticky/setgid; dir mtimes are set after their children are written."""
    root = unpack(tmp_path, layer([
        Dir("var", mtime=MTIME + 1), Dir("var/tmp", mode=0o1777, mtime=MTIME + 2),
        Dir("srv", mode=0o2750, uid=7, gid=8, mtime=MTIME + 3),
        File("var/tmp/f", b"x"), File("srv/a/b", b"y"),
    ]))
    tmp = os.lstat(root / "var/tmp")
    assert stat.S_IMODE(tmp.st_mode) == 0o1777 and tmp.st_mtime_ns == tmp.st_atime_ns == NS + 2_000_000_000
    assert os.lstat(root / "var").st_mtime_ns == NS + 1_000_000_000
    srv = os.lstat(root / "srv")
    assert stat.S_IMODE(srv.st_mode) == 0o2750 and (srv.st_uid, srv.st_gid) == (7, 8)
    assert srv.st_mtime_ns == NS + 3_000_000_000
    implicit = os.lstat(root / "srv/a")
    assert stat.S_ISDIR(implicit.st_mode) and implicit.st_mode & 0o777 == 0o755  # setgid is inherited


def test_symlinks_keep_target_text_owner_and_time(tmp_path: Path) -> None:
    """IMG-12: symlink target text verbatim (absolute, relative, dangling), lchown, mtime of the link itself."""
    root = unpack(tmp_path, layer([
        Symlink("abs", "/usr/bin/nothing", uid=11, gid=12, mtime=MTIME + 5),
        Symlink("rel", "../../x//y/./z"), Symlink("dot", "."),
    ]))
    assert os.readlink(root / "abs") == "/usr/bin/nothing"
    assert os.readlink(root / "rel") == "../../x//y/./z"
    assert os.readlink(root / "dot") == "."
    st = os.lstat(root / "abs")
    assert stat.S_ISLNK(st.st_mode) and (st.st_uid, st.st_gid) == (11, 12)
    assert st.st_mtime_ns == NS + 5_000_000_000


def test_hardlinks_share_the_inode(tmp_path: Path) -> None:
    """IMG-12/IMG-15: a hardlink is the same inode as its target (st_nlink 2)."""
    root = unpack(tmp_path, layer([File("usr/bin/a", b"AAA", mode=0o755), Hardlink("usr/bin/b", target="usr/bin/a"),
                                   Symlink("s", "usr/bin/a"), Hardlink("s2", target="/s")]))
    a, b = os.lstat(root / "usr/bin/a"), os.lstat(root / "usr/bin/b")
    assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev) and a.st_nlink == 2
    assert os.lstat(root / "s2").st_ino == os.lstat(root / "s").st_ino  # links the symlink, not its target


def test_devices_and_fifos(tmp_path: Path) -> None:
    """IMG-12: char/block devices with major/minor, fifos, their owners and modes."""
    root = unpack(tmp_path, layer([Char("dev/null", 1, 3, mode=0o666), Block("dev/loop0", 7, 0, mode=0o660, gid=6),
                                   Fifo("run/initctl", mode=0o600, uid=3)]))
    null, loop, fifo = (os.lstat(root / p) for p in ("dev/null", "dev/loop0", "run/initctl"))
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    assert stat.S_ISBLK(loop.st_mode) and (os.major(loop.st_rdev), os.minor(loop.st_rdev)) == (7, 0)
    assert loop.st_gid == 6 and stat.S_IMODE(loop.st_mode) == 0o660
    assert stat.S_ISFIFO(fifo.st_mode) and fifo.st_uid == 3 and stat.S_IMODE(fifo.st_mode) == 0o600


def test_pax_xattrs_are_applied(tmp_path: Path) -> None:
    """IMG-12: PAX SCHILY.xattr.* become xattrs on files and directories."""
    root = unpack(tmp_path, layer([File("f", b"", xattrs={"user.one": b"1", "trusted.two": b"\x01\x02"}),
                                   Dir("d", xattrs={"user.dir": b"yes"})]))
    assert os.getxattr(root / "f", "user.one") == b"1"
    assert os.getxattr(root / "f", "trusted.two") == b"\x01\x02"
    assert os.getxattr(root / "d", "user.dir") == b"yes"


def test_whiteout_deletes_lower_file_and_tree(tmp_path: Path) -> None:
    """IMG-13: .wh.NAME deletes NAME (file or whole dir) from lower layers; no whiteout file remains."""
    root = unpack(tmp_path,
                  layer([File("etc/keep"), File("etc/gone"), File("usr/share/doc/a/b"), File("usr/share/man")]),
                  layer([Whiteout("etc/gone"), Whiteout("usr/share/doc"), Whiteout("not/there")]))
    assert listing(root) == {"etc", "etc/keep", "usr", "usr/share", "usr/share/man"}


def test_opaque_dir_hides_lower_children_but_keeps_same_layer_entries(tmp_path: Path) -> None:
    """IMG-13: .wh..wh..opq hides the dir's lower-layer children; entries of the same layer stay, in any order."""
    root = unpack(tmp_path,
                  layer([File("etc/conf.d/old"), File("etc/conf.d/sub/lower"), File("etc/conf.d/sub2/x"),
                         File("etc/other")]),
                  layer([File("etc/conf.d/before", b"b"), Opaque("etc/conf.d"), File("etc/conf.d/after", b"a"),
                         File("etc/conf.d/sub/upper")]))
    assert listing(root) == {"etc", "etc/other", "etc/conf.d", "etc/conf.d/before", "etc/conf.d/after",
                             "etc/conf.d/sub", "etc/conf.d/sub/upper"}
    assert (root / "etc/conf.d/before").read_bytes() == b"b"


def test_opaque_marker_in_first_layer_and_other_wh_wh_names_are_ignored(tmp_path: Path) -> None:
    """IMG-13: other .wh..wh.* names are ignored and never appear; an opaque dir keeps its own layer's files."""
    plnk = Raw(File(".wh..wh.plnk/123").info(b"0"))
    root = unpack(tmp_path, layer([File("d/x"), Opaque("d"), plnk, File("e/.wh..wh.foo")]))
    assert listing(root) == {"d", "d/x"}


def test_file_over_dir_removes_the_tree_and_dir_over_dir_merges(tmp_path: Path) -> None:
    """IMG-13: a non-dir entry replaces what is at its path; a dir over a dir merges metadata, children stay."""
    root = unpack(tmp_path,
                  layer([File("a/deep/x"), Dir("b", mode=0o700, uid=1), File("b/child"), File("c"),
                         Symlink("d", "a")]),
                  layer([File("a", b"now a file"), Dir("b", mode=0o751, uid=2, mtime=MTIME + 9), Dir("c"),
                         File("d", b"file")]))
    assert (root / "a").read_bytes() == b"now a file"
    b = os.lstat(root / "b")
    assert stat.S_IMODE(b.st_mode) == 0o751 and b.st_uid == 2 and b.st_mtime_ns == NS + 9_000_000_000
    assert (root / "b/child").exists()
    assert stat.S_ISDIR(os.lstat(root / "c").st_mode)
    assert stat.S_ISREG(os.lstat(root / "d").st_mode) and (root / "d").read_bytes() == b"file"


def test_intermediate_symlinks_resolve_inside_the_root(tmp_path: Path) -> None:
    """IMG-14: intermediate symlinks are followed inside the root, absolute targets re-rooted."""
    root = unpack(tmp_path, layer([Dir("usr/lib"), Symlink("lib", "usr/lib"), Symlink("lib64", "/usr/lib"),
                                   File("lib/a"), File("lib64/b"), File("/lib/../c")]))
    assert {"usr/lib/a", "usr/lib/b", "usr/c"} <= listing(root)
    assert os.path.islink(root / "lib")


def test_root_entry_sets_root_metadata(tmp_path: Path) -> None:
    """IMG-12: a "./" entry applies its owner, mode and mtime to the root itself."""
    root = unpack(tmp_path, layer([Dir("./", mode=0o751, uid=9, mtime=MTIME + 4), File("f")]))
    st = os.lstat(root)
    assert stat.S_IMODE(st.st_mode) == 0o751 and st.st_uid == 9 and st.st_mtime_ns == NS + 4_000_000_000


def test_missing_end_of_archive_blocks_are_accepted(tmp_path: Path) -> None:
    """IMG-16: a stream ending at an entry boundary without the zero blocks is accepted."""
    data = layer([File("a", b"x" * 700), File("b", b"y")], trailer=False)
    assert len(data) % 512 == 0 and data[-1024:] != b"\0" * 1024
    root = unpack(tmp_path, data)
    assert (root / "a").read_bytes() == b"x" * 700 and (root / "b").read_bytes() == b"y"


def test_state_counts_across_layers(tmp_path: Path) -> None:
    """IMG-16: bytes and entries are running totals across layers."""
    root = tmp_path / "r"
    root.mkdir()
    state = UnpackState()
    limits = UnpackLimits.from_config(UnpackConfig())
    apply_layer(root, io.BytesIO(layer([File("a", b"123"), Dir("d")])), limits, state)
    apply_layer(root, io.BytesIO(layer([File("b", b"45"), Whiteout("a")])), limits, state)
    assert (state.bytes, state.entries) == (5, 4)
    assert listing(root) == {"b", "d"}


def test_gzip_layer_is_deterministic() -> None:
    """IMG-7 fixtures: the same entries give the same tar and gzip bytes."""
    entries = [File("a", b"x"), Dir("d"), Symlink("s", "a")]
    assert layer(entries) == layer(entries)
    assert gzip_layer(layer(entries)) == gzip_layer(layer(entries))


def test_unpack_refuses_a_non_empty_root(tmp_path: Path) -> None:
    """IMG-12: unpack starts from an empty root."""
    from protocol.errors import ImageInvalid
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "x").write_bytes(b"")
    with pytest.raises(ImageInvalid):
        unpack(tmp_path, layer([File("a")]))


def test_whiteout_spares_entries_of_its_own_layer(tmp_path: Path) -> None:
    """IMG-13: a whiteout deletes from lower layers only; a same-layer entry of that name stays."""
    root = unpack(tmp_path, layer([File("x", b"lower"), File("y")]),
                  layer([File("x", b"upper"), Whiteout("x"), Whiteout("y")]))
    assert listing(root) == {"x"} and (root / "x").read_bytes() == b"upper"


def test_empty_layer_is_valid(tmp_path: Path) -> None:
    """IMG-12: a layer holding only the end-of-archive blocks (e.g. from an ENV step) changes nothing."""
    root = unpack(tmp_path, layer([File("a")]), layer([]))
    assert listing(root) == {"a"}
