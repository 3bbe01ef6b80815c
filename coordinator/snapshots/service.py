"""Snapshot operations for callers: create, rollback, delete, list, show (SNAP-1 to SNAP-17),
the tombstone finaliser (SNAP-14) and the stuck-snapshot pass (GC-9).

An operation checks its inputs, then inserts its job (and, for create, the snapshot row) in
one transaction, and follows the job to a terminal state within ``snapshot.op_timeout``
(SNAP-5). The job runs on in the runner whatever happens to the caller. Per-resource locks
are taken in the order sandbox, snapshot, request (SNAP-7): they make the check-then-insert
of one coordinator atomic per resource; the database's unique (request id, operation) pair
settles the rest.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from protocol import ids
from protocol.errors import (InvalidRequest, NodeUnavailable, SandboxNotRunning, SandboxUnsupported,
                             SnapshotNotFound, SnapshotReplicaMetadataIncomplete,
                             SnapshotSandboxMismatch, TCError, TemplateAttemptInProgress, Timeout, error_class)

from ..jobs import transitions as tr
from ..jobs.requests import sanitize_and_digest
from ..jobs.store import JobStore, job_info
from ..resolve.index import ResolveIndex
from ..sandboxes import locate
from ..storage import check_writable
from . import refs, rows
from .jobs import info

log = logging.getLogger(__name__)

POLL_S = 0.2
NAME_MAX = 128


class KeyedLocks:
    """One asyncio lock per resource key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, *keys: str) -> AsyncIterator[None]:
        """Take the locks in the order given (callers pass sandbox, snapshot, request)."""
        async with contextlib.AsyncExitStack() as stack:
            for key in keys:
                lock, n = self._locks.get(key) or (asyncio.Lock(), 0)
                self._locks[key] = (lock, n + 1)
                stack.callback(self._release, key)
                await stack.enter_async_context(lock)
            yield

    def _release(self, key: str) -> None:
        lock, n = self._locks[key]
        if n <= 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, n - 1)


def _check_id(kind: str, value: Any, field: str) -> str:
    if not isinstance(value, str) or not ids.valid(kind, value):
        raise InvalidRequest(f"{field} {str(value)[:80]!r} is not a valid {kind} id", {"field": field, "reason": "format"})
    return value


