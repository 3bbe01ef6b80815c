"""Job and template rows: submission with idempotency, reads, cancel, throttled progress (TPL-4..TPL-7,
TPL-32, TPL-33), and the few statements the runner needs to claim, resume and finish jobs.

Every method is one short, synchronous transaction, in the style of ``coordinator.db.node_store``:
async callers run them through ``asyncio.to_thread`` so the event loop never waits on the
database. Races are settled by the schema, not by a process-wide lock (HA-6): (request id,
operation) and (resource, attempt_no) are unique, and a partial unique index allows one active
CREATE/REDO/COMMIT/DELETE job per template; a losing insert re-reads and answers as TPL-5/TPL-7 say.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from coordinator.db.models import Job, Template
from protocol import ids
from protocol.errors import (
    InvalidRequest,
    JobNotFound,
    TCError,
    TemplateAttemptInProgress,
    TemplateNotFound,
)

from . import transitions as tr
from .requests import sanitize_and_digest

log = logging.getLogger(__name__)

JOB_OPERATIONS = ("CREATE", "REDO", "COMMIT", "DELETE", "SNAPSHOT_CREATE", "SNAPSHOT_ROLLBACK",
                  "SNAPSHOT_DELETE")
# TPL-7: at most one of these active per template (also a partial unique index on jobs).
TEMPLATE_EXCLUSIVE_OPS = frozenset({"CREATE", "REDO", "COMMIT", "DELETE"})
CANCELLABLE_OPS = TEMPLATE_EXCLUSIVE_OPS  # TPL-32: snapshot jobs cannot be cancelled
RESOURCE_TYPES = ("template", "snapshot")
PROGRESS_FLUSH_S = 1.0  # job.progress_flush
_RACE_RETRIES = 3

J = Job.__table__
T = Template.__table__


@dataclass(frozen=True)
class Submitted:
    """A submission's answer: the job row (new or the existing one, TPL-5) and whether it is new."""
    job: dict[str, Any]
    created: bool

    @property
    def job_id(self) -> str:
        return self.job["id"]


@dataclass
class _Buffered:
    last_flush: float = float("-inf")
    phase: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


def job_info(job: Mapping[str, Any]) -> dict[str, Any]:
    """The job view of TPL-33 for the CLI and the wire, derived from the row (STYLE 7)."""
    return {
        "job_id": job["id"], "operation": job["operation"],
        "resource_type": job["resource_type"], "resource_id": job["resource_id"],
        "request_id": job["request_id"], "attempt_no": job["attempt_no"],
        "retry_of_job_id": job["retry_of_job_id"], "redo_mode": job["redo_mode"],
        "scope": list(job["scope"] or []), "resume_phase": job["resume_phase"],
        "status": job["status"], "phase": job["phase"], "progress": job["progress"],
        "step": job["step"], "error": job["error"], "builder_node_id": job["builder_node_id"],
        "artifact_id": job["artifact_id"], "fingerprint": job["fingerprint"],
        "pull_progress": dict(job["pull_progress"] or {}),
        "nodes": {"expected": job["nodes_expected"], "ready": job["nodes_ready"],
                  "failed": job["nodes_failed"], "pending": job["nodes_pending"]},
        "cancel_requested": bool(job["cancel_requested"]),
        # What a snapshot job answered its caller (SNAP-5, SNAP-12: {tombstoned, refs}); None for others.
        "result": (job["step_state"] or {}).get("result"),
        "created_ms": job["created_ms"], "started_ms": job["started_ms"],
        "last_progress_ms": job["last_progress_ms"], "finished_ms": job["finished_ms"],
    }


def _check_request_id(request_id: str) -> None:
    if not request_id:
        raise InvalidRequest("requestID is required", {"field": "request_id", "reason": "required"})
    if not ids.valid("request", request_id):
        raise InvalidRequest(f"invalid request id {request_id!r}", {"field": "request_id", "reason": "format"})


