"""The snapshot job types: SNAPSHOT_CREATE, SNAPSHOT_ROLLBACK, SNAPSHOT_DELETE (SNAP-3 to SNAP-14).

Each is a persisted job (the write-ahead log, TPL-31): the caller's wait (SNAP-5) only follows
it, so a caller going away never stops it. Agent tasks have deterministic ids (CONV-1): a step
re-run after a crash re-sends the same task and gets the agent's recorded outcome.

    SNAPSHOT_CREATE    SNAPSHOT (SNAPSHOTTING 10: the agent pauses, saves, resumes, RT-12)
                       REGISTER (REGISTERING 70, 85: pins, sizes, facts; the row READY)
    SNAPSHOT_ROLLBACK  PREPARE  (ROLLBACK_PREPARING 0: the new generation, SNAP-9)
                       DRIVE    (ROLLBACK_DRIVING 25: RT-14 on the origin node; the runtime
                                 ref acquired, switching the sandbox's previous one, SNAP-18)
    SNAPSHOT_DELETE    REMOVE   (DELETING 20: REMOVE_SNAPSHOT on the node, absent = success)
                       DROP     (the row goes; its base artifact loses this reference, GC-1)

A job's outcome for the caller lives in ``step_state["result"]``.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from sqlalchemy.engine import Engine

from protocol.errors import NodeUnavailable, SnapshotNotFound

from ..jobs.base import JobContext, JobType
from ..sandboxes import catalog_sandboxes, update_record
from . import refs
from . import rows

log = logging.getLogger(__name__)


@dataclass
class SnapshotServices:
    engine: Engine
    node_known: Callable[[str], bool]
    gen_scan: int = 100                 # snapshot.rollback_gen_scan (SNAP-9)
    cleanup_timeout: float = 60.0       # cleanup.rpc_timeout (SNAP-4)


def bind(job_type: type[JobType], services: SnapshotServices) -> type[JobType]:
    return type(job_type.__name__, (job_type,), {"services": services})


def info(snap: Mapping[str, Any]) -> dict[str, Any]:
    """A snapshot as commands show it (SNAP-17 items, show)."""
    return {"snapshot_id": snap["id"], "name": snap["name"], "status": snap["status"],
            "sandbox_id": snap["sandbox_id"], "node_id": snap["node_id"], "template_id": snap["template_id"],
            "base_artifact_id": snap["base_artifact_id"], "pins": dict(snap["pins"] or {}),
            "host_facts": dict(snap["host_facts"] or {}), "sizes": dict(snap["sizes"] or {}),
            "pause_ms": snap["pause_ms"], "last_error": snap["last_error"],
            "created_ms": snap["created_ms"], "updated_ms": snap["updated_ms"]}


class _SnapshotJob(JobType):
    services: ClassVar[SnapshotServices]

    async def _snapshot(self, ctx: JobContext) -> dict[str, Any]:
        snap = await ctx.db(rows.get, self.services.engine, ctx.job["resource_id"])
        if snap is None:
            raise SnapshotNotFound(f"snapshot {ctx.job['resource_id']} not found",
                                   {"snapshot_id": ctx.job["resource_id"]})
        return snap

    async def _remove_on_node(self, ctx: JobContext, snap: Mapping[str, Any], *, bounded: bool) -> None:
        """REMOVE_SNAPSHOT on the origin node (the agent treats an absent snapshot as removed)."""
        node = snap["node_id"]
        if not self.services.node_known(node):
            return  # a removed node (NODE-14): nothing left there to ask
        coro = ctx.run_task(node, "REMOVE_SNAPSHOT", {"snapshot_id": snap["id"]}, step=f"{ctx.step}:REMOVE")
        if bounded:
            await asyncio.wait_for(coro, self.services.cleanup_timeout)
        else:
            await coro


class SnapshotCreateJob(_SnapshotJob):
    operation = "SNAPSHOT_CREATE"
    steps = ("SNAPSHOT", "REGISTER")

    async def step_snapshot(self, ctx: JobContext) -> None:
        await ctx.set_phase("SNAPSHOTTING")
        snap = await self._snapshot(ctx)
        ctx.state["agent"] = await ctx.run_task(snap["node_id"], "SNAPSHOT_SANDBOX",
                                                {"sandbox_id": snap["sandbox_id"], "snapshot_id": snap["id"]})

    async def step_register(self, ctx: JobContext) -> None:
        await ctx.set_phase("REGISTERING")
        snap = await self._snapshot(ctx)
        got = ctx.state.get("agent") or {}
        # The origin's copy is the snapshot's one replica: READY with the agent's pins, which
        # include the host kernel (SNAP-4, COMPAT-1), and the host facts restores must match.
        await ctx.db(rows.set_fields, self.services.engine, snap["id"], pins=dict(got.get("pins") or {}),
                     host_facts=dict(got.get("facts") or {}),
                     base_artifact_id=got.get("base_artifact_id") or snap["base_artifact_id"],
                     template_id=got.get("template_id") or snap["template_id"])
        await ctx.progress(85)
        if not await ctx.db(rows.set_status, self.services.engine, snap["id"], rows.CREATING, rows.READY,
                            sizes=dict(got.get("sizes") or {}), pause_ms=got.get("pause_ms"), last_error=""):
            now = await self._snapshot(ctx)
            if now["status"] != rows.READY:
                raise SnapshotNotFound(f"snapshot {snap['id']} is {now['status']}, not CREATING",
                                       {"snapshot_id": snap["id"], "status": now["status"]})
        ctx.state["result"] = info(await self._snapshot(ctx))

    async def cleanup(self, ctx: JobContext, error: Mapping[str, str]) -> None:
        """SNAP-4: removal on the node (1 min, tried), the row FAILED with the error."""
        snap = await ctx.db(rows.get, self.services.engine, ctx.job["resource_id"])
        if snap is None:
            return
        try:
            await self._remove_on_node(ctx, snap, bounded=True)
        except Exception as exc:  # noqa: BLE001 — tried once; `snapshot delete` of the FAILED row removes what stays
            log.warning("snapshot %s: removal after a failed create did not finish: %s", snap["id"], exc)
        await ctx.db(rows.set_status, self.services.engine, snap["id"], rows.CREATING, rows.FAILED,
                     last_error=f"{error['name']}: {error['message']}"[:4000])


class SnapshotRollbackJob(_SnapshotJob):
    operation = "SNAPSHOT_ROLLBACK"
    steps = ("PREPARE", "DRIVE")

    def _generation(self, sandbox_id: str) -> int:
        """SNAP-9: 1 + max(active ref generation, the last rollback jobs' generations, the
        generation the node reports for the sandbox)."""
        eng = self.services.engine
        with eng.connect() as c:
            active = refs.active_generation(c, sandbox_id)
            recent = rows.recent_rollback_generation(c, sandbox_id, self.services.gen_scan)
        live = catalog_sandboxes(eng, sandbox_id).get(sandbox_id)
        reported = int((live[1].get("generation") or 0) if live else 0)
        return 1 + max(active, recent, reported, 0)

    async def step_prepare(self, ctx: JobContext) -> None:
        await ctx.set_phase("ROLLBACK_PREPARING")
        snap = await self._snapshot(ctx)
        if not ctx.state.get("generation"):
            ctx.state["generation"] = await ctx.db(self._generation, snap["sandbox_id"])

    async def step_drive(self, ctx: JobContext) -> None:
        await ctx.set_phase("ROLLBACK_DRIVING")
        snap = await self._snapshot(ctx)
        gen = int(ctx.state["generation"])
        got = await ctx.run_task(snap["node_id"], "ROLLBACK_SANDBOX",
                                 {"sandbox_id": snap["sandbox_id"], "snapshot_id": snap["id"], "generation": gen})
        await ctx.db(self._acquire, snap, gen)
        ctx.state["result"] = {"sandbox_id": snap["sandbox_id"], "snapshot_id": snap["id"], "node_id": snap["node_id"],
                               "generation": gen, "state": got.get("state"), "restore_ms": got.get("restore_ms")}

    def _acquire(self, snap: Mapping[str, Any], gen: int) -> None:
        with self.services.engine.begin() as c:
            refs.acquire(c, snapshot_id=snap["id"], sandbox_id=snap["sandbox_id"], node_id=snap["node_id"],
                         generation=gen, now_ms=rows.now_ms())
        update_record(self.services.engine, snap["sandbox_id"], state="RUNNING", exit_code=None, last_error="")

    async def cleanup(self, ctx: JobContext, error: Mapping[str, str]) -> None:
        """SNAP-10: FAILED in ROLLBACK_RECOVERING, the agent's answer kept in the result."""
        ctx.stage(phase="ROLLBACK_RECOVERING")
        ctx.state["result"] = {"agent_error": dict(error), "generation": ctx.state.get("generation")}


