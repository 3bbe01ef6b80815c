"""IMG-17 sizing, IMG-19 fingerprint and IMG-20 uuid of the ext4 builder (pure; no e2fsprogs needed)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest

from agent.image.ext4 import (
    GIB,
    MIB,
    Sizing,
    count_tree,
    fingerprint,
    fingerprint_doc,
    fs_uuid,
    size_for,
    size_tree,
)
from agent.image.ext4pin import _parse_ls
from protocol.config import BuildConfig

CFG = BuildConfig()
KIB16 = 16 << 10


def test_tiny_tree_gets_the_64_mib_floor():
    """IMG-17: size is at least 64 MiB; inodes = ceil(entries*1.2) + 1024 + ceil(writable/16 KiB)."""
    s = size_for(3 * 4096, 3, 0, CFG)
    assert s == Sizing(alloc=12288, inodes=4 + 1024, journal=16 * MIB, size=64 * MIB, entries=3)
    assert size_for(0, 0, 0, CFG).size == 64 * MIB


def test_exact_formula_with_writable():
    """IMG-17: size = ceil_MiB(alloc*1.05 + inodes*256 + journal + writable)."""
    alloc, entries, writable = 100 * MIB, 1000, 1 * GIB
    s = size_for(alloc, entries, writable, CFG)
    inodes = 1200 + 1024 + GIB // KIB16
    assert s.inodes == inodes == 67760
    assert s.journal == 64 * MIB                      # alloc + writable >= 1 GiB
    raw = alloc * 105 // 100 + inodes * 256 + 64 * MIB + writable
    assert s.size == -(-raw // MIB) * MIB == 1210 * MIB
    assert s.size % MIB == 0


def test_journal_threshold_at_one_gib():
    """IMG-17: 16 MiB journal iff alloc + writable < 1 GiB, else 64 MiB."""
    assert size_for(GIB - 4096, 10, 4095, CFG).journal == 16 * MIB
    assert size_for(GIB - 4096, 10, 4096, CFG).journal == 64 * MIB
    assert size_for(2 * GIB, 10, 0, CFG).journal == 64 * MIB
    big = size_for(2 * GIB, 10, 0, CFG)
    assert big.size == -(-(2 * GIB * 105 // 100 + big.inodes * 256 + 64 * MIB) // MIB) * MIB


def test_inode_terms_are_exact():
    """IMG-17: ceil(entries*1.2) uses the decimal 1.2 (10 entries give 12, not 13) and ceil(writable/16 KiB)."""
    assert size_for(0, 10, 0, CFG).inodes == 12 + 1024
    assert size_for(0, 5, 0, CFG).inodes == 6 + 1024
    assert size_for(0, 11, 0, CFG).inodes == 14 + 1024
    assert size_for(0, 0, KIB16 * 10, CFG).inodes == 1024 + 10
    assert size_for(0, 0, KIB16 * 10 + 1, CFG).inodes == 1024 + 11


def test_config_keys_are_used():
    """SPEC §17 build.*: slack, min_size, inode_* and journal_* come from the config."""
    cfg = dataclasses.replace(CFG, slack=10.0, min_size=1 * MIB, inode_extra=0, inode_factor=1.0,
                              inode_per_writable=4096, journal_small=4 * MIB)
    s = size_for(10 * MIB, 100, 8192, cfg)
    assert (s.inodes, s.journal) == (100 + 2, 4 * MIB)
    assert s.size == -(-(11 * MIB + 102 * 256 + 4 * MIB + 8192) // MIB) * MIB == 16 * MIB
    with pytest.raises(ValueError):
        size_for(-1, 0, 0, CFG)


def _tree(root: Path) -> None:
    (root / "d" / "e").mkdir(parents=True)
    for name, size in (("empty", 0), ("one", 1), ("page", 4096), ("page1", 4097)):
        (root / "d" / name).write_bytes(b"x" * size)
    os.link(root / "d" / "page1", root / "d" / "e" / "hard")       # counted once for alloc
    os.symlink("s" * 59, root / "fast")                            # fits in the inode
    os.symlink("s" * 60, root / "slow")                            # needs a block
    os.mkfifo(root / "fifo")


def test_count_tree(tmp_path):
    """IMG-17: regular files 4 KiB-rounded, hardlinks once, +4 KiB per dir and per symlink > 59 B; lstat only."""
    _tree(tmp_path)
    c = count_tree(tmp_path)
    assert c.alloc == (0 + 4096 + 4096 + 8192) + 4096 * 2 + 4096 * 1
    assert (c.dirs, c.long_symlinks, c.regular) == (2, 1, 4)
    assert c.entries == 2 + 5 + 2 + 1          # dirs, names of files (hardlink too), symlinks, fifo
    assert size_tree(tmp_path, 0, CFG) == size_for(c.alloc, c.entries, 0, CFG)
    # A symlink to a directory is not followed.
    os.symlink("d", tmp_path / "to-d")
    assert count_tree(tmp_path).alloc == c.alloc                 # a short link costs no block
    assert count_tree(tmp_path).entries == c.entries + 1


def test_count_tree_link_target_length(tmp_path):
    os.symlink("t" * 200, tmp_path / "l")
    assert count_tree(tmp_path).alloc == 4096


FP_DOC = ('{"build":{"block_size":4096,"fs":"ext4","layout":1},"kind":"image",'
          '"manifest_digest":"sha256:%s","v":1,"writable_size":1073741824}')


def test_fingerprint_is_sha256_of_canonical_json():
    """IMG-19: sha256 of canonical {v, kind, manifest_digest, writable_size, build{fs, block_size, layout}}."""
    md = "sha256:" + "0123456789abcdef" * 4
    expected = hashlib.sha256((FP_DOC % ("0123456789abcdef" * 4)).encode()).hexdigest()
    assert fingerprint(md, 1 << 30) == expected
    doc = fingerprint_doc(md, 1 << 30)
    assert json.dumps(doc, sort_keys=True, separators=(",", ":")) == FP_DOC % ("0123456789abcdef" * 4)
    assert fingerprint(md, 1 << 30) == fingerprint(md, 1 << 30)
    assert fingerprint(md, (1 << 30) + 1) != expected
    assert fingerprint(md.replace("0", "1"), 1 << 30) != expected


def test_fs_uuid_is_the_first_16_bytes():
    """IMG-20: uuid (and hash seed) = the fingerprint's first 16 bytes as a UUID."""
    fp = fingerprint("sha256:" + "ab" * 32, 0)
    u = fs_uuid(fp)
    assert u == str(uuid.UUID(hex=fp[:32]))
    assert u.replace("-", "") == fp[:32]
    assert fs_uuid("00" * 32) == "00000000-0000-0000-0000-000000000000"
    with pytest.raises(ValueError):
        fs_uuid("abcd")


def test_parse_ls_survives_odd_names():
    """IMG-20 post-pass: `ls -p` records are parsed whole, so names with newlines or quotes stay intact."""
    out = (b"debugfs: ls -p <2>\n/2/040755/0/0/.//\n/2/040755/0/0/..//\n/12/100644/0/0/a\nb \"c\"/3/\n\n"
           b"debugfs: ls -p <13>\n/13/040755/0/0/.//\n/2/040755/0/0/..//\n/14/020644/0/0/debugfs: x/0/\n\n")
    assert _parse_ls(out) == [(2, [(2, 0o40755, b"."), (2, 0o40755, b".."), (12, 0o100644, b'a\nb "c"')]),
                              (13, [(13, 0o40755, b"."), (2, 0o40755, b".."), (14, 0o20644, b"debugfs: x")])]
    with pytest.raises(ValueError):
        _parse_ls(b"garbage\n")
