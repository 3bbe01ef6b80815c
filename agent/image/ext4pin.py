"""The reproducibility post-pass of the ext4 builder (IMG-12, IMG-20): ONE ``debugfs -w`` run
over every inode, addressed by number (found by a level-by-level ``ls -p`` walk, so no file
name is ever parsed as a debugfs command word). See agent/image/ext4.py for what is pinned."""
from __future__ import annotations

import os
import re
import shutil
import stat
import threading
from collections.abc import Mapping
from pathlib import Path

from protocol.errors import Ext4BuildFailed

from .ext4size import walk
from .ext4tools import fail, run, tail

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
        rc, out, err = run(["debugfs", "-f", os.fspath(cmdfile), os.fspath(image)], stage="postpass",
                            env=env, timeout=timeout, cancel=cancel)
        if rc != 0 or _debugfs_errors(err):
            raise fail("postpass", rc, err, "debugfs ls walk failed")
        try:
            parsed = _parse_ls(out)
        except ValueError as exc:
            raise Ext4BuildFailed(f"postpass: {exc}", {"stage": "postpass", "rc": rc, "stderr": tail(err)}) from None
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


def postpass(image: Path, root: Path, tree: dict[str, os.stat_result], *, epoch: int,
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
        rc, _out, err = run(["debugfs", "-w", "-f", os.fspath(cmdfile), os.fspath(image)], stage="postpass",
                             env=env, timeout=timeout, cancel=cancel)
    finally:
        cmdfile.unlink(missing_ok=True)
        shutil.rmtree(valdir, ignore_errors=True)
    if rc != 0 or _debugfs_errors(err):
        raise fail("postpass", rc, err, "debugfs post-pass failed")


def source_tree(root: Path) -> dict[str, os.stat_result]:
    """{relative path: lstat} of the tree (root is ""); sockets are left out, as ``mke2fs -d`` skips them."""
    tree = {"": os.lstat(root)}
    for key, st in walk(root):
        if not stat.S_ISSOCK(st.st_mode):
            tree[key] = st
    return tree

