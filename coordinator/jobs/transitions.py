"""The one place where job, template and artifact statuses change (CONV-4, CONV-5, CONV-6, CONV-8).

Each status has an allowed-transitions table and one function that checks it and then writes
with a compare-and-set ``UPDATE … WHERE id = ? AND status = ?``: the return value says whether
this caller won. A pair outside the table is a bug in the caller: it is logged as Internal and
refused, never applied (CONV-4).

The functions take anything with ``execute`` (a ``Session`` or a ``Connection``) and run in the
caller's transaction, so a status change and the rows it implies commit together. They use Core
statements on the tables, so no ORM identity-map bookkeeping runs on these hot updates.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

from sqlalchemy import case, update

from coordinator.db.models import Artifact, Job, Template

log = logging.getLogger(__name__)

# ---- names (CONV-3) ----------------------------------------------------------------------------

PENDING, RUNNING, READY, FAILED = "PENDING", "RUNNING", "READY", "FAILED"
JOB_STATUSES = (PENDING, RUNNING, READY, FAILED)
JOB_ACTIVE = frozenset({PENDING, RUNNING})
JOB_TERMINAL = frozenset({READY, FAILED})

PARTIALLY_READY, DELETING = "PARTIALLY_READY", "DELETING"
TEMPLATE_STATUSES = (PENDING, READY, PARTIALLY_READY, FAILED, DELETING)

BUILDING, CLEANUP_PENDING, ORPHANED = "BUILDING", "CLEANUP_PENDING", "ORPHANED"
ARTIFACT_STATUSES = (PENDING, BUILDING, READY, FAILED, CLEANUP_PENDING, ORPHANED)
ARTIFACT_INITIAL = frozenset({BUILDING, PENDING})  # a new row: build claim or COMMIT export

PHASE_READY = "READY"

# ---- tables ------------------------------------------------------------------------------------

JOB_TRANSITIONS: frozenset[tuple[str, str]] = frozenset({
    (PENDING, RUNNING),  # claimed by compare-and-set
    (PENDING, FAILED),   # cancelled or interrupted before it ran
    (RUNNING, READY),
    (RUNNING, FAILED),
})

_AGGREGATES = (READY, PARTIALLY_READY, FAILED)
TEMPLATE_TRANSITIONS: frozenset[tuple[str, str]] = frozenset(
    # PUBLISH (TPL-14) from PENDING; REDO recomputes the aggregate from any of its results.
    {(s, t) for s in (PENDING, *_AGGREGATES) for t in _AGGREGATES}
    # Any non-DELETING status may start a delete (TPL-27). DELETING ends by deleting the row,
    # or stays DELETING after a partial failure: neither is a status write.
    | {(s, DELETING) for s in (PENDING, *_AGGREGATES)}
)

ARTIFACT_TRANSITIONS: frozenset[tuple[str, str]] = frozenset({
    (BUILDING, READY), (PENDING, READY),  # fenced on (status, owner, generation): TPL-12
    (BUILDING, FAILED), (PENDING, FAILED),
    (BUILDING, ORPHANED), (PENDING, ORPHANED),  # owning job ended first (GC-7, GC-8)
    (READY, CLEANUP_PENDING),  # GC-3 found no reference
    (CLEANUP_PENDING, READY),  # referenced again: renewed (GC-2)
    (READY, FAILED),  # no copy survives (GC-12)
    # A new claim (generation + 1, new owner). READY→BUILDING is TPL-9's "even a READY row with
    # no surviving copy".
    (FAILED, BUILDING), (ORPHANED, BUILDING), (CLEANUP_PENDING, BUILDING), (READY, BUILDING),
})
# Leaving these statuses for READY needs the fence of TPL-12: the claimer's owner and generation.
_FENCED = frozenset({(BUILDING, READY), (PENDING, READY)})

_JOB_COLUMNS = frozenset(c.name for c in Job.__table__.columns) - {"id", "status"}
_TEMPLATE_COLUMNS = frozenset(c.name for c in Template.__table__.columns) - {"id", "status"}
_ARTIFACT_COLUMNS = frozenset(c.name for c in Artifact.__table__.columns) - {"id", "status", "generation"}


class Executor(Protocol):
    def execute(self, statement: Any, *args: Any, **kw: Any) -> Any: ...


def now_ms() -> int:
    return int(time.time() * 1000)


def _refuse(kind: str, obj_id: str, from_status: str, to_status: str, why: str) -> bool:
    # CONV-4: refused and logged as Internal, never applied.
    log.error("Internal: refused %s transition %s -> %s for %s (%s)", kind, from_status, to_status, obj_id, why)
    return False


def _check_fields(kind: str, fields: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(f"unknown {kind} column(s): {', '.join(unknown)}")


def monotonic_progress(new: int) -> Any:
    """``progress = max(progress, new)`` in SQL both dialects understand (CONV-5)."""
    new = max(0, min(100, int(new)))
    col = Job.__table__.c.progress
    return case((col < new, new), else_=col)


def normalize_error(error: Any) -> dict[str, str]:
    """A job error as CONV-5 wants it: ``{name, message}``, both non-empty."""
    name = message = ""
    if isinstance(error, Mapping):
        name, message = str(error.get("name") or ""), str(error.get("message") or "")
    elif error is not None:
        name, message = getattr(error, "name", "") or "Internal", str(error)
    return {"name": name or "Internal", "message": message or "job failed"}


# ---- jobs ----------------------------------------------------------------------------------------

def job_transition_allowed(from_status: str, to_status: str) -> bool:
    return (from_status, to_status) in JOB_TRANSITIONS


def job_values(from_status: str, to_status: str, fields: Mapping[str, Any], now: int) -> dict[str, Any]:
    """The column values a transition writes, with CONV-5 applied (pure; tested on its own)."""
    values = dict(fields)
    progress = values.pop("progress", None)
    values["last_progress_ms"] = now
    if to_status == RUNNING:
        values.setdefault("started_ms", now)
        if progress is not None:
            values["progress"] = monotonic_progress(progress)
    elif to_status == READY:
        values.update(phase=PHASE_READY, progress=100, error=None, finished_ms=now)
    elif to_status == FAILED:
        if not fields.get("error"):
            log.warning("job ends FAILED without an error; recording a generic one")
        values["error"] = normalize_error(fields.get("error"))
        values.update(progress=100, finished_ms=now)
    if to_status in JOB_TERMINAL:
        values["lease_expires_ms"] = None
    return values


def transition_job(session: Executor, job_id: str, from_status: str, to_status: str, *,
                   expect_owner: str | None = None, now: int | None = None, **fields: Any) -> bool:
    """Move job ``job_id`` from ``from_status`` to ``to_status`` by compare-and-set (CONV-4).

    ``fields`` are other job columns written in the same statement. CONV-5 is enforced here:
    progress never decreases; READY forces phase READY and progress 100; FAILED forces progress
    100 and a non-empty ``{name, message}`` error. ``expect_owner`` additionally fences on the
    job's owner, so a runner that lost the job (HA takeover) cannot end it. Returns False when
    another writer got there first, or when the pair is not in the table (logged as Internal).
    """
    if not job_transition_allowed(from_status, to_status):
        return _refuse("job", job_id, from_status, to_status, "not in the CONV-4 table")
    _check_fields("job", fields, _JOB_COLUMNS)
    values = job_values(from_status, to_status, fields, now_ms() if now is None else now)
    t = Job.__table__
    stmt = update(t).where(t.c.id == job_id, t.c.status == from_status)
    if expect_owner is not None:
        stmt = stmt.where(t.c.owner == expect_owner)
    res = session.execute(stmt.values(status=to_status, **values))
    return res.rowcount == 1


def update_active_job(session: Executor, job_id: str, *, expect_owner: str | None = None,
                      expect_status: str | None = None, touch: bool = True, **fields: Any) -> bool:
    """Write columns of a PENDING/RUNNING job without changing its status.

    Terminal jobs are never touched (their row is final). ``progress`` is applied as
    ``max(progress, new)``; ``touch`` records the write as progress for GC-8. False if the job
    is terminal, gone, or (with ``expect_owner``) held by another runner.
    """
    _check_fields("job", fields, _JOB_COLUMNS)
    if "error" in fields and fields["error"] is not None:
        fields["error"] = normalize_error(fields["error"])
    values = dict(fields)
    if "progress" in values:
        values["progress"] = monotonic_progress(values["progress"])
    if touch:
        values.setdefault("last_progress_ms", now_ms())
    if not values:
        return True
    t = Job.__table__
    stmt = update(t).where(t.c.id == job_id)
    stmt = stmt.where(t.c.status == expect_status) if expect_status else stmt.where(t.c.status.in_(JOB_ACTIVE))
    if expect_owner is not None:
        stmt = stmt.where(t.c.owner == expect_owner)
    return session.execute(stmt.values(**values)).rowcount == 1


# ---- templates -----------------------------------------------------------------------------------

def template_transition_allowed(from_status: str, to_status: str) -> bool:
    return (from_status, to_status) in TEMPLATE_TRANSITIONS


def transition_template(session: Executor, template_id: str, from_status: str, to_status: str, *,
                        now: int | None = None, **fields: Any) -> bool:
    """Move a template's status by compare-and-set (CONV-6). Entering DELETING releases the
    alias in the same statement (TPL-27: hidden from resolve, alias released)."""
    if not template_transition_allowed(from_status, to_status):
        return _refuse("template", template_id, from_status, to_status, "not in the CONV-6 table")
    _check_fields("template", fields, _TEMPLATE_COLUMNS)
    values = dict(fields)
    values.setdefault("updated_ms", now_ms() if now is None else now)
    if to_status == DELETING:
        values["alias"] = None
    t = Template.__table__
    res = session.execute(update(t).where(t.c.id == template_id, t.c.status == from_status)
                          .values(status=to_status, **values))
    return res.rowcount == 1


# ---- artifacts -----------------------------------------------------------------------------------

def artifact_transition_allowed(from_status: str, to_status: str) -> bool:
    return (from_status, to_status) in ARTIFACT_TRANSITIONS


def transition_artifact(session: Executor, artifact_id: str, from_status: str, to_status: str, *,
                        expect_owner: str | None = None, expect_generation: int | None = None,
                        now: int | None = None, **fields: Any) -> bool:
    """Move an artifact's status by compare-and-set (CONV-8).

    BUILDING/PENDING→READY is fenced on (status, owner, generation) (TPL-12): both
    ``expect_owner`` and ``expect_generation`` are required, and a stale claimer loses. A move
    to BUILDING is a new claim: it needs ``owner_job_id`` and bumps ``generation`` by one
    (TPL-9); read the new generation back with the row. Other moves may be fenced the same way.
    """
    if not artifact_transition_allowed(from_status, to_status):
        return _refuse("artifact", artifact_id, from_status, to_status, "not in the CONV-8 table")
    if (from_status, to_status) in _FENCED and (expect_owner is None or expect_generation is None):
        return _refuse("artifact", artifact_id, from_status, to_status, "READY needs the owner/generation fence")
    if to_status == BUILDING and not fields.get("owner_job_id"):
        return _refuse("artifact", artifact_id, from_status, to_status, "a claim needs owner_job_id")
    _check_fields("artifact", fields, _ARTIFACT_COLUMNS)
    t = Artifact.__table__
    values = dict(fields)
    values.setdefault("updated_ms", now_ms() if now is None else now)
    if to_status == BUILDING:
        values["generation"] = t.c.generation + 1
    stmt = update(t).where(t.c.id == artifact_id, t.c.status == from_status)
    if expect_owner is not None:
        stmt = stmt.where(t.c.owner_job_id == expect_owner)
    if expect_generation is not None:
        stmt = stmt.where(t.c.generation == expect_generation)
    return session.execute(stmt.values(status=to_status, **values)).rowcount == 1
