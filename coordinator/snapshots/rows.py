"""Snapshot rows and the job queries the snapshot operations need (SNAP-1 to SNAP-17, GC-9).

Every function is one short synchronous transaction (or runs inside the caller's), called
through ``asyncio.to_thread``. Snapshot statuses change only here, by compare-and-set on the
status the caller expects, so two operations racing on one snapshot never both win.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine

from protocol.errors import SnapshotNotFound, SnapshotNotReady, TemplateAttemptInProgress

from ..db.models import Job, NodeCatalogEntry, RuntimeRef, Snapshot
from ..jobs import transitions as tr

SN, J, RR, E = Snapshot.__table__, Job.__table__, RuntimeRef.__table__, NodeCatalogEntry.__table__

CREATING, READY, FAILED, DELETING, DELETED = "CREATING", "READY", "FAILED", "DELETING", "DELETED"
STATUSES = (CREATING, READY, FAILED, DELETING, DELETED)
SANDBOX_OPS = ("SNAPSHOT_CREATE", "SNAPSHOT_ROLLBACK")  # SNAP-2: one of these at a time per sandbox
SNAPSHOT_OPS = ("SNAPSHOT_CREATE", "SNAPSHOT_ROLLBACK", "SNAPSHOT_DELETE")


def now_ms() -> int:
    return int(time.time() * 1000)


def get(engine: Engine | Connection, snapshot_id: str) -> dict[str, Any] | None:
    stmt = select(SN).where(SN.c.id == snapshot_id)
    if isinstance(engine, Connection):
        row = engine.execute(stmt).mappings().first()
    else:
        with engine.connect() as c:
            row = c.execute(stmt).mappings().first()
    return dict(row) if row else None


def check_source(snapshot_id: str, snap: dict[str, Any] | None) -> dict[str, Any]:
    """A snapshot usable as a source (rollback, sandbox create, commit), by its status:
    unknown or a tombstone → SnapshotNotFound (SNAP-12), FAILED → SnapshotNotReady, CREATING
    or DELETING → TemplateAttemptInProgress (SNAP-8)."""
    if snap is None or snap["status"] == DELETED:
        raise SnapshotNotFound(f"snapshot {snapshot_id} not found", {"snapshot": snapshot_id})
    if snap["status"] == FAILED:
        raise SnapshotNotReady(f"snapshot {snapshot_id} is FAILED: {snap['last_error']}",
                               {"snapshot": snapshot_id, "status": FAILED, "last_error": snap["last_error"]})
    if snap["status"] != READY:
        raise TemplateAttemptInProgress(f"snapshot {snapshot_id} is {snap['status']}",
                                        {"snapshot": snapshot_id, "status": snap["status"]})
    return snap


def listed_on_node(engine: Engine, node_id: str, snapshot_id: str) -> bool:
    """The node's mirrored catalog lists the snapshot (SNAP-8's metadata check)."""
    with engine.connect() as c:
        return c.execute(select(E.c.entry_id).where(E.c.node_id == node_id, E.c.kind == "snapshot",
                                                    E.c.entry_id == snapshot_id)).first() is not None


def insert_row(conn: Connection, values: dict[str, Any]) -> None:
    """SNAP-3: the CREATING row, inside the transaction that inserts its job."""
    now = now_ms()
    row = {"name": "", "status": CREATING, "template_id": None, "base_artifact_id": None, "host_facts": {},
           "pins": {}, "sizes": {}, "pause_ms": None, "runtime_config": {}, "last_error": "",
           "created_ms": now, "updated_ms": now, **values}
    conn.execute(insert(SN).values(**row))


def set_status(engine: Engine, snapshot_id: str, expect: str | Iterable[str], to: str, **values: Any) -> bool:
    """Compare-and-set the status; False when the row is gone or in another status."""
    expected = [expect] if isinstance(expect, str) else list(expect)
    with engine.begin() as c:
        res = c.execute(update(SN).where(SN.c.id == snapshot_id, SN.c.status.in_(expected))
                        .values(status=to, updated_ms=now_ms(), **values))
        return res.rowcount == 1


def set_fields(engine: Engine, snapshot_id: str, **values: Any) -> None:
    with engine.begin() as c:
        c.execute(update(SN).where(SN.c.id == snapshot_id).values(updated_ms=now_ms(), **values))


def drop(engine: Engine, snapshot_id: str) -> None:
    """SNAP-13: the snapshot row and its (released) refs go; its jobs stay as history."""
    with engine.begin() as c:
        c.execute(delete(RR).where(RR.c.snapshot_id == snapshot_id, RR.c.status != "ACTIVE"))
        c.execute(delete(SN).where(SN.c.id == snapshot_id))


# --- jobs on snapshots and sandboxes -------------------------------------------------------------

def _active(stmt: Any) -> Any:
    return stmt.where(J.c.status.in_(tuple(tr.JOB_ACTIVE)))


def active_sandbox_job(conn: Connection, sandbox_id: str) -> dict[str, Any] | None:
    """An active SNAPSHOT_CREATE/ROLLBACK on the sandbox (SNAP-2, SNAP-8). Both are keyed by a
    snapshot of that sandbox: create by the new one, rollback by one taken from it (SNAP-8
    refuses any other)."""
    snaps = select(SN.c.id).where(SN.c.sandbox_id == sandbox_id)
    row = conn.execute(_active(select(J)).where(J.c.operation.in_(SANDBOX_OPS), J.c.resource_id.in_(snaps))
                       .limit(1)).mappings().first()
    return dict(row) if row else None


def active_snapshot_job(conn: Connection, snapshot_id: str) -> dict[str, Any] | None:
    row = conn.execute(_active(select(J)).where(J.c.resource_id == snapshot_id, J.c.operation.in_(SNAPSHOT_OPS))
                       .limit(1)).mappings().first()
    return dict(row) if row else None


def jobs_by_request(engine: Engine, request_id: str) -> list[dict[str, Any]]:
    with engine.connect() as c:
        return [dict(r) for r in c.execute(select(J).where(J.c.request_id == request_id)
                                           .order_by(J.c.created_ms)).mappings()]


def recent_rollback_generation(conn: Connection, sandbox_id: str, scan: int) -> int:
    """SNAP-9: the highest generation among the sandbox's last ``scan`` rollback jobs."""
    snaps = select(SN.c.id).where(SN.c.sandbox_id == sandbox_id)
    rows = conn.execute(select(J.c.step_state).where(J.c.operation == "SNAPSHOT_ROLLBACK",
                                                     J.c.resource_id.in_(snaps))
                        .order_by(J.c.created_ms.desc()).limit(scan)).scalars()
    return max((int((s or {}).get("generation") or 0) for s in rows), default=0)