class JobStore:
    """Jobs and the template rows they are created with. Thread-safe; one per coordinator."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time,
                 progress_flush: float = PROGRESS_FLUSH_S) -> None:
        self.engine = engine
        self.sessions: sessionmaker[Session] = sessionmaker(engine, expire_on_commit=False)
        self.clock = clock
        self.progress_flush = progress_flush
        self._buffer: dict[str, _Buffered] = {}
        self._buffer_lock = threading.Lock()  # guards the in-memory throttle only, never the DB

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # ---- submission ----------------------------------------------------------------------

    def create_template(self, *, request_id: str, request: Mapping[str, Any], source_kind: str = "image",
                        image_ref: str = "", spec: Mapping[str, Any] | None = None,
                        requested_alias: str | None = None, runtime_config: Mapping[str, Any] | None = None,
                        operation: str = "CREATE", phase: str = "PULLING") -> Submitted:
        """Insert a PENDING template and its first job (attempt 1) in one transaction (TPL-4, TPL-23).

        ``request`` is the caller's validated request; it is sanitised and digested here
        (TPL-5) and, unless ``spec`` is given, also stored as the template's spec. An equal
        resubmit returns the existing job whatever its status, without a new template."""
        _check_request_id(request_id)
        clean, dig = sanitize_and_digest(request)
        for _ in range(_RACE_RETRIES):
            existing = self._idempotent(request_id, operation, dig)
            if existing is not None:
                return Submitted(existing, False)
            now = self.now_ms()
            tpl_id, job_id = ids.new_id("tpl"), ids.new_id("job")
            job = self._job_row(job_id=job_id, operation=operation, resource_type="template",
                                resource_id=tpl_id, request_id=request_id, attempt_no=1, retry_of=None,
                                request=clean, digest=dig, phase=phase, now=now)
            try:
                with self.sessions.begin() as s:
                    s.execute(insert(T).values(
                        id=tpl_id, alias=None, requested_alias=requested_alias, status=tr.PENDING,
                        source_kind=source_kind, image_ref=image_ref, manifest_digest="",
                        spec=dict(spec) if spec is not None else clean,
                        runtime_config=dict(runtime_config or {}), artifact_id=None,
                        memstate_artifact_id=None, last_error="", created_ms=now, updated_ms=now))
                    s.execute(insert(J).values(**job))
                return Submitted(job, True)
            except IntegrityError:
                log.info("request %s/%s raced another submit; re-reading", request_id, operation)
        raise self._race_lost(request_id, operation)

    def submit_job(self, *, request_id: str, operation: str, resource_type: str, resource_id: str,
                   request: Mapping[str, Any], phase: str, progress: int = 0, redo_mode: str | None = None,
                   scope: Iterable[str] = (), resume_phase: str | None = None,
                   prepare: Callable[[Session], None] | None = None,
                   on_active: Callable[[Mapping[str, Any]], TCError] | None = None,
                   overrides: Mapping[str, Any] | None = None) -> Submitted:
        """Add a job on an existing resource (REDO, DELETE, snapshot operations).

        Idempotent per TPL-5. For a template, the row is locked (``FOR UPDATE`` on PostgreSQL)
        and must exist (TemplateNotFound); ``prepare(session)`` then runs in the same
        transaction for the operation's own checks and writes; an active CREATE/REDO/COMMIT/DELETE
        job refuses with ``on_active(job)`` or TPL-7's TemplateAttemptInProgress. ``attempt_no``
        and ``retry_of_job_id`` follow TPL-6. ``overrides`` replace columns of the new row (a
        tombstoning snapshot delete is recorded READY from the start, SNAP-12)."""
        _check_request_id(request_id)
        if operation not in JOB_OPERATIONS or resource_type not in RESOURCE_TYPES:
            raise ValueError(f"unknown operation/resource {operation}/{resource_type}")
        clean, dig = sanitize_and_digest(request)
        for _ in range(_RACE_RETRIES):
            existing = self._idempotent(request_id, operation, dig)
            if existing is not None:
                return Submitted(existing, False)
            try:
                with self.sessions.begin() as s:
                    if resource_type == "template":
                        found = s.execute(select(T.c.id).where(T.c.id == resource_id).with_for_update()).first()
                        if found is None:
                            raise TemplateNotFound(f"template {resource_id} not found", {"template_id": resource_id})
                    if prepare is not None:
                        prepare(s)
                    if resource_type == "template" and operation in TEMPLATE_EXCLUSIVE_OPS:
                        active = self._active(s, resource_id)
                        if active is not None:
                            raise (on_active(active) if on_active else self._busy(resource_id, active))
                    attempt_no, retry_of = self._next_attempt(s, resource_id)
                    now = self.now_ms()
                    job = self._job_row(job_id=ids.new_id("job"), operation=operation,
                                        resource_type=resource_type, resource_id=resource_id,
                                        request_id=request_id, attempt_no=attempt_no, retry_of=retry_of,
                                        request=clean, digest=dig, phase=phase, now=now, progress=progress,
                                        redo_mode=redo_mode, scope=list(scope), resume_phase=resume_phase)
                    job.update(overrides or {})
                    s.execute(insert(J).values(**job))
                return Submitted(job, True)
            except IntegrityError:
                log.info("request %s/%s on %s raced another submit; re-reading", request_id, operation, resource_id)
        raise self._race_lost(request_id, operation, resource_id)

    def _job_row(self, *, job_id: str, operation: str, resource_type: str, resource_id: str, request_id: str,
                 attempt_no: int, retry_of: str | None, request: dict[str, Any], digest: str, phase: str,
                 now: int, progress: int = 0, redo_mode: str | None = None, scope: list[str] | None = None,
                 resume_phase: str | None = None) -> dict[str, Any]:
        return dict(
            id=job_id, operation=operation, resource_type=resource_type, resource_id=resource_id,
            request_id=request_id, attempt_no=attempt_no, retry_of_job_id=retry_of, redo_mode=redo_mode,
            scope=scope or [], resume_phase=resume_phase, status=tr.PENDING, phase=phase,
            progress=max(0, min(100, progress)), step="", step_state={}, error=None, builder_node_id=None,
            artifact_id=None, fingerprint=None, pull_progress={}, nodes_expected=0, nodes_ready=0,
            nodes_failed=0, nodes_pending=0, request=request, request_digest=digest, cancel_requested=False,
            owner=None, lease_expires_ms=None, created_ms=now, started_ms=None, last_progress_ms=now,
            finished_ms=None)

    def existing(self, request_id: str, operation: str, dig: str) -> dict[str, Any] | None:
        """TPL-5 before any other check: the job an equal request made, or the refusal."""
        _check_request_id(request_id)
        return self._idempotent(request_id, operation, dig)

    def _idempotent(self, request_id: str, operation: str, dig: str) -> dict[str, Any] | None:
        """TPL-5: the existing job for an equal request, an error for a different one, else None."""
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(select(J).where(J.c.request_id == request_id))]
        for row in rows:
            if row["operation"] == operation:
                if row["request_digest"] == dig:
                    return row
                raise TemplateAttemptInProgress(f"request_id {request_id} already used with a different payload",
                                                {"request_id": request_id, "job_id": row["id"]})
        if rows:
            other = min(rows, key=lambda r: r["created_ms"])
            raise TemplateAttemptInProgress(f"request_id {request_id} already bound to {other['operation']}",
                                            {"request_id": request_id, "job_id": other["id"],
                                             "operation": other["operation"]})
        return None

    def _race_lost(self, request_id: str, operation: str, resource_id: str | None = None) -> TCError:
        # Three lost inserts in a row: the resource is busy with jobs appearing as fast as we read.
        if resource_id is not None:
            with self.sessions.begin() as s:
                active = self._active(s, resource_id)
            if active is not None:
                return self._busy(resource_id, active)
        return TemplateAttemptInProgress(f"request_id {request_id} is being submitted concurrently",
                                         {"request_id": request_id, "operation": operation})

    @staticmethod
    def _busy(template_id: str, job: Mapping[str, Any]) -> TCError:
        return TemplateAttemptInProgress(f"template {template_id} is currently {job['status']} (job_id={job['id']})",
                                         {"template_id": template_id, "job_id": job["id"], "status": job["status"]})

    @staticmethod
    def _active(s: Session, resource_id: str) -> dict[str, Any] | None:
        row = s.execute(select(J).where(J.c.resource_id == resource_id, J.c.status.in_(tr.JOB_ACTIVE),
                                        J.c.operation.in_(TEMPLATE_EXCLUSIVE_OPS))).first()
        return dict(row._mapping) if row else None

    @staticmethod
    def _next_attempt(s: Session, resource_id: str) -> tuple[int, str | None]:
        latest = s.execute(select(J.c.id, J.c.attempt_no).where(J.c.resource_id == resource_id)
                           .order_by(J.c.attempt_no.desc()).limit(1)).first()
        return (1, None) if latest is None else (latest.attempt_no + 1, latest.id)

    # ---- reads -----------------------------------------------------------------------------

    def get_job(self, job_id: str) -> dict[str, Any]:
        """The job row; InvalidRequest if the id is malformed, JobNotFound if unknown (CONV-2)."""
        if not ids.valid("job", job_id):
            raise InvalidRequest(f"invalid job id {job_id!r}", {"field": "job_id", "reason": "format"})
        with self.engine.connect() as conn:
            row = conn.execute(select(J).where(J.c.id == job_id)).first()
        if row is None:
            raise JobNotFound(f"job {job_id} not found", {"job_id": job_id})
        return dict(row._mapping)

    def list_jobs(self, *, status: str | Iterable[str] | None = None, resource_id: str | None = None,
                  operation: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Jobs newest first, optionally filtered by status (one or several), resource, operation."""
        stmt = select(J)
        if status is not None:
            stmt = stmt.where(J.c.status == status if isinstance(status, str) else J.c.status.in_(list(status)))
        if resource_id is not None:
            stmt = stmt.where(J.c.resource_id == resource_id)
        if operation is not None:
            stmt = stmt.where(J.c.operation == operation)
        stmt = stmt.order_by(J.c.created_ms.desc(), J.c.attempt_no.desc(), J.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def latest_job(self, resource_id: str) -> dict[str, Any] | None:
        """The resource's latest job (highest attempt), the one TPL-29 shows and TPL-33 keeps."""
        with self.engine.connect() as conn:
            row = conn.execute(select(J).where(J.c.resource_id == resource_id)
                               .order_by(J.c.attempt_no.desc()).limit(1)).first()
        return dict(row._mapping) if row else None

    def active_job(self, resource_id: str) -> dict[str, Any] | None:
        """The template's active CREATE/REDO/COMMIT/DELETE job, if any (TPL-7)."""
        with self.sessions.begin() as s:
            return self._active(s, resource_id)

    def get_template(self, template_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(T).where(T.c.id == template_id)).first()
        return dict(row._mapping) if row else None

    # ---- cancel ------------------------------------------------------------------------------

    def request_cancel(self, job_id: str) -> dict[str, Any]:
        """TPL-32: mark an active job for cancellation; the runner stops at the next step
        boundary. Terminal jobs come back unchanged; snapshot jobs are refused."""
        job = self.get_job(job_id)
        if job["operation"] not in CANCELLABLE_OPS:
            raise InvalidRequest("snapshot operations cannot be cancelled",
                                 {"field": "job_id", "reason": "not cancellable"})
        if job["status"] in tr.JOB_TERMINAL:
            return job
        with self.sessions.begin() as s:
            tr.update_active_job(s, job_id, cancel_requested=True, touch=False)
        return self.get_job(job_id)

    # ---- progress (throttled) -------------------------------------------------------------------

    def report_progress(self, job_id: str, *, phase: str | None = None, progress: int | None = None,
                        owner: str | None = None, force: bool = False, **fields: Any) -> bool:
        """Record progress, writing at most once per ``progress_flush`` seconds per job.

        A phase change (or ``force``) is written at once. Values are merged while buffered
        (progress keeps its maximum); the runner writes what is left at each step boundary
        through ``take_buffered``. Returns True if the row was written now."""
        with self._buffer_lock:
            b = self._buffer.setdefault(job_id, _Buffered())
            if progress is not None:
                b.fields["progress"] = max(int(progress), b.fields.get("progress", 0))
            b.fields.update(fields)
            phase_change = phase is not None and phase != b.phase
            if phase is not None:
                b.fields["phase"] = phase
                b.phase = phase
            now = self.clock()
            if not (force or phase_change or now - b.last_flush >= self.progress_flush):
                return False
            values, b.fields, b.last_flush = b.fields, {}, now
        if not values:
            return False
        with self.sessions.begin() as s:
            return tr.update_active_job(s, job_id, expect_owner=owner, **values)

    def take_buffered(self, job_id: str) -> dict[str, Any]:
        """Buffered progress fields not yet written (the caller writes them with its own update)."""
        with self._buffer_lock:
            b = self._buffer.get(job_id)
            if b is None:
                return {}
            values, b.fields = b.fields, {}
            return values

    def forget(self, job_id: str) -> None:
        with self._buffer_lock:
            self._buffer.pop(job_id, None)

    # ---- runner statements ------------------------------------------------------------------

    def runnable_pending(self, operations: Iterable[str], limit: int = 50) -> list[str]:
        """PENDING jobs of the given operations, oldest first."""
        with self.engine.connect() as conn:
            return list(conn.execute(select(J.c.id).where(J.c.status == tr.PENDING,
                                                          J.c.operation.in_(list(operations)))
                                     .order_by(J.c.created_ms, J.c.id).limit(limit)).scalars())

    def adoptable_running(self, owner: str, operations: Iterable[str], limit: int = 50) -> list[str]:
        """RUNNING jobs this owner held, or whose owner's lease lapsed (TPL-31)."""
        now = self.now_ms()
        with self.engine.connect() as conn:
            return list(conn.execute(select(J.c.id).where(
                J.c.status == tr.RUNNING, J.c.operation.in_(list(operations)), self._adoptable(owner, now))
                .order_by(J.c.created_ms, J.c.id).limit(limit)).scalars())

    @staticmethod
    def _adoptable(owner: str, now: int) -> Any:
        return or_(J.c.owner == owner, J.c.owner.is_(None), J.c.lease_expires_ms.is_(None),
                   J.c.lease_expires_ms < now)

    def claim(self, job_id: str, owner: str, lease_ms: int) -> bool:
        """PENDING→RUNNING by compare-and-set, recording the owner (CONV-4)."""
        now = self.now_ms()
        with self.sessions.begin() as s:
            return tr.transition_job(s, job_id, tr.PENDING, tr.RUNNING, now=now, owner=owner,
                                     lease_expires_ms=now + lease_ms)

    def adopt(self, job_id: str, owner: str, lease_ms: int) -> bool:
        """Take over a RUNNING job from a lapsed owner (or re-take one's own) by compare-and-set."""
        now = self.now_ms()
        with self.sessions.begin() as s:
            res = s.execute(update(J).where(J.c.id == job_id, J.c.status == tr.RUNNING, self._adoptable(owner, now))
                            .values(owner=owner, lease_expires_ms=now + lease_ms))
            return res.rowcount == 1

    def renew(self, owner: str, job_ids: Iterable[str], lease_ms: int) -> set[str]:
        """Extend this owner's leases; returns the jobs it still holds."""
        job_ids = list(job_ids)
        if not job_ids:
            return set()
        with self.sessions.begin() as s:
            s.execute(update(J).where(J.c.id.in_(job_ids), J.c.owner == owner, J.c.status == tr.RUNNING)
                      .values(lease_expires_ms=self.now_ms() + lease_ms))
            return set(s.execute(select(J.c.id).where(J.c.id.in_(job_ids), J.c.owner == owner,
                                                      J.c.status == tr.RUNNING)).scalars())

    def release(self, owner: str, job_ids: Iterable[str]) -> None:
        """On an orderly stop: let the next runner adopt these jobs at once."""
        job_ids = list(job_ids)
        if job_ids:
            with self.sessions.begin() as s:
                s.execute(update(J).where(J.c.id.in_(job_ids), J.c.owner == owner, J.c.status == tr.RUNNING)
                          .values(lease_expires_ms=0))

    def save_step(self, job_id: str, owner: str, *, step: str | None = None,
                  step_state: Mapping[str, Any] | None = None, **fields: Any) -> bool:
        """Persist the step pointer, step state and step results of a RUNNING job together,
        fenced on the owner. Buffered progress rides along. False if the job was lost."""
        values = {**self.take_buffered(job_id), **fields}
        if step is not None:
            values["step"] = step
        if step_state is not None:
            values["step_state"] = dict(step_state)
        with self.sessions.begin() as s:
            return tr.update_active_job(s, job_id, expect_owner=owner, expect_status=tr.RUNNING, **values)

    def finish(self, job_id: str, owner: str, to_status: str, **fields: Any) -> bool:
        """End a RUNNING job (READY or FAILED) by compare-and-set on status and owner."""
        values = {**self.take_buffered(job_id), **fields}
        with self.sessions.begin() as s:
            ok = tr.transition_job(s, job_id, tr.RUNNING, to_status, expect_owner=owner, **values)
        self.forget(job_id)
        return ok

    def is_cancel_requested(self, job_id: str) -> bool:
        with self.engine.connect() as conn:
            return bool(conn.execute(select(J.c.cancel_requested).where(J.c.id == job_id)).scalar())

