"""The startup reconcile (SPEC CAT-3, CAT-7, CAT-8, WIRE-7): the catalog checked against the
store before the first HELLO. It deletes nothing.

* **Missing**: an ``artifact`` entry whose files (``body.files``: ``{name, size}``) are not all
  under ``store/artifacts/<id>/`` with their sizes, a ``layer`` entry whose blob
  ``store/layers/sha256/<hex>`` is absent or of another size, an ``orphan`` entry whose
  quarantined path is gone, a ``snapshot`` entry whose files are gone, resized or whose removal
  was interrupted — and every ``partial`` artifact (a fetch in progress: no task is
  live at start) — are removed from the catalog and listed in ``missing``.
* **Resume state is kept**: ``store/artifacts/<id>.partial/`` holding a fetch resume record
  (``.progress.json``) stays where it is, because a re-sent FETCH_ARTIFACT resumes from it
  (WIRE-14, WIRE-17) — only its ``partial`` entry goes.
* **Orphans**: anything else under the managed store (``store/artifacts``,
  ``store/layers/sha256``, ``snapshots``) that no entry lists — a stray file, an artifact or
  snapshot directory without an entry (an interrupted snapshot's ``<id>.new``), a file an
  entry does not list — moves to ``<state_dir>/quarantine/<same relative
  path>`` (a rename: same filesystem) and gets a catalog entry of kind ``orphan`` (id = the
  path under ``quarantine/``), mirrored like any other, so the coordinator sees it (CAT-6).

Build scratch (``store/work``), layer downloads (``store/layers/tmp``) and the tree cache
(``store/chains``) are the image service's own recovery (``ImageService.recover``), not ours.

Order (CAT-8): removals are committed first (an entry never names files we moved); an
orphan's entry is committed after its rename, so a crash in between leaves a file in
``quarantine/`` without an entry — never an entry without its file.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .catalog import ARTIFACT_KIND, LAYER_KIND, ORPHAN_KIND, SNAPSHOT_KIND
from .image.store import fsync_dir

if TYPE_CHECKING:
    from .catalog import Catalog, Entry

log = logging.getLogger("reconcile")

PARTIAL = ".partial"          # agent/transfer.py: <id>.partial/ while a fetch runs
RESUME_RECORD = ".progress.json"
QUARANTINE = "quarantine"
# Relative to the state dir. A snapshot directory no entry lists (an interrupted SNAPSHOT's
# ``<id>.new``, or files whose entry was dropped) is quarantined like any other stray.
MANAGED = ("store/artifacts", "store/layers/sha256", "snapshots")
REPORT_LIMIT = 1000           # entries per HELLO.reconcile list; the log has the rest
_LAYER_ID = re.compile(r"sha256:([0-9a-f]{64})\Z")
_ORPHAN_ID = re.compile(r"[!-~]{1,256}\Z")
_FILE_NAME = re.compile(r"[A-Za-z0-9._+-]{1,255}\Z")


@dataclass
class Report:
    """What the reconcile found: removed entries and the relative paths it quarantined."""
    missing: list["Entry"] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)

    def to_wire(self) -> dict[str, list[Any]]:
        """HELLO.reconcile (WIRE-6): at most REPORT_LIMIT of each, the log names them all."""
        return {"missing": self.missing[:REPORT_LIMIT], "orphans": self.orphans[:REPORT_LIMIT]}


def startup_reconcile(catalog: "Catalog", state_dir: str | Path, now_ms: int | None = None) -> Report:
    """Reconcile ``catalog`` with ``<state_dir>/store``; call before HELLO (CAT-3)."""
    root = Path(state_dir)
    found_ms = int(time.time() * 1000) if now_ms is None else now_ms
    report = Report()
    keep: set[str] = set()                 # relative paths known to the catalog
    listed: dict[str, set[str] | None] = {}  # artifact dir → its listed file names (None: all)
    gone: list[tuple[str, str]] = []
    for entry in catalog.entries():
        kind, body = entry["kind"], entry["body"]
        why = None
        if kind == ARTIFACT_KIND:
            why = _check_artifact(root, entry, listed)
        elif kind == LAYER_KIND:
            why = _check_layer(root, entry, keep)
        elif kind == SNAPSHOT_KIND:
            why = _check_snapshot(root, entry)
            if why is None:
                keep.add(f"snapshots/{entry['id']}")
        elif kind == ORPHAN_KIND:
            path = body.get("path")
            if not isinstance(path, str) or not _inside(root, path) or not os.path.lexists(root / path):
                why = "its quarantined path is gone"
        if why is not None:
            log.warning("%s %s removed from the catalog: %s", kind, entry["id"], why)
            report.missing.append(entry)
            gone.append((kind, entry["id"]))
    if gone:
        catalog.apply(deletes=gone)
    for rel in _unlisted(root, keep, listed):
        report.orphans.append(rel)
        _quarantine(catalog, root, rel, found_ms)
    return report


def _check_snapshot(root: Path, entry: "Entry") -> str | None:
    """A sandbox snapshot (RT-12) whose files are gone or of another size cannot be rolled back to."""
    sid, body = entry["id"], entry["body"]
    if "/" in sid or sid.startswith("."):
        return "its id is not a store name"
    if body.get("state") == "removing" or body.get("removing"):
        return "its removal was interrupted"
    for f in body.get("files") or []:
        name = f.get("name") if isinstance(f, dict) else None
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            return "its body lists an unsafe file name"
        try:
            if (root / "snapshots" / sid / name).stat().st_size != int(f.get("size", -1)):
                return f"{name} has another size"
        except FileNotFoundError:
            return f"{name} is missing"
    return None


def _check_artifact(root: Path, entry: "Entry", listed: dict[str, set[str] | None]) -> str | None:
    """Why the artifact entry must go, or None (then its files are recorded as known)."""
    aid, body = entry["id"], entry["body"]
    base = f"store/artifacts/{aid}"
    if "/" in aid or aid.startswith("."):
        return "its id is not a store name"
    if body.get("state") == "partial":
        # No task is live at start. The resume record, if any, stays for a re-sent fetch.
        return "a partial fetch and no task is running"
    files = body.get("files")
    if files is None:
        listed[base] = None  # nothing to check against: the directory is known as a whole
        return None
    if not isinstance(files, list):
        return "its body lists no files"
    names: set[str] = set()
    for f in files:
        name = f.get("name") if isinstance(f, dict) else None
        size = f.get("size") if isinstance(f, dict) else None
        if not isinstance(name, str) or not _FILE_NAME.match(name) or name.startswith(".") \
                or not isinstance(size, int):
            return f"its file entry {str(f)[:80]!r} is not a name and a size"
        path = root / base / name
        try:
            st = path.lstat()
        except OSError:
            return f"{name} is missing"
        if not path.is_file() or path.is_symlink():
            return f"{name} is not a regular file"
        if st.st_size != size:
            return f"{name} has {st.st_size} bytes, the catalog says {size}"
        names.add(name)
    listed[base] = names
    return None


def _check_layer(root: Path, entry: "Entry", keep: set[str]) -> str | None:
    m = _LAYER_ID.match(entry["id"])
    if m is None:
        return "its id is not sha256:<64 hex>"
    rel = f"store/layers/sha256/{m.group(1)}"
    size = entry["body"].get("size")
    try:
        st = (root / rel).lstat()
    except OSError:
        return "its blob is missing"
    if not (root / rel).is_file() or not isinstance(size, int) or st.st_size != size:
        return f"its blob has {st.st_size} bytes, the catalog says {size}"
    keep.add(rel)
    return None


def _unlisted(root: Path, keep: set[str], listed: dict[str, set[str] | None]) -> list[str]:
    """Relative paths in the managed store that no entry lists, sorted."""
    out: list[str] = []
    for managed in MANAGED:
        try:
            names = sorted(os.listdir(root / managed))
        except FileNotFoundError:
            continue
        for name in names:
            rel = f"{managed}/{name}"
            if rel in keep:
                continue
            if managed == "store/artifacts":
                if rel in listed:
                    known = listed[rel]
                    if known is not None:
                        out += _unlisted_files(root, rel, known)
                    continue
                if name.endswith(PARTIAL) and (root / rel / RESUME_RECORD).is_file() \
                        and not (root / rel).is_symlink():
                    continue  # fetch resume state (WIRE-17)
            out.append(rel)
    return out


def _unlisted_files(root: Path, rel_dir: str, names: set[str]) -> list[str]:
    path = root / rel_dir
    if path.is_symlink() or not path.is_dir():
        return [rel_dir]
    return [f"{rel_dir}/{n}" for n in sorted(os.listdir(path)) if n not in names]


def _quarantine(catalog: "Catalog", root: Path, rel: str, found_ms: int) -> None:
    """Move ``rel`` under ``quarantine/`` (same relative path; a numbered suffix if taken) and
    record it as an ``orphan`` entry. A failure is logged and the path left where it was."""
    src = root / rel
    target = f"{QUARANTINE}/{rel}"
    n = 0
    while os.path.lexists(root / target):
        n += 1
        target = f"{QUARANTINE}/{rel}.{n}"
    try:
        size = _size(src)
        (root / target).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.rename(src, root / target)
        fsync_dir(src.parent)
        fsync_dir((root / target).parent)
    except OSError as exc:
        log.error("cannot quarantine %s: %s (left in place)", rel, exc)
        return
    id_ = target[len(QUARANTINE) + 1:]
    if not _ORPHAN_ID.match(id_):
        id_ = "sha256-" + hashlib.sha256(id_.encode("utf-8", "surrogateescape")).hexdigest()
    catalog.put(ORPHAN_KIND, id_, {"path": _text(target), "original": _text(rel), "size": size,
                                   "found_ms": found_ms})
    log.warning("%s is not in the catalog: moved to %s (orphan %s, %d bytes)", rel, target, id_, size)


def _size(path: Path) -> int:
    """Bytes under ``path`` (a file, a link or a tree), without following links."""
    st = path.lstat()
    if not path.is_dir() or path.is_symlink():
        return st.st_size
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _inside(root: Path, rel: str) -> bool:
    return not rel.startswith("/") and ".." not in Path(rel).parts


def _text(path: str) -> str:
    """File names are bytes; entry bodies are JSON text."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
