"""Snapshots of running sandboxes on the agent (SPEC RT-12 to RT-14, COMPAT-7, CAT-1, CAT-8, SNAP-9).

Tasks: SNAPSHOT_SANDBOX, ROLLBACK_SANDBOX, REMOVE_SNAPSHOT, EXPORT_SANDBOX (RT-14's export for
commits: a verified ``flat`` artifact of the guest-visible disk). A snapshot is a catalog entry
``snapshot``/<snapshot id> with body {sandbox_id, template_id, base_artifact_id, files
[{name, size}], pins, facts, created_ms, pause_ms}; its files (``state.mig``, ``memory.img``,
``disk.raw``, ``config.img``, ``meta.json`` — the same layout as a template memory snapshot, so
the driver's RT-11 restore path serves rollback unchanged) live in
``<state_dir>/snapshots/<snapshot id>/``.

A VM rolled back to a snapshot never uses the snapshot's files in place: its memory is a clone
and its disk a reflink clone or a qcow2 overlay whose base is hard-linked into the VM's own dir
(disks._pin_base), so REMOVE_SNAPSHOT may delete the files under a running sandbox.

The sandbox's entry records the runtime ref it currently runs from as ``snapshot_id`` and
``generation`` (SNAP-9: the coordinator picks the generation; the agent keeps the newest and
refuses an older one, so a late duplicate cannot roll a sandbox back twice).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import canonical, ids
from protocol.errors import (InvalidRequest, SandboxNotFound, SandboxNotRunning,
                             SnapshotNotFound, SnapshotSandboxMismatch)

from ..catalog import ARTIFACT_KIND, REPLICA_KIND, SANDBOX_KIND, SNAPSHOT_KIND
from ..image.store import ROOTFS, Store, check_artifact_id, fsync_dir
from ..storage import check_writable
from ..tasks import TaskContext

if TYPE_CHECKING:
    from .sandboxes import SandboxService

log = logging.getLogger("snapshots")

# The driver's snapshot files (qemu.py, RT-12) and which size each one reports.
SIZE_FILES = {"memory": "memory.img", "disk": "disk.raw", "state": "state.mig"}


class SnapshotService:
    """The snapshot half of the sandbox service: it shares the sandbox locks, so a snapshot,
    rollback, destroy and the monitor never act on one sandbox at the same time."""

    def __init__(self, sandboxes: "SandboxService") -> None:
        self.sb = sandboxes
        self.catalog = sandboxes.catalog
        self.driver = sandboxes.driver
        self.root = Path(sandboxes.cfg.agent.state_dir) / "snapshots"

    def handlers(self) -> dict[str, Any]:
        return {"SNAPSHOT_SANDBOX": self.snapshot_task, "ROLLBACK_SANDBOX": self.rollback_task,
                "REMOVE_SNAPSHOT": self.remove_task, "EXPORT_SANDBOX": self.export_task}

    def dir(self, snapshot_id: str) -> Path:
        return self.root / snapshot_id

    # --- SNAPSHOT_SANDBOX (RT-12, RT-13, CAT-8) ---------------------------------------------

    def snapshot_task(self, ctx: TaskContext) -> dict[str, Any]:
        self.sb._require()
        sid = _id("sandbox", ctx.args.get("sandbox_id"), "sandbox_id", "sbx-<24 hex>")
        snap = _id("snapshot", ctx.args.get("snapshot_id"), "snapshot_id", "snap-<24 hex>")
        with self.sb._lock(sid):
            existing = self.catalog.get(SNAPSHOT_KIND, snap)
            if existing is not None:  # idempotent by snapshot id: a re-sent task gets the same info
                body = existing["body"]
                if body.get("sandbox_id") != sid:
                    raise SnapshotSandboxMismatch(f"snapshot {snap} was taken from {body.get('sandbox_id')}, "
                                                  f"not {sid}", {"snapshot_id": snap, "sandbox_id": sid})
                if body.get("state") != "removing":
                    return _info(snap, body)
            entry = self.catalog.get(SANDBOX_KIND, sid)
            if entry is None:
                raise SandboxNotFound(f"sandbox {sid} is not on this node", {"sandbox_id": sid})
            sbody = entry["body"]
            if sbody.get("state") != "RUNNING" or not self.driver.alive(sid):
                raise SandboxNotRunning(f"sandbox {sid} is {sbody.get('state')}, not RUNNING",
                                        {"sandbox_id": sid, "state": sbody.get("state")})
            tmp = self.root / f"{snap}.new"
            final = self.dir(snap)
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted attempt
            shutil.rmtree(final, ignore_errors=True)  # files without an entry never count (CAT-8)
            check_writable(self.sb.cfg, "snapshots")
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                ctx.progress({"phase": "SNAPSHOTTING"})
                res = self.driver.snapshot(sid, str(tmp))
                _fsync_tree(tmp)
                os.rename(tmp, final)
                _fsync_dir(self.root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            versions, facts = self.sb._versions(), self.sb._facts()
            from .sandboxes import FACT_NAMES, PIN_NAMES
            body = {"sandbox_id": sid, "template_id": sbody.get("template_id"),
                    "base_artifact_id": self._base_artifact(sbody), "files": res["files"],
                    "pins": {k: versions.get(k, "") for k in PIN_NAMES},
                    "facts": {k: facts.get(k, "") for k in FACT_NAMES},
                    "created_ms": int(time.time() * 1000), "pause_ms": res["pause_ms"]}
            self.catalog.put(SNAPSHOT_KIND, snap, body)  # after the files (CAT-8)
            log.info("snapshot %s of %s taken (pause %d ms)", snap, sid, res["pause_ms"])
            return _info(snap, body)

    def _base_artifact(self, sbody: dict[str, Any]) -> str | None:
        """The artifact the sandbox's disk descends from: recorded at create and rollback; for
        entries written before that, the template replica's artifact."""
        if sbody.get("artifact_id"):
            return str(sbody["artifact_id"])
        replica = self.catalog.get(REPLICA_KIND, str(sbody.get("template_id")))
        return replica["body"].get("artifact_id") if replica else None

    # --- ROLLBACK_SANDBOX (RT-14, RT-11, COMPAT-7, SNAP-9) ------------------------------------

    def rollback_task(self, ctx: TaskContext) -> dict[str, Any]:
        self.sb._require()
        a = ctx.args
        sid = _id("sandbox", a.get("sandbox_id"), "sandbox_id", "sbx-<24 hex>")
        snap = _id("snapshot", a.get("snapshot_id"), "snapshot_id", "snap-<24 hex>")
        gen = a.get("generation")
        if isinstance(gen, bool) or not isinstance(gen, int) or gen < 1:
            raise InvalidRequest("generation must be an integer ≥ 1", {"field": "generation", "reason": "range"})
        with self.sb._lock(sid):
            entry = self.catalog.get(SANDBOX_KIND, sid)
            if entry is None:
                raise SandboxNotFound(f"sandbox {sid} is not on this node", {"sandbox_id": sid})
            sbody = entry["body"]
            current = int(sbody.get("generation") or 0)
            if (gen == current and sbody.get("snapshot_id") == snap and sbody.get("state") == "RUNNING"
                    and self.driver.alive(sid)):  # a re-sent rollback: already done
                return {"sandbox_id": sid, "snapshot_id": snap, "generation": gen, "state": "RUNNING",
                        "restore_ms": int(sbody.get("restore_ms") or 0)}
            if gen < current or (gen == current and sbody.get("snapshot_id") != snap):
                raise InvalidRequest(f"generation {gen} is not newer than the sandbox's generation {current}",
                                     {"field": "generation", "reason": "stale", "current": current})
            sentry = self.catalog.get(SNAPSHOT_KIND, snap)
            if sentry is None or sentry["body"].get("state") == "removing" or not self.dir(snap).is_dir():
                raise SnapshotNotFound(f"snapshot {snap} is not on this node", {"snapshot_id": snap})
            body = sentry["body"]
            if body.get("sandbox_id") != sid:
                raise SnapshotSandboxMismatch(f"snapshot {snap} was taken from {body.get('sandbox_id')}, not {sid}",
                                              {"snapshot_id": snap, "sandbox_id": sid,
                                               "origin": body.get("sandbox_id")})
            self.sb.check_compat(snap, body, what="snapshot")
            check_writable(self.sb.cfg, "rollbacks")
            ctx.progress({"phase": "ROLLBACK_DRIVING"})
            t0 = time.monotonic()
            ref = {"snapshot_id": snap, "generation": gen, "artifact_id": body.get("base_artifact_id")}
            try:
                st = self.driver.rollback(sid, str(self.dir(snap)))
            except BaseException as exc:
                # RT-14: the VM and its layer are gone and there is no safety checkpoint.
                self.driver.destroy(sid, 5.0)
                why = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                self.sb._put(sid, {**sbody, **ref, "state": "FAILED", "error": f"rollback failed: {why}"[:500],
                                   "exit_code": None})
                raise
            restore_ms = int((time.monotonic() - t0) * 1000)
            self.sb._put(sid, {**sbody, **ref, "state": st.state, "restored": True, "exit_code": None,
                               "error": None, "restore_ms": restore_ms, "started_ms": int(time.time() * 1000)})
            log.info("sandbox %s rolled back to %s (generation %d) in %d ms", sid, snap, gen, restore_ms)
            return {"sandbox_id": sid, "snapshot_id": snap, "generation": gen, "state": st.state,
                    "restore_ms": restore_ms}

    # --- REMOVE_SNAPSHOT (CAT-8, WIRE-15) -------------------------------------------------------

    def remove_task(self, ctx: TaskContext) -> dict[str, Any]:
        self.sb._require()
        snap = _id("snapshot", ctx.args.get("snapshot_id"), "snapshot_id", "snap-<24 hex>")
        entry = self.catalog.get(SNAPSHOT_KIND, snap)
        # The origin sandbox's lock: a snapshot being taken under this id finishes first.
        key = str(entry["body"].get("sandbox_id")) if entry else snap
        with self.sb._lock(key):
            entry = self.catalog.get(SNAPSHOT_KIND, snap)
            if entry is not None:  # CAT-8: mark, delete the files, then the entry
                self.catalog.put(SNAPSHOT_KIND, snap, {**entry["body"], "state": "removing"})
            for path in (self.dir(snap), self.root / f"{snap}.new"):
                shutil.rmtree(path, ignore_errors=True)
            if self.root.is_dir():
                _fsync_dir(self.root)
            if entry is not None:
                self.catalog.delete(SNAPSHOT_KIND, snap)
            log.info("snapshot %s removed%s", snap, "" if entry else " (it was already gone)")
            return {"snapshot_id": snap, "removed": entry is not None}


    # --- EXPORT_SANDBOX (RT-14 export, TPL-24, TPL-25) -----------------------------------------

    def export_task(self, ctx: TaskContext) -> dict[str, Any]:
        """A standalone raw ext4 of the guest-visible disk, taken while paused, becomes the
        verified artifact ``store/artifacts/<artifact id>/rootfs.ext4`` (kind ``flat``: its
        fingerprint is sha256 of canonical {kind: "flat", sha256}, TPL-25). Idempotent by
        artifact id."""
        self.sb._require()
        sid = _id("sandbox", ctx.args.get("sandbox_id"), "sandbox_id", "sbx-<24 hex>")
        aid = check_artifact_id(ctx.args.get("artifact_id"))
        store = Store.under(self.sb.cfg.agent.state_dir)
        with self.sb._lock(sid):
            existing = self.catalog.get(ARTIFACT_KIND, aid)
            if existing is not None and existing["body"].get("state") == "verified" and \
                    (store.artifact_dir(aid) / ROOTFS).is_file():
                b = existing["body"]
                return {"artifact_id": aid, "files": b.get("files"), "sha256": b.get("sha256"), "size": b.get("size")}
            entry = self.catalog.get(SANDBOX_KIND, sid)
            if entry is None:
                raise SandboxNotFound(f"sandbox {sid} is not on this node", {"sandbox_id": sid})
            if entry["body"].get("state") != "RUNNING" or not self.driver.alive(sid):
                raise SandboxNotRunning(f"sandbox {sid} is {entry['body'].get('state')}, not RUNNING",
                                        {"sandbox_id": sid, "state": entry["body"].get("state")})
            check_writable(self.sb.cfg, "exports")
            work = store.new_try(aid)
            try:
                ctx.progress({"phase": "SNAPSHOTTING"})
                res = self.driver.export(sid, str(work / "artifact"))
                staged = work / "artifact"
                sha = _sha256(staged / ROOTFS)
                _fsync_tree(staged)
                final = store.artifact_dir(aid)
                if final.exists():  # a stale copy of an interrupted export of this id
                    shutil.rmtree(final)
                os.rename(staged, final)
                fsync_dir(store.artifacts)
            finally:
                store.end_try(work)
            size = int(res["files"][0]["size"])
            files = [{"name": ROOTFS, "size": size, "sha256": sha}]
            body = {"kind": "flat", "state": "verified", "fingerprint": canonical.digest({"kind": "flat", "sha256": sha}),
                    "sha256": sha, "size": size, "files": files, "source": {"sandbox_id": sid},
                    "pause_ms": res["pause_ms"]}
            self.catalog.put(ARTIFACT_KIND, aid, body)  # after the file (CAT-8)
            log.info("sandbox %s exported as %s (%d MiB, pause %d ms)", sid, aid, size >> 20, res["pause_ms"])
            return {"artifact_id": aid, "files": files, "sha256": sha, "size": size}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _info(snap: str, body: dict[str, Any]) -> dict[str, Any]:
    """SNAPSHOT_SANDBOX's result, the same for the first and a re-sent task."""
    sizes = {k: 0 for k in SIZE_FILES}
    for f in body.get("files") or []:
        for k, name in SIZE_FILES.items():
            if f.get("name") == name:
                sizes[k] = int(f.get("size") or 0)
    return {"snapshot_id": snap, "sandbox_id": body.get("sandbox_id"), "template_id": body.get("template_id"),
            "base_artifact_id": body.get("base_artifact_id"), "pause_ms": int(body.get("pause_ms") or 0),
            "sizes": sizes, "pins": body.get("pins") or {}, "facts": body.get("facts") or {}}


def _id(kind: str, value: Any, field: str, shape: str) -> str:
    if not ids.valid(kind, value):
        raise InvalidRequest(f"{field} {str(value)[:80]!r} is not {shape}", {"field": field, "reason": "format"})
    return str(value)


def _fsync_tree(d: Path) -> None:
    """CAT-8: the files are durable before the rename that publishes them."""
    for p in d.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(d)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