class SnapshotOps:
    """The coordinator's snapshot operations; one per coordinator."""

    def __init__(self, engine: Engine, jobs: JobStore, index: ResolveIndex, *, wake: Callable[[], None],
                 op_timeout: float = 900.0, stuck_after: float = 900.0, list_limit: int = 20, list_max: int = 100,
                 interval: float = 300.0) -> None:
        self.engine = engine
        self.jobs = jobs
        self.index = index
        self.wake = wake
        self.op_timeout = op_timeout
        self.stuck_after = stuck_after
        self.list_limit = list_limit
        self.list_max = list_max
        self.interval = interval
        self.locks = KeyedLocks()
        self._background: set[asyncio.Task[Any]] = set()

    # --- shared checks ------------------------------------------------------------------------

    def _existing(self, request_id: str, operation: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        """SNAP-6: the job already bound to this request id, or the SPEC's refusal."""
        if not isinstance(request_id, str) or not ids.valid("request", request_id):
            raise InvalidRequest(f"invalid request id {str(request_id)[:80]!r}", {"field": "request_id",
                                                                                 "reason": "format"})
        _, want = sanitize_and_digest(payload)
        found = rows.jobs_by_request(self.engine, request_id)
        for job in found:
            if job["operation"] == operation:
                if job["request_digest"] != want:
                    raise TemplateAttemptInProgress("payload does not match existing snapshot job",
                                                    {"request_id": request_id, "job_id": job["id"]})
                return job
        if found:
            raise TemplateAttemptInProgress(f"request {request_id} is already bound to {found[0]['operation']}",
                                            {"request_id": request_id, "job_id": found[0]["id"],
                                             "operation": found[0]["operation"]})
        return None

    def _writable_node(self, node: str) -> None:
        """The node is reachable, sandbox-capable and may take writes (SNAP-2, SNAP-16)."""
        e = self.index.node(node)
        if e is None or e.health in ("SUSPECT", "LOST"):
            raise NodeUnavailable(f"node {node} is {e.health if e else 'unknown'}", {"node": node})
        if not e.sandbox:
            raise SandboxUnsupported(f"node {node} has no sandbox runtime (driver none)", {"node": node})
        check_writable(node, e.usage, e.storage_mode)

    @staticmethod
    def _busy_sandbox(s: Session, sandbox_id: str) -> None:
        job = rows.active_sandbox_job(s.connection(), sandbox_id)
        if job is not None:
            raise TemplateAttemptInProgress(
                f"sandbox {sandbox_id} has an active {job['operation']} (job_id={job['id']})",
                {"sandbox": sandbox_id, "job_id": job["id"], "operation": job["operation"]})

    # --- create (SNAP-1 to SNAP-4) ------------------------------------------------------------

    async def create(self, *, request_id: str, sandbox: str, name: str = "") -> dict[str, Any]:
        sandbox = _check_id("sandbox", sandbox, "sandbox")
        if not isinstance(name, str) or len(name) > NAME_MAX:
            raise InvalidRequest(f"display name is longer than {NAME_MAX} characters", {"field": "name",
                                                                                       "reason": "length"})
        payload = {"sandbox": sandbox, "name": name}
        async with self.locks.hold(f"sbx:{sandbox}", f"req:{request_id}"):
            job = await asyncio.to_thread(self._existing, request_id, "SNAPSHOT_CREATE", payload)
            if job is None:
                job = await asyncio.to_thread(self._submit_create, request_id, sandbox, name, payload)
        self.wake()
        return await self._follow(job["id"])

    def _submit_create(self, request_id: str, sandbox: str, name: str, payload: dict[str, Any]) -> dict[str, Any]:
        rec, node, state = locate(self.engine, sandbox)
        if state != "RUNNING":
            raise SandboxNotRunning(f"sandbox {sandbox} is {state or 'unknown'}, not RUNNING",
                                    {"sandbox": sandbox, "state": state})
        self._writable_node(node)
        snap_id = ids.new_id("snap")  # SNAP-1: generated before anything goes to an agent
        spec = (rec or {}).get("spec") or {}

        def prepare(s: Session) -> None:
            self._busy_sandbox(s, sandbox)
            rows.insert_row(s.connection(), {
                "id": snap_id, "name": name, "sandbox_id": sandbox, "node_id": node,
                "template_id": (rec or {}).get("template_id"), "base_artifact_id": spec.get("artifact_id"),
                "runtime_config": dict((rec or {}).get("runtime_config") or {}),
                "sizes": {"vcpus": (rec or {}).get("vcpus"), "memory_mib": (rec or {}).get("memory_mib")}})
        return self.jobs.submit_job(request_id=request_id, operation="SNAPSHOT_CREATE", resource_type="snapshot",
                                    resource_id=snap_id, request=payload, phase="SNAPSHOTTING",
                                    prepare=prepare).job

    # --- rollback (SNAP-8 to SNAP-10) -----------------------------------------------------------

    async def rollback(self, *, request_id: str, sandbox: str, snapshot: str) -> dict[str, Any]:
        sandbox = _check_id("sandbox", sandbox, "sandbox")
        snapshot = _check_id("snapshot", snapshot, "snapshot")
        payload = {"sandbox": sandbox, "snapshot": snapshot}
        async with self.locks.hold(f"sbx:{sandbox}", f"snap:{snapshot}", f"req:{request_id}"):
            job = await asyncio.to_thread(self._existing, request_id, "SNAPSHOT_ROLLBACK", payload)
            if job is None:
                job = await asyncio.to_thread(self._submit_rollback, request_id, sandbox, snapshot, payload)
        self.wake()
        return await self._follow(job["id"])

    def source(self, snapshot: str) -> dict[str, Any]:
        """A snapshot usable as a source (rollback, sandbox create, commit): SNAP-8, SNAP-12."""
        snapshot = _check_id("snapshot", snapshot, "snapshot")
        snap = rows.check_source(snapshot, rows.get(self.engine, snapshot))
        if not rows.listed_on_node(self.engine, snap["node_id"], snapshot):
            raise SnapshotReplicaMetadataIncomplete(
                f"node {snap['node_id']}'s catalog does not list snapshot {snapshot}",
                {"snapshot": snapshot, "node": snap["node_id"]})
        return snap

    def _submit_rollback(self, request_id: str, sandbox: str, snapshot: str, payload: dict[str, Any]
                         ) -> dict[str, Any]:
        snap = self.source(snapshot)
        if snap["sandbox_id"] != sandbox:
            raise SnapshotSandboxMismatch(f"snapshot {snapshot} was taken from sandbox {snap['sandbox_id']}, "
                                          f"not {sandbox}", {"snapshot": snapshot, "sandbox": sandbox,
                                                              "origin": snap["sandbox_id"]})
        locate(self.engine, sandbox)
        self._writable_node(snap["node_id"])  # SNAP-9: rollback stays on the origin node
        return self.jobs.submit_job(request_id=request_id, operation="SNAPSHOT_ROLLBACK", resource_type="snapshot",
                                    resource_id=snapshot, request=payload, phase="ROLLBACK_PREPARING",
                                    prepare=lambda s: self._busy_sandbox(s, sandbox)).job

    # --- delete (SNAP-11 to SNAP-13) ---------------------------------------------------------------

    async def delete(self, *, request_id: str, snapshot: str) -> dict[str, Any]:
        snapshot = _check_id("snapshot", snapshot, "snapshot")
        payload = {"snapshot": snapshot}
        async with self.locks.hold(f"snap:{snapshot}", f"req:{request_id}"):
            job = await asyncio.to_thread(self._existing, request_id, "SNAPSHOT_DELETE", payload)
            if job is None:
                job = await asyncio.to_thread(self._submit_delete, request_id, snapshot, payload)
        self.wake()
        return await self._follow(job["id"])

    def _submit_delete(self, request_id: str, snapshot: str, payload: dict[str, Any]) -> dict[str, Any]:
        snap = rows.get(self.engine, snapshot)
        if snap is None:
            raise SnapshotNotFound(f"snapshot {snapshot} not found", {"snapshot": snapshot})
        with self.engine.connect() as c:
            held = refs.active_refs(c, snapshot)
        tombstone = bool(held)

        def prepare(s: Session) -> None:
            c = s.connection()
            now = rows.get(c, snapshot)
            if now is None:
                raise SnapshotNotFound(f"snapshot {snapshot} not found", {"snapshot": snapshot})
            if now["status"] == rows.CREATING:
                raise TemplateAttemptInProgress("snapshot is still creating", {"snapshot": snapshot})
            if now["status"] == rows.DELETING:
                raise TemplateAttemptInProgress("snapshot is already deleting", {"snapshot": snapshot})
            job = rows.active_snapshot_job(c, snapshot)
            if job is not None:
                raise TemplateAttemptInProgress(f"snapshot {snapshot} has an active {job['operation']} "
                                                f"(job_id={job['id']})", {"snapshot": snapshot, "job_id": job["id"]})
            if bool(refs.active_refs(c, snapshot)) != tombstone:
                raise TemplateAttemptInProgress(f"snapshot {snapshot}'s runtime refs changed; try again",
                                                {"snapshot": snapshot})
            to = rows.DELETED if tombstone else rows.DELETING
            s.execute(rows.SN.update().where(rows.SN.c.id == snapshot).values(status=to, updated_ms=rows.now_ms()))

        overrides: dict[str, Any] = {}
        if tombstone:  # SNAP-12: nothing to run; the finaliser removes the files later
            now = rows.now_ms()
            result = {"snapshot_id": snapshot, "deleted": True, "tombstoned": True,
                      "refs": sorted({r["sandbox_id"] for r in held})}
            overrides = {"status": "READY", "phase": "READY", "progress": 100, "step_state": {"result": result},
                         "started_ms": now, "finished_ms": now}
        return self.jobs.submit_job(request_id=request_id, operation="SNAPSHOT_DELETE", resource_type="snapshot",
                                    resource_id=snapshot, request=payload, phase="DELETING", prepare=prepare,
                                    overrides=overrides).job

    # --- following a job (SNAP-5) ------------------------------------------------------------------

    async def _follow(self, job_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.op_timeout
        while True:
            job = await asyncio.to_thread(self.jobs.get_job, job_id)
            if job["status"] == "READY":
                return {**((job["step_state"] or {}).get("result") or {}), "job": job_info(job)}
            if job["status"] == "FAILED":
                err = job["error"] or {}
                try:
                    cls = error_class(str(err.get("name")))
                except KeyError:
                    cls = error_class("Internal")
                raise cls(str(err.get("message") or err.get("name")), {"job_id": job_id})
            if time.monotonic() >= deadline:
                raise Timeout(f"{job['operation']} {job['resource_id']} is still {job['status']} in "
                              f"{job['phase']} after {self.op_timeout:.0f}s; it keeps running: "
                              f"tcctl job watch {job_id}", {"job_id": job_id})
            await asyncio.sleep(POLL_S)

    # --- list / show (SNAP-17) ----------------------------------------------------------------------

    def list(self, *, snapshot_id: str | None = None, sandbox: str | None = None, name: str | None = None,
             status: str | None = None, limit: int | None = None, next_token: str | None = None) -> dict[str, Any]:
        if status and status.upper() not in rows.STATUSES:
            raise InvalidRequest(f"status {status!r} is not one of {', '.join(rows.STATUSES)}",
                                 {"field": "status", "reason": "enum"})
        offset = 0
        if next_token not in (None, ""):
            if not str(next_token).isdigit() or len(str(next_token)) > 9:
                raise InvalidRequest("invalid next_token", {"field": "next_token", "reason": "format"})
            offset = int(str(next_token))
        n = self.list_limit if not limit else max(1, min(int(limit), self.list_max))
        found = rows.listing(self.engine, snapshot_id=snapshot_id, sandbox=sandbox, name=name, status=status,
                             limit=n + 1, offset=offset)
        page = found[:n]
        summary = refs.ref_summary(self.engine, [s["id"] for s in page])
        items = []
        for s in page:
            count, users = summary.get(s["id"], (0, []))
            items.append({**info(s), "runtime_ref_count": count, "runtime_ref_sandboxes": users})
        return {"snapshots": items, "next_token": str(offset + n) if len(found) > n else ""}

    def show(self, snapshot: str) -> dict[str, Any]:
        snapshot = _check_id("snapshot", snapshot, "snapshot")
        snap = rows.get(self.engine, snapshot)
        if snap is None or snap["status"] == rows.DELETED:  # SNAP-12: tombstones are hidden
            raise SnapshotNotFound(f"snapshot {snapshot} not found", {"snapshot": snapshot})
        with self.engine.connect() as c:
            held = refs.active_refs(c, snapshot)
        listed = rows.listed_on_node(self.engine, snap["node_id"], snapshot)
        jobs = self.jobs.list_jobs(resource_id=snapshot, limit=10)
        return {**info(snap), "runtime_ref_count": len(held),
                "runtime_ref_sandboxes": sorted({r["sandbox_id"] for r in held}),
                "runtime_refs": held,
                "replicas": [{"node_id": snap["node_id"], "status": snap["status"], "in_catalog": listed,
                              "pins": dict(snap["pins"] or {})}],
                "jobs": [job_info(j) for j in jobs]}

    # --- refs released, tombstones (SNAP-14, SNAP-19) and stuck rows (GC-9) ---------------------

    async def sandbox_gone(self, sandbox_id: str) -> None:
        """SNAP-19: a destroyed sandbox's ACTIVE refs are released, then the finaliser runs."""
        released = await asyncio.to_thread(refs.release_sandbox, self.engine, sandbox_id, "sandbox destroyed")
        await self.finalize(released)

    async def finalize(self, snapshot_ids: Iterable[str] | None = None) -> list[str]:
        """SNAP-14: fail stale delete jobs on tombstones, then start a background delete job for
        every DELETED snapshot left with no ACTIVE ref and no active job."""
        await asyncio.to_thread(self._fail_stale_deletes)
        started = []
        for snap in await asyncio.to_thread(rows.finalizable, self.engine,
                                            None if snapshot_ids is None else list(snapshot_ids)):
            rid = f"tombstone-finalize:{uuid.uuid4().hex}"
            try:
                await asyncio.to_thread(self.jobs.submit_job, request_id=rid, operation="SNAPSHOT_DELETE",
                                        resource_type="snapshot", resource_id=snap, request={"snapshot": snap},
                                        phase="DELETING")
            except TCError as exc:
                log.info("tombstone %s not finalised now: %s", snap, exc.message)
                continue
            started.append(snap)
            log.info("tombstone %s has no runtime refs left: removing its files (%s)", snap, rid)
        if started:
            self.wake()
        return started

    def _fail_stale_deletes(self) -> None:
        cutoff = rows.now_ms() - int(self.op_timeout * 1000)
        for job in rows.stale_tombstone_jobs(self.engine, cutoff):
            with self.jobs.sessions.begin() as s:
                tr.transition_job(s, job["id"], job["status"], tr.FAILED, error={
                    "name": "Timeout", "message": f"tombstone delete did not finish within {self.op_timeout:.0f}s"})

    def fail_stuck(self) -> list[str]:
        """GC-9: CREATING/DELETING rows older than ``snapshot.stuck_after`` with no active job."""
        failed = []
        for snap in rows.stuck(self.engine, rows.now_ms() - int(self.stuck_after * 1000)):
            mins = int(self.stuck_after // 60)
            if rows.set_status(self.engine, snap["id"], snap["status"], rows.FAILED,
                               last_error=f"remained in {snap['status']} beyond {mins}m"):
                failed.append(snap["id"])
        return failed

    async def reconcile(self) -> None:
        failed = await asyncio.to_thread(self.fail_stuck)
        if failed:
            log.warning("snapshots stuck beyond %.0fs marked FAILED: %s", self.stuck_after, ", ".join(failed))
        await self.finalize()

    async def on_refs_released(self, snapshot_ids: list[str]) -> None:
        await self.finalize(snapshot_ids)

    async def run(self) -> None:
        """GC-10: at start and then every ``reconcile.interval``."""
        while True:
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("snapshot reconcile pass failed; next pass in %.0fs", self.interval)
            await asyncio.sleep(self.interval)

