"""The ext4 builder and the build preflight against the real e2fsprogs (SPEC IMG-12, IMG-17..IMG-20, IMG-22)."""
from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from agent.image import ext4, ext4tools
from agent.image.ext4 import build_ext4, fingerprint, fs_uuid, size_tree
from agent.image.preflight import preflight, require_build_tools
from agent.image.unpack import UnpackLimits, UnpackState, unpack_layers
from protocol.config import BuildConfig
from protocol.errors import BuilderPreflightFailed, Ext4BuildFailed, JobCancelled
from tests import debugfs
from tests.layers import (
    MTIME,
    Block,
    Char,
    Dir,
    Fifo,
    File,
    Hardlink,
    Opaque,
    Symlink,
    Whiteout,
    layer,
)
from tests.support import wait_for

CFG = BuildConfig()
EPOCH = 1_600_000_000
FP = fingerprint("sha256:" + "ab" * 32, 0)
CAP = bytes.fromhex("0100000200200000000000000000000000000000")   # cap_net_raw, VFS_CAP_REVISION_2
LONG = "usr/share/" + "a-rather-long-directory-name/" * 2 + "target-file"   # > 59 bytes
ODD = 'odd name "quoted"\twith\nnewline'
SPACED = 'sp ace "q"'

LOWER = layer([
    Dir("etc", mtime=MTIME + 1), File("etc/os-release", b"ID=test\n", mtime=MTIME + 2),
    Dir("usr"), Dir("usr/bin"),
    File("usr/bin/ping", b"\x7fELF" + b"p" * 5000, mode=0o4750, uid=1234, gid=5678, mtime=MTIME + 3,
         xattrs={"user.test": b"hello", "security.capability": CAP}),
    Hardlink("usr/bin/ping6", "usr/bin/ping"),
    Dir("tmp", mode=0o1777, mtime=MTIME + 4),
    Symlink("bin", "usr/bin"), Symlink("lnk-long", LONG),
    Dir("dev"), Char("dev/null", major=1, minor=3), Block("dev/loop200", major=7, minor=200, mode=0o660, gid=6),
    Fifo("run-fifo", mode=0o600),
    File("old/gone", b"deleted by the upper layer"),
    Dir("opq"), File("opq/lower", b"hidden"),
    File("big", b"\x01" * 70_000, mode=0o600, mtime=MTIME + 5),
])
UPPER = layer([
    Whiteout("old/gone"), Opaque("opq"), File("opq/upper", b"visible", uid=7, gid=8),
    File(ODD, b"odd", mtime=MTIME + 6), File(SPACED, b"spaced", mode=0o640),
    File("implicit/dir/file", b"its parents have no tar headers"),
])


def _unpack(root: Path, *layers: bytes) -> UnpackState:
    return unpack_layers(root, [io.BytesIO(b) for b in (layers or (LOWER, UPPER))], UnpackLimits())


