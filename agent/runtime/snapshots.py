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

from protocol import canonical, fingerprints, ids
from protocol.errors import (InvalidRequest, SandboxNotFound, SandboxNotRunning,
                             SnapshotNotFound, SnapshotSandboxMismatch)

from ..catalog import ARTIFACT_KIND, REPLICA_KIND, SANDBOX_KIND, SNAPSHOT_KIND
from ..image.store import ROOTFS, Store, check_artifact_id, fsync_dir, fsync_tree
from ..storage import check_writable
from ..tasks import TaskContext
from . import disks

if TYPE_CHECKING:
    from .sandboxes import SandboxService

log = logging.getLogger("snapshots")

# A commit's memstate artifact (TPL-25): what a memory restore needs besides the disk.
MEMSTATE_FILES = ("config.img", "memory.img", "meta.json", "state.mig")
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

    def usable(self, snap: str) -> dict[str, Any]:
        """The snapshot's catalog entry, when its files are here and it is not being removed."""
        sentry = self.catalog.get(SNAPSHOT_KIND, snap)
        if sentry is None or sentry["body"].get("state") == "removing" or not self.dir(snap).is_dir():
            raise SnapshotNotFound(f"snapshot {snap} is not on this node", {"snapshot_id": snap})
        return sentry

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
                fsync_tree(tmp)
                os.rename(tmp, final)
                fsync_dir(self.root)
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
            body = self.usable(snap)["body"]
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
                fsync_dir(self.root)
            if entry is not None:
                self.catalog.delete(SNAPSHOT_KIND, snap)
            log.info("snapshot %s removed%s", snap, "" if entry else " (it was already gone)")
            return {"snapshot_id": snap, "removed": entry is not None}


    # --- EXPORT_SANDBOX (RT-14 export, TPL-24, TPL-25) -----------------------------------------

    def export_task(self, ctx: TaskContext) -> dict[str, Any]:
        """A standalone raw ext4 of the guest-visible disk becomes the verified artifact
        ``store/artifacts/<artifact id>/rootfs.ext4`` (kind ``flat``: its fingerprint is sha256
        of canonical {kind: "flat", sha256}, TPL-25).

        Source: ``sandbox_id`` (a RUNNING sandbox, copied while paused), or ``snapshot_id`` (a
        snapshot on this node: its frozen ``disk.raw``, no pause). Name: ``artifact_id`` when
        given (idempotent by that id); without it the artifact is named by its fingerprint,
        ``art-`` + 24 hex (CONV-1) — what a COMMIT job needs, as the sha256 is only known
        here. A re-sent task is answered from the task record; an identical copy already
        verified under that name is kept as it is (it may back replicas).

        With ``memory_template_id`` (a sandbox source, TPL-24 memory mode) the pause also
        captures device state and memory (RT-12): the export is that snapshot's frozen disk, and
        the snapshot becomes the template's memory snapshot on this node (the replica entry a
        ``restore: memory`` sandbox create uses, as PREPARE_REPLICA leaves it); the result then
        carries ``memory`` {has_memory_snapshot, pins, facts}."""
        self.sb._require()
        a = ctx.args
        snap = _id("snapshot", a["snapshot_id"], "snapshot_id", "snap-<24 hex>") if a.get("snapshot_id") else None
        sid = None if snap else _id("sandbox", a.get("sandbox_id"), "sandbox_id", "sbx-<24 hex>")
        aid = check_artifact_id(a["artifact_id"]) if a.get("artifact_id") is not None else None
        mem_tpl = (_id("template", a["memory_template_id"], "memory_template_id", "tpl-<24 hex>")
                   if a.get("memory_template_id") else None)
        if mem_tpl is not None and snap is not None:
            raise InvalidRequest("a memory snapshot needs a sandbox source", {"field": "memory_template_id",
                                                                              "reason": "conflict"})
        store = Store.under(self.sb.cfg.agent.state_dir)
        if snap is not None:
            sentry = self.catalog.get(SNAPSHOT_KIND, snap)
            lock_key = str(sentry["body"].get("sandbox_id")) if sentry else snap  # as REMOVE_SNAPSHOT
        else:
            lock_key = str(sid)
        with self.sb._lock(lock_key):
            if aid is not None and mem_tpl is None and (done := self._exported(store, aid)) is not None:
                return done
            if snap is not None:
                sentry = self.catalog.get(SNAPSHOT_KIND, snap)
                disk = self.dir(snap) / "disk.raw"
                if sentry is None or sentry["body"].get("state") == "removing" or not disk.is_file():
                    raise SnapshotNotFound(f"snapshot {snap} is not on this node", {"snapshot_id": snap})
                source: dict[str, Any] = {"snapshot_id": snap, "sandbox_id": sentry["body"].get("sandbox_id")}
            else:
                entry = self.catalog.get(SANDBOX_KIND, str(sid))
                if entry is None:
                    raise SandboxNotFound(f"sandbox {sid} is not on this node", {"sandbox_id": sid})
                if entry["body"].get("state") != "RUNNING" or not self.driver.alive(str(sid)):
                    raise SandboxNotRunning(f"sandbox {sid} is {entry['body'].get('state')}, not RUNNING",
                                            {"sandbox_id": sid, "state": entry["body"].get("state")})
                source = {"sandbox_id": sid}
            check_writable(self.sb.cfg, "exports")
            # Without a name yet, the scratch dir is named after the task (a valid artifact id).
            work = store.new_try(aid or "art-" + hashlib.sha256(ctx.task_id.encode()).hexdigest()[:24])
            memory: dict[str, Any] | None = None
            try:
                ctx.progress({"phase": "SNAPSHOTTING"})
                staged = work / "artifact"
                shot = work / "memory"
                if snap is not None or mem_tpl is not None:
                    if mem_tpl is not None:  # pause: state, memory, frozen disk, cont (RT-12)
                        res = self.driver.snapshot(str(sid), str(shot))
                        disk, pause_ms = shot / "disk.raw", int(res["pause_ms"])
                    else:  # a snapshot's disk is already a standalone raw copy (RT-12)
                        pause_ms = 0
                    staged.mkdir()
                    disks.standalone(str(disk), "raw", str(staged / ROOTFS))
                    os.chmod(staged / ROOTFS, 0o644)
                else:
                    pause_ms = int(self.driver.export(str(sid), str(staged))["pause_ms"])
                sha = _sha256(staged / ROOTFS)
                fingerprint = canonical.digest({"kind": "flat", "sha256": sha})
                aid = aid or fingerprints.artifact_id(fingerprint)
                done = self._exported(store, aid)
                if done is not None and done["sha256"] == sha:
                    log.info("%s exported as %s: an identical copy is already here, kept", snap or sid, aid)
                else:  # the same bytes already here under their name are kept (they may back replicas)
                    done = None
                    fsync_tree(staged)
                    final = store.artifact_dir(aid)
                    if final.exists():  # a stale copy of an interrupted export of this id
                        shutil.rmtree(final)
                    os.rename(staged, final)
                    fsync_dir(store.artifacts)
                if mem_tpl is not None:
                    memory = self._keep_memory(mem_tpl, shot, aid, str(sid), pause_ms)
                    memory["memstate"] = self._memstate(store, work / "memstate", self.sb.replica_root / mem_tpl,
                                                        str(sid))
            finally:
                store.end_try(work)
            if done is not None:
                return {**done, "memory": memory} if memory else done
            size = (final / ROOTFS).stat().st_size
            files = [{"name": ROOTFS, "size": size, "sha256": sha}]
            body = {"kind": "flat", "state": "verified", "fingerprint": fingerprint,
                    "sha256": sha, "size": size, "files": files, "source": source, "pause_ms": pause_ms}
            self.catalog.put(ARTIFACT_KIND, aid, body)  # after the file (CAT-8)
            log.info("%s exported as %s (%d MiB, pause %d ms)", snap or sid, aid, size >> 20, pause_ms)
            out = {"artifact_id": aid, "files": files, "sha256": sha, "size": size, "fingerprint": fingerprint,
                   "pause_ms": pause_ms}
            return {**out, "memory": memory} if memory else out

    def _memstate(self, store: Store, staged: Path, replica: Path, sid: str) -> dict[str, Any]:
        """TPL-25: the memory snapshot's files (hard links: neither side is ever written again)
        as a verified ``memstate`` artifact, fingerprint = sha256 of canonical {kind: "memstate",
        files: [{name, sha256}]} — its files' sha256s — which is also its ``sha256``."""
        staged.mkdir()
        files = []
        for name in MEMSTATE_FILES:
            src, dst = replica / name, staged / name
            try:
                os.link(src, dst)
            except OSError:
                disks.clone(str(src), str(dst))
            files.append({"name": name, "size": dst.stat().st_size, "sha256": _sha256(dst)})
        fingerprint = canonical.digest({"kind": "memstate", "files": [{"name": f["name"], "sha256": f["sha256"]}
                                                                      for f in files]})
        mid = fingerprints.artifact_id(fingerprint)
        size = sum(int(f["size"]) for f in files)
        existing = self.catalog.get(ARTIFACT_KIND, mid)
        if existing is None or existing["body"].get("state") != "verified" or existing["body"].get("sha256") != fingerprint:
            fsync_tree(staged)
            final = store.artifact_dir(mid)
            if final.exists():
                shutil.rmtree(final)
            os.rename(staged, final)
            fsync_dir(store.artifacts)
            self.catalog.put(ARTIFACT_KIND, mid, {
                "kind": "memstate", "state": "verified", "fingerprint": fingerprint, "sha256": fingerprint,
                "size": size, "files": files, "source": {"sandbox_id": sid}})  # after the files (CAT-8)
        return {"artifact_id": mid, "fingerprint": fingerprint, "sha256": fingerprint, "size": size, "files": files}

    def _keep_memory(self, template_id: str, shot: Path, aid: str, sid: str, pause_ms: int) -> dict[str, Any]:
        """TPL-24 memory mode: the paused sandbox's snapshot becomes ``template_id``'s memory
        snapshot on this node, in the layout and catalog entry PREPARE_REPLICA leaves (DIST-9),
        so a ``restore: memory`` create resumes the committed guest (RT-11)."""
        import json
        from .sandboxes import FACT_NAMES, PIN_NAMES
        root = self.sb.replica_root
        root.mkdir(parents=True, exist_ok=True)
        files = [{"name": p.name, "size": p.stat().st_size} for p in sorted(shot.iterdir()) if p.is_file()]
        fsync_tree(shot)
        final = root / template_id
        shutil.rmtree(final, ignore_errors=True)  # files without an entry never count (CAT-8)
        os.rename(shot, final)
        fsync_dir(root)
        meta = json.loads((final / "meta.json").read_text())
        versions, facts = self.sb._versions(), self.sb._facts()
        pins = {k: versions.get(k, "") for k in PIN_NAMES}
        host_facts = {k: facts.get(k, "") for k in FACT_NAMES}
        self.catalog.put(REPLICA_KIND, template_id, {
            "artifact_id": aid, "memory": True, "pins": pins, "facts": host_facts, "files": files,
            "pause_ms": pause_ms, "vcpus": meta.get("vcpus"), "memory_mib": meta.get("memory_mib"),
            "source": {"sandbox_id": sid}})  # after the files (CAT-8)
        log.info("memory snapshot of %s kept for %s (pause %d ms)", sid, template_id, pause_ms)
        return {"template_id": template_id, "has_memory_snapshot": True, "pins": pins, "facts": host_facts}

    def _exported(self, store: Store, aid: str) -> dict[str, Any] | None:
        """EXPORT_SANDBOX's result for a verified copy already listed under ``aid``, else None."""
        existing = self.catalog.get(ARTIFACT_KIND, aid)
        if existing is None or existing["body"].get("state") != "verified" or \
                not (store.artifact_dir(aid) / ROOTFS).is_file():
            return None
        b = existing["body"]
        return {"artifact_id": aid, "files": b.get("files"), "sha256": b.get("sha256"), "size": b.get("size"),
                "fingerprint": b.get("fingerprint") or canonical.digest({"kind": "flat", "sha256": b.get("sha256")}),
                "pause_ms": int(b.get("pause_ms") or 0)}


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
