"""Unpacked-tree cache: the root trees of recent builds, by layer chain, reused through overlayfs.

A build's cost is dominated by unpacking (creating every file of every layer), not by the
download, so caching compressed layers alone barely helps an image derived from a cached
base. This cache keeps the unpacked root of the last ``build.tree_cache`` builds, keyed by
their *chain id* (Docker's ChainID over the diff_ids: the id of layers 1..k depends on
exactly those layers in that order), with the unpack state (directory times) beside it:

    store/chains/<hex>/root        the unpacked tree (never written after it is saved)
    store/chains/<hex>/state.json  {"dir_times": {...}, "layers": k}

A build whose first k layers match a cached chain does not unpack them again:

* k = all layers: the cached tree is the ``mke2fs -d`` source as it is (read only);
* k < all layers: an overlay mount (lower = the cached tree, upper and work dirs in the
  build's scratch, ``index=on`` so copy-up keeps hardlink groups whole) is the root the
  remaining layers are applied to; only directories the new layers changed (exactly those
  copied up into the upper dir) get their recorded times again.

The ext4 built from either is byte-identical to one built from a full unpack (tested), so
reproducibility (IMG-20) does not depend on what a host has cached. If the overlay cannot be
mounted (no overlayfs, no privilege), the build unpacks everything, as without the cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .model import check_digest
from .store import fsync_dir

log = logging.getLogger("image")

STATE = "state.json"
ROOT = "root"


def chain_ids(diff_ids: list[str]) -> list[str]:
    """``ids[i]`` = the chain id of layers 1..i+1: the first diff_id, then
    ``sha256(previous + " " + diff_id)`` (the OCI/Docker ChainID)."""
    out: list[str] = []
    for diff in diff_ids:
        check_digest(diff, "diff_id")
        out.append(diff if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {diff}".encode()).hexdigest())
    return out


@dataclass
class Hit:
    chain_id: str
    layers: int                   # how many leading layers the cached tree holds
    root: Path
    dir_times: dict[str, int] = field(default_factory=dict)


class TreeCache:
    def __init__(self, store_root: Path, *, keep: int) -> None:
        self.dir = Path(store_root) / "chains"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.keep = keep
        self._lock = threading.Lock()
        self._in_use: dict[str, int] = {}

    def _path(self, chain_id: str) -> Path:
        return self.dir / check_digest(chain_id, "chain id").split(":", 1)[1]

    @contextlib.contextmanager
    def longest(self, diff_ids: list[str]) -> Iterator[Hit | None]:
        """The cached tree with the most leading layers of ``diff_ids`` (held while in use)."""
        if self.keep <= 0:
            yield None
            return
        hit = None
        with self._lock:
            for k, chain in reversed(list(enumerate(chain_ids(diff_ids), start=1))):
                path = self._path(chain)
                try:
                    state = json.loads((path / STATE).read_text())
                except (OSError, ValueError):
                    continue
                if (path / ROOT).is_dir() and state.get("layers") == k:
                    hit = Hit(chain, k, path / ROOT, {str(a): int(b) for a, b in state["dir_times"].items()})
                    self._in_use[chain] = self._in_use.get(chain, 0) + 1
                    os.utime(path / STATE)  # LRU by the state file's mtime
                    break
        try:
            yield hit
        finally:
            if hit is not None:
                with self._lock:
                    self._in_use[hit.chain_id] -= 1
                    if not self._in_use[hit.chain_id]:
                        del self._in_use[hit.chain_id]

    def save(self, diff_ids: list[str], root: Path, dir_times: dict[str, int]) -> bool:
        """Keep ``root`` (moved, not copied: same file system) as the tree of all of
        ``diff_ids``; then trim the cache to ``keep`` trees. False if not kept."""
        if self.keep <= 0 or not diff_ids:
            return False
        chain = chain_ids(diff_ids)[-1]
        final = self._path(chain)
        part = final.with_name(final.name + ".part")
        with self._lock:
            if final.exists():
                return False
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir(mode=0o700)
            os.rename(root, part / ROOT)
            (part / STATE).write_text(json.dumps({"layers": len(diff_ids), "dir_times": dir_times}))
            os.rename(part, final)
            fsync_dir(self.dir)
        self.trim()
        return True

    def trim(self) -> list[str]:
        """Remove the least recently used trees beyond ``keep``, never one in use."""
        removed = []
        with self._lock:
            trees = [p for p in self.dir.iterdir() if p.is_dir() and not p.name.endswith(".part")]
            trees.sort(key=lambda p: _mtime(p / STATE), reverse=True)
            for path in trees[max(self.keep, 0):]:
                if f"sha256:{path.name}" in self._in_use:
                    continue
                doomed = path.with_name(path.name + ".part")  # gone from lookups at once
                os.rename(path, doomed)
                removed.append(path.name)
                shutil.rmtree(doomed, ignore_errors=True)
        return removed

    def probe(self, scratch: Path) -> bool:
        """Can this host mount the overlay the cache needs? If not, the cache turns itself off
        (every build unpacks everything) and says why once."""
        if self.keep <= 0:
            return False
        trial = scratch / ".overlay-probe"
        shutil.rmtree(trial, ignore_errors=True)
        (trial / "lower").mkdir(parents=True)
        try:
            with overlay(trial / "lower", trial):
                pass
            return True
        except (OverlayUnavailable, OSError, subprocess.SubprocessError) as exc:
            log.warning("tree cache off: cannot mount overlayfs here (%s)", exc)
            self.keep = 0
            return False
        finally:
            shutil.rmtree(trial, ignore_errors=True)

    def recover(self) -> list[str]:
        """At start: half-saved or half-removed trees go."""
        removed = []
        for path in self.dir.iterdir():
            if path.name.endswith(".part"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(f"chains/{path.name}")
        return removed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# --- overlay mounts ----------------------------------------------------------------------

class OverlayUnavailable(Exception):
    """The overlay could not be mounted; the build falls back to a full unpack."""


@contextlib.contextmanager
def overlay(lower: Path, scratch: Path) -> Iterator[tuple[Path, Path]]:
    """Mount ``lower`` read-only under a fresh upper dir in ``scratch``; yields (merged, upper)
    and always unmounts. The lower tree is never written: overlayfs writes only the upper."""
    upper, work, merged = scratch / "upper", scratch / "ovl-work", scratch / "root"
    for d in (upper, work, merged):
        d.mkdir(mode=0o700)
    # The merged root is the upper dir's root: give it the cached tree's root metadata.
    st = os.stat(lower)
    os.chown(upper, st.st_uid, st.st_gid)
    os.chmod(upper, st.st_mode & 0o7777)
    opts = f"lowerdir={_escape(lower)},upperdir={_escape(upper)},workdir={_escape(work)},index=on"
    proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        for d in (merged, work, upper):
            shutil.rmtree(d, ignore_errors=True)
        raise OverlayUnavailable(proc.stderr.strip() or f"mount exited {proc.returncode}")
    try:
        yield merged, upper
    finally:
        unmount(merged)


def unmount(path: Path) -> None:
    """Unmount, waiting briefly for busy mounts, then detach lazily (never left mounted)."""
    for _ in range(50):
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=60).returncode == 0:
            return
        if not os.path.ismount(path):
            return
        time.sleep(0.1)  # a just-exited mke2fs may still hold it for a moment
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=60)


def unmount_under(top: Path) -> list[str]:
    """Every mount point at or below ``top`` (deepest first) is unmounted: run before removing
    a scratch tree, so a crash's leftover overlay is never deleted *through*."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    prefix = os.path.realpath(top)
    points = []
    for line in lines:
        parts = line.split()
        if len(parts) > 4:
            point = parts[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    for point in sorted(points, key=len, reverse=True):
        unmount(Path(point))
    return points


def upper_dirs(upper: Path) -> list[str]:
    """Keys ("" = root) of the directories in an overlay's upper dir: exactly the merged
    directories whose entries or metadata the new layers changed (copy-up)."""
    keys = [""]
    for dirpath, dirnames, _ in os.walk(upper):
        rel = os.path.relpath(dirpath, upper)
        base = "" if rel == "." else rel
        keys += [os.path.join(base, d) if base else d for d in dirnames]
    return keys


def _escape(path: Path) -> str:
    # overlay option values: ',' separates options and ':' lower layers; '\\' escapes them.
    return str(path).replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")