class SnapshotDeleteJob(_SnapshotJob):
    operation = "SNAPSHOT_DELETE"
    steps = ("REMOVE", "DROP")

    async def step_remove(self, ctx: JobContext) -> None:
        await ctx.set_phase("DELETING")
        snap = await ctx.db(rows.get, self.services.engine, ctx.job["resource_id"])
        if snap is None:
            return
        ctx.state["tombstone"] = snap["status"] == rows.DELETED
        try:
            await self._remove_on_node(ctx, snap, bounded=False)
        except NodeUnavailable as exc:
            raise NodeUnavailable(f"snapshot {snap['id']}: node {snap['node_id']} could not remove it "
                                  f"({exc.message}); delete again once it is back",
                                  {"snapshot_id": snap["id"], "node": snap["node_id"]}) from None

    async def step_drop(self, ctx: JobContext) -> None:
        await ctx.db(rows.drop, self.services.engine, ctx.job["resource_id"])
        ctx.state["result"] = {"snapshot_id": ctx.job["resource_id"], "deleted": True,
                               "tombstoned": False}

    async def cleanup(self, ctx: JobContext, error: Mapping[str, str]) -> None:
        """SNAP-13: the snapshot FAILED (a tombstone stays DELETED) with the error; retry allowed."""
        msg = f"delete: {error['name']}: {error['message']}"[:4000]
        eng, sid = self.services.engine, ctx.job["resource_id"]
        if not await ctx.db(rows.set_status, eng, sid, rows.DELETING, rows.FAILED, last_error=msg):
            await ctx.db(rows.set_fields, eng, sid, last_error=msg)


def types(services: SnapshotServices) -> list[type[JobType]]:
    return [bind(t, services) for t in (SnapshotCreateJob, SnapshotRollbackJob, SnapshotDeleteJob)]


__all__ = ["SnapshotCreateJob", "SnapshotDeleteJob", "SnapshotRollbackJob", "SnapshotServices", "info", "types"]