def _build(tmp: Path, name: str, root: Path, state: UnpackState | None = None, **kw) -> ext4.Ext4Result:
    kw.setdefault("writable", 0)
    kw.setdefault("fingerprint", FP)
    kw.setdefault("epoch", EPOCH)
    kw.setdefault("cfg", CFG)
    return build_ext4(root, tmp / name, dir_times=state.dir_times if state else None, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ext4")
    root = tmp / "rootfs"
    state = _unpack(root)
    res = _build(tmp, "a.img", root, state)
    return tmp, root, state, res


def test_build_keeps_every_feature(built):
    """IMG-12, IMG-18: owners, setuid, sticky, xattrs, symlinks, hardlinks, devices, fifo, mtimes, whiteouts."""
    _tmp, _root, _state, res = built
    img = res.path
    ping = debugfs.stat(img, "/usr/bin/ping")
    assert (ping["type"], stat.S_IMODE(ping["mode"]), ping["uid"], ping["gid"]) == ("reg", 0o4750, 1234, 5678)
    assert ping["size"] == 5004 and ping["links"] == 2 and ping["mtime"] == MTIME + 3
    assert ping["xattrs"] == {"user.test": b"hello", "security.capability": CAP}
    assert debugfs.stat(img, "/usr/bin/ping6")["ino"] == ping["ino"]
    tmpdir = debugfs.stat(img, "/tmp")
    assert tmpdir["type"] == "dir" and stat.S_IMODE(tmpdir["mode"]) == 0o1777 and tmpdir["mtime"] == MTIME + 4
    assert debugfs.stat(img, "/bin")["target"] == "usr/bin"
    long_link = debugfs.stat(img, "/lnk-long")
    assert long_link["target"] == LONG and long_link["size"] > 59
    null, loop = debugfs.stat(img, "/dev/null"), debugfs.stat(img, "/dev/loop200")
    assert (null["type"], null["rdev"], stat.S_IMODE(null["mode"])) == ("chr", (1, 3), 0o666)
    assert (null["major"], null["minor"]) == (1, 3)
    assert (loop["type"], loop["rdev"], loop["gid"]) == ("blk", (7, 200), 6)
    fifo = debugfs.stat(img, "/run-fifo")
    assert fifo["type"] == "fifo" and stat.S_IMODE(fifo["mode"]) == 0o600
    assert debugfs.stat(img, "/etc/os-release")["mtime"] == MTIME + 2
    # Whiteouts and opaque dirs were applied by the unpacker; no markers reach the image.
    assert "gone" not in debugfs.listdir(img, "/old")
    assert set(debugfs.listdir(img, "/opq")) == {"upper"}
    assert debugfs.stat(img, "/opq/upper")["uid"] == 7
    assert ODD in debugfs.listdir(img, "/")
    fs = debugfs.Image(img)
    assert fs.ls("/opq") == ["upper"] and fs.exists("/tmp") and not fs.exists("/old/gone")
    spaced = debugfs.stat(img, "/" + SPACED)
    assert spaced["size"] == 6 and stat.S_IMODE(spaced["mode"]) == 0o640
    assert debugfs.stat(img, "/no/such/file") is None
    assert debugfs.xattrs(img, "/usr/bin/ping6") == {"user.test": b"hello", "security.capability": CAP}


def test_image_matches_the_unpacked_tree(built):
    """IMG-12/IMG-20: the whole tree compares equal with the reference dir; atime = mtime, ctime = epoch."""
    _tmp, root, state, res = built
    image = debugfs.walk(res.path, include_root=True)
    host = debugfs.host_tree(root, include_root=True)
    # Header-less dirs (the root here too) get the build epoch (IMG-20); all else keeps the tree's mtime.
    for key in ("", "implicit", "implicit/dir", "old"):
        assert key not in state.dir_times
        assert image[key]["mtime"] == EPOCH
        host[key]["mtime"] = EPOCH
    host[""]["links"] += 1                  # the image's root also holds lost+found
    assert debugfs.comparable(image) == debugfs.comparable(host)
    for key, m in image.items():
        assert m["ctime"] == EPOCH and m["crtime"] == EPOCH, key
        assert (m["atime"], m["atime_ns"]) == (m["mtime"], m["mtime_ns"]), key
    lf = debugfs.stat(res.path, "/lost+found")
    assert (lf["mtime"], lf["atime"], lf["ctime"], lf["crtime"]) == (EPOCH,) * 4


def test_fsck_clean_sparse_identity(built):
    """IMG-18/IMG-19/IMG-20: e2fsck -fn clean, sparse, recorded size/sha256, uuid and hash seed from the fingerprint."""
    _tmp, root, _state, res = built
    assert subprocess.run(["e2fsck", "-fn", res.path], capture_output=True, check=False).returncode == 0
    assert res.size == os.stat(res.path).st_size == res.sizing.size == 64 << 20 and res.attempts == 1
    assert res.sizing == size_tree(root, 0, CFG)
    assert 0 < res.allocated < res.size
    assert res.sha256 == hashlib.sha256(res.path.read_bytes()).hexdigest()
    sb = debugfs.superblock(res.path)
    assert sb["Filesystem UUID"] == sb["Directory Hash Seed"] == fs_uuid(FP) == res.uuid
    assert sb["Filesystem volume name"] == "rootfs" and sb["Block size"] == "4096"
    # The pinned mke2fs profile (not the host's /etc/mke2fs.conf) decides the features.
    assert set(sb["Filesystem features"].split()) == {
        "has_journal", "ext_attr", "resize_inode", "dir_index", "filetype", "extent", "64bit", "flex_bg",
        "sparse_super", "large_file", "huge_file", "dir_nlink", "extra_isize", "metadata_csum"}
    assert sb["Total journal size"] == "16M"
    assert int(sb["Inode count"]) >= res.sizing.inodes
    assert sb["Last write time"] == sb["Filesystem created"] == "Sun Sep 13 12:26:40 2020"   # EPOCH
    assert {a.name for a in res.path.parent.iterdir()} >= {"a.img"}
    assert not [p for p in res.path.parent.iterdir() if p.name.startswith("a.img.")]   # no leftovers


def _disturb(root: Path) -> None:
    """Make the host-side metadata of a tree differ without changing what the image should hold:
    atimes (reads, utime), ctimes (chmod/chown) and the host order of xattrs."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if st.st_ino in seen:           # a hardlink: done already
                continue
            seen.add(st.st_ino)
            names = os.listxattr(p, follow_symlinks=False)
            vals = {n: os.getxattr(p, n, follow_symlinks=False) for n in names}
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    f.read()
            if not stat.S_ISLNK(st.st_mode):
                os.chown(p, st.st_uid, st.st_gid, follow_symlinks=False)   # clears setuid and file caps
                os.chmod(p, stat.S_IMODE(st.st_mode))
                for n in names:
                    if n in os.listxattr(p, follow_symlinks=False):
                        os.removexattr(p, n, follow_symlinks=False)
                for n in reversed(names):                                  # the reverse host order
                    os.setxattr(p, n, vals[n], follow_symlinks=False)
                os.utime(p, ns=(123_456_789_000_000_000, st.st_mtime_ns), follow_symlinks=False)
            assert os.lstat(p).st_mode == st.st_mode and os.lstat(p).st_mtime_ns == st.st_mtime_ns
    os.utime(root, ns=(5, os.lstat(root).st_mtime_ns))


def test_reproducible_across_trees_and_runs(built, tmp_path):
    """IMG-20: same layers + fingerprint + epoch give the same sha256, whatever the host ctimes/atimes/xattr order."""
    _tmp, _root, _state, first = built
    root_b = tmp_path / "elsewhere" / "tree-b"
    root_b.parent.mkdir()
    state_b = _unpack(root_b)
    _disturb(root_b)
    assert os.listxattr(root_b / "usr/bin/ping") == list(reversed(os.listxattr(_root / "usr/bin/ping")))
    assert os.lstat(root_b / "usr/bin/ping").st_atime_ns != os.lstat(_root / "usr/bin/ping").st_atime_ns
    second = _build(tmp_path, "b.img", root_b, state_b)
    again = _build(tmp_path, "c.img", root_b, state_b)
    assert second.sha256 == again.sha256 == first.sha256
    assert second.path.read_bytes() == first.path.read_bytes()
    other = _build(tmp_path, "d.img", root_b, state_b, epoch=EPOCH + 1)
    assert other.sha256 != first.sha256


def test_grow_retry(tmp_path):
    """IMG-18: "Could not allocate block" retries at size x grow_factor; the second attempt succeeds."""
    root = tmp_path / "root"
    _unpack(root, layer([File("blob", b"\x02" * (20 << 20))]))
    res = _build(tmp_path, "g.img", root, size=34 << 20)
    assert res.attempts == 2 and res.size == 43 << 20
    assert debugfs.stat(res.path, "/blob")["size"] == 20 << 20
    cfg = BuildConfig(grow_retries=0)
    with pytest.raises(Ext4BuildFailed) as ei:
        _build(tmp_path, "h.img", root, size=34 << 20, cfg=cfg)
    assert ei.value.details["stage"] == "mke2fs" and "Could not allocate block" in ei.value.details["stderr"]
    assert not (tmp_path / "h.img").exists()


def test_mke2fs_failure_is_ext4_build_failed(tmp_path):
    """IMG-18: any other mke2fs failure is Ext4BuildFailed with the stderr tail, not retried."""
    root = tmp_path / "root"
    _unpack(root, layer([File("f", b"x")]))
    with pytest.raises(Ext4BuildFailed) as ei:
        _build(tmp_path, "bad.img", root, extra_args=["-O", "no_such_feature"])
    d = ei.value.details
    assert d["stage"] == "mke2fs" and d["rc"] != 0 and "no_such_feature" in d["stderr"] and len(d["stderr"]) <= 2048
    assert not (tmp_path / "bad.img").exists() and list(tmp_path.iterdir()) == [root]
    with pytest.raises(Ext4BuildFailed):
        _build(tmp_path, "none.img", tmp_path / "missing")


def test_cancel(tmp_path):
    """A set cancel event stops the build (JobCancelled); a running tool is killed."""
    root = tmp_path / "root"
    _unpack(root, layer([File("f", b"x")]))
    ev = threading.Event()
    ev.set()
    with pytest.raises(JobCancelled):
        _build(tmp_path, "x.img", root, cancel=ev)
    assert not (tmp_path / "x.img").exists()
    ev2, mark, box = threading.Event(), tmp_path / "started", {}

    def run():
        try:
            ext4tools.run(["sh", "-c", f"touch {mark}; exec sleep 60"], stage="mke2fs", env={"PATH": os.defpath},
                      timeout=120, cancel=ev2)
        except Exception as exc:  # noqa: BLE001
            box["exc"] = exc
    t = threading.Thread(target=run)
    t.start()
    wait_for(mark.exists, 10, "the child to start")
    ev2.set()
    t.join(10)
    assert not t.is_alive() and isinstance(box.get("exc"), JobCancelled)


def test_preflight_ok_and_missing_tools(tmp_path):
    """IMG-22: the preflight passes here; with an empty PATH it names the missing tools."""
    res = preflight(tmp_path)
    assert res.ok and res.reason == "" and res.e2fsprogs_version.startswith("1.")
    assert require_build_tools(tmp_path).ok
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = preflight(tmp_path, path=os.fspath(empty))
    assert not bad.ok and "mke2fs" in bad.reason and "e2fsck" in bad.reason and "debugfs" in bad.reason
    with pytest.raises(BuilderPreflightFailed) as ei:
        require_build_tools(tmp_path, path=os.fspath(empty))
    assert "mke2fs" in ei.value.message
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]     # the scratch fs was removed


def test_tools_gone_mid_build_is_builder_preflight_failed(tmp_path, monkeypatch):
    """IMG-22: build tools missing after the start-up preflight → BuilderPreflightFailed, no output left."""
    root = tmp_path / "root"
    _unpack(root, layer([File("f", b"x")]))
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(BuilderPreflightFailed) as ei:
        _build(tmp_path, "gone.img", root)
    assert ei.value.details["tool"] == "mke2fs"
    assert not (tmp_path / "gone.img").exists()