def insert_finished_job(conn: Connection, job: dict[str, Any]) -> None:
    """SNAP-12: a tombstoning delete is recorded as a job that is READY from the start."""
    conn.execute(insert(J).values(**job))


def next_attempt(conn: Connection, resource_id: str) -> tuple[int, str | None]:
    latest = conn.execute(select(J.c.id, J.c.attempt_no).where(J.c.resource_id == resource_id)
                          .order_by(J.c.attempt_no.desc()).limit(1)).first()
    return (1, None) if latest is None else (latest.attempt_no + 1, latest.id)


# --- GC-9 and the tombstone pass (SNAP-14) ------------------------------------------------------

def stuck(engine: Engine, older_than_ms: int) -> list[dict[str, Any]]:
    """CREATING/DELETING rows not updated since ``older_than_ms`` with no active job."""
    with engine.connect() as c:
        rows = [dict(r) for r in c.execute(select(SN).where(SN.c.status.in_((CREATING, DELETING)),
                                                            SN.c.updated_ms < older_than_ms)).mappings()]
        return [r for r in rows if active_snapshot_job(c, r["id"]) is None]


def stale_tombstone_jobs(engine: Engine, older_than_ms: int) -> list[dict[str, Any]]:
    """SNAP-14: delete jobs on DELETED rows still PENDING/RUNNING after the cap."""
    tomb = select(SN.c.id).where(SN.c.status == DELETED)
    with engine.connect() as c:
        return [dict(r) for r in c.execute(_active(select(J)).where(
            J.c.operation == "SNAPSHOT_DELETE", J.c.resource_id.in_(tomb),
            J.c.created_ms < older_than_ms)).mappings()]


def finalizable(engine: Engine, snapshot_ids: Iterable[str] | None = None) -> list[str]:
    """DELETED snapshots with no ACTIVE ref and no active job: their files can go now."""
    active_ref = select(RR.c.snapshot_id).where(RR.c.status == "ACTIVE")
    busy = _active(select(J.c.resource_id)).where(J.c.operation.in_(SNAPSHOT_OPS))
    stmt = select(SN.c.id).where(SN.c.status == DELETED, SN.c.id.not_in(active_ref), SN.c.id.not_in(busy))
    if snapshot_ids is not None:
        stmt = stmt.where(SN.c.id.in_(list(snapshot_ids)))
    with engine.connect() as c:
        return sorted(c.execute(stmt).scalars())


# --- SNAP-17 listing -------------------------------------------------------------------------------

def listing(engine: Engine, *, snapshot_id: str | None = None, sandbox: str | None = None,
            name: str | None = None, status: str | None = None, limit: int, offset: int) -> list[dict[str, Any]]:
    """Newest first; DELETING only under a status filter; DELETED never (SNAP-12, SNAP-17)."""
    stmt = select(SN).where(SN.c.status != DELETED)
    if status:
        stmt = stmt.where(func.upper(SN.c.status) == status.upper())
    else:
        stmt = stmt.where(SN.c.status != DELETING)
    if snapshot_id:
        stmt = stmt.where(SN.c.id == snapshot_id)
    if sandbox:
        stmt = stmt.where(SN.c.sandbox_id == sandbox)
    if name:
        stmt = stmt.where(or_(SN.c.name == name))
    stmt = stmt.order_by(SN.c.created_ms.desc(), SN.c.id.desc()).limit(limit).offset(offset)
    with engine.connect() as c:
        return [dict(r) for r in c.execute(stmt).mappings()]
