"""IMG-17 sizing of an unpacked tree: how many bytes, inodes and journal an ext4 needs for it
plus a writable allowance. Pure arithmetic over one lstat walk (hardlinks counted once)."""
from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from protocol.config import BuildConfig

BLOCK = 4096
MIB = 1 << 20
GIB = 1 << 30
FAST_SYMLINK_MAX = 59          # ext4 keeps targets up to 59 bytes inside the inode
INODE_BYTES = 256

# -- sizing (IMG-17) -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TreeCounts:
    """What the IMG-17 formula needs from a tree walk."""

    alloc: int = 0          # bytes: regular files 4 KiB-rounded (each inode once) + 4 KiB per dir/long symlink
    entries: int = 0        # paths below the root (every name, hardlinks included)
    regular: int = 0
    dirs: int = 0
    long_symlinks: int = 0


@dataclass(frozen=True, slots=True)
class Sizing:
    alloc: int              # bytes of data blocks the tree needs
    inodes: int             # mke2fs -N
    journal: int            # bytes (-J size= in MiB)
    size: int               # bytes of the image, a multiple of 1 MiB, >= min_size
    entries: int


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def exact(x: float) -> Fraction:
    """A config float as the decimal the operator wrote (1.2 is 6/5, not its binary neighbour)."""
    return Fraction(str(x))


def size_for(alloc: int, entries: int, writable: int, cfg: BuildConfig) -> Sizing:
    """The IMG-17 formula from counts: pure integer/rational arithmetic.

    inodes = ceil(entries*inode_factor) + inode_extra + ceil(writable/inode_per_writable);
    journal = journal_small if alloc + writable < 1 GiB else journal_large;
    size = ceil_MiB(alloc*(1+slack%) + inodes*256 + journal + writable), at least min_size.
    """
    if alloc < 0 or entries < 0 or writable < 0:
        raise ValueError("alloc, entries and writable must be >= 0")
    inodes = (math.ceil(entries * exact(cfg.inode_factor)) + int(cfg.inode_extra)
              + ceil_div(writable, int(cfg.inode_per_writable)))
    journal = int(cfg.journal_small) if alloc + writable < GIB else int(cfg.journal_large)
    raw = alloc * (1 + exact(cfg.slack) / 100) + inodes * INODE_BYTES + journal + writable
    size = max(math.ceil(raw / MIB) * MIB, ceil_div(int(cfg.min_size), MIB) * MIB)
    return Sizing(alloc=alloc, inodes=inodes, journal=journal, size=size, entries=entries)


def walk(root: Path) -> Iterable[tuple[str, os.stat_result]]:
    """(relative path, lstat) of every entry below ``root``, depth first, never following links."""
    stack = [("", os.fspath(root))]
    while stack:
        rel, path = stack.pop()
        with os.scandir(path) as it:
            for de in it:
                st = de.stat(follow_symlinks=False)
                key = f"{rel}/{de.name}" if rel else de.name
                yield key, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append((key, de.path))


def count_tree(root: Path) -> TreeCounts:
    """Walk ``root`` with lstat only; hardlinked files are counted once (by device and inode)."""
    return count_stats(st for _key, st in walk(Path(root)))


def count_stats(stats: Iterable[os.stat_result]) -> TreeCounts:
    alloc = entries = regular = dirs = long_links = 0
    seen: set[tuple[int, int]] = set()
    for st in stats:
        entries += 1
        mode = st.st_mode
        if stat.S_ISREG(mode):
            if st.st_nlink > 1:
                ident = (st.st_dev, st.st_ino)
                if ident in seen:
                    continue
                seen.add(ident)
            regular += 1
            alloc += ceil_div(st.st_size, BLOCK) * BLOCK
        elif stat.S_ISDIR(mode):
            dirs += 1
            alloc += BLOCK
        elif stat.S_ISLNK(mode) and st.st_size > FAST_SYMLINK_MAX:
            long_links += 1
            alloc += BLOCK
    return TreeCounts(alloc=alloc, entries=entries, regular=regular, dirs=dirs, long_symlinks=long_links)


def size_tree(root: Path, writable: int, cfg: BuildConfig) -> Sizing:
    """IMG-17 sizing of the unpacked tree at ``root`` for a ``writable``-byte guest allowance."""
    c = count_tree(root)
    return size_for(c.alloc, c.entries, writable, cfg)

