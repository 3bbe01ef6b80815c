"""Job types: one small class per operation listing its ordered, idempotent steps (STYLE 6).

A job type declares ``operation`` and ``steps``; step ``NAME`` is the coroutine method
``step_<name>`` (lower-cased), taking a :class:`JobContext`. The runner persists the name of the
next step after each one completes, in the same short transaction as the step's results (its
``ctx.state`` and staged columns), so after a crash the job resumes at the first unfinished step
(TPL-31). A step may therefore run again after a crash and must be idempotent: re-running it
gives the same end effects. Agent tasks get deterministic ids (CONV-1), so a re-sent task
returns the agent's recorded outcome instead of running twice.

Example::

    @register
    class DeleteJob(JobType):
        operation = "DELETE"
        steps = ("MARK_DELETING", "REMOVE_REPLICAS", "DROP_ROWS")

        async def step_mark_deleting(self, ctx): ...
        async def step_remove_replicas(self, ctx): ...
        async def step_drop_rows(self, ctx): ...
        async def cleanup(self, ctx, error): ...   # on failure or cancel, before the job ends FAILED
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Protocol,
    runtime_checkable,
)

from protocol import ids
from protocol.errors import TCError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from .store import JobStore

log = logging.getLogger(__name__)

# Progress on entering a phase, per operation (SPEC §1 job phase table). REDO-rebuild shares CREATE's
# build phases; SNAPSHOTTING is 80 for CREATE/REDO in memory mode.
PHASE_PROGRESS: dict[str, dict[str, int]] = {
    "PULLING": {"CREATE": 5, "REDO": 5},
    "UNPACKING": {"CREATE": 20, "REDO": 20},
    "BUILDING_EXT4": {"CREATE": 40, "REDO": 40},
    "GENERATING_JSON": {"CREATE": 60, "REDO": 60},
    "DISTRIBUTING": {"CREATE": 70, "REDO": 60, "COMMIT": 75},
    "SNAPSHOTTING": {"CREATE": 80, "REDO": 80, "COMMIT": 10, "SNAPSHOT_CREATE": 10},
    "REGISTERING": {"COMMIT": 70, "SNAPSHOT_CREATE": 70},
    "CREATING_TEMPLATE": {"CREATE": 85, "REDO": 85, "COMMIT": 85},
    "ROLLBACK_PREPARING": {"SNAPSHOT_ROLLBACK": 0},
    "ROLLBACK_DRIVING": {"SNAPSHOT_ROLLBACK": 25},
    "DELETING": {"DELETE": 20, "SNAPSHOT_DELETE": 20},
    "READY": {},  # 100 for all, set by the READY transition
}


def phase_progress(operation: str, phase: str) -> int | None:
    """The progress a job of ``operation`` has on entering ``phase``, or None if the table has none."""
    if phase == "READY":
        return 100
    return PHASE_PROGRESS.get(phase, {}).get(operation)


def job_error(exc: BaseException, *, job_id: str = "", step: str = "") -> dict[str, str]:
    """The one mapping from an exception to a job's ``{name, message}`` error (CONV-5).

    A TCError keeps its name and message. Anything else is Internal with a log reference: the
    traceback goes to the log under that reference, never into the row or onto the wire."""
    if isinstance(exc, TCError):
        return {"name": exc.name, "message": exc.message or exc.name}
    ref = secrets.token_hex(6)
    log.error("job %s step %s failed unexpectedly (log ref %s)", job_id, step, ref, exc_info=exc)
    return {"name": "Internal", "message": f"internal error (log ref {ref})"}


class JobLost(Exception):
    """The job's row no longer belongs to this runner (another owner took it, or it ended)."""


@runtime_checkable
class TaskPort(Protocol):
    """How a job sends one task to an agent and waits for its result (provided elsewhere).

    ``task_id`` is deterministic per (job, step, node, try): re-sending it after a crash returns
    the agent's recorded outcome. ``on_progress`` receives the task's progress reports. A failed
    task raises its TCError. An implementation may also offer ``async cancel_task(node_id,
    task_id)`` (TASK_CANCEL, TPL-32); the runner calls it when a cancel is requested mid-step."""

    async def run_task(self, node_id: str, op: str, args: dict[str, Any], task_id: str,
                       on_progress: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]: ...


class JobContext:
    """What a step sees: the job row, the database, progress, its persisted state, agent tasks.

    ``state`` is the job's ``step_state`` dict (task ids, chosen builder, counts…); changes made
    during a step are persisted with the step's completion, or earlier with :meth:`save` — save
    before a slow side effect whose choice must survive a crash. ``stage(**columns)`` queues job
    columns (``builder_node_id``, ``artifact_id``, ``fingerprint``, node counts…) the same way.
    """

    def __init__(self, job: Mapping[str, Any], *, store: JobStore, owner: str, tasks: TaskPort | None) -> None:
        self.store = store
        self.owner = owner
        self.tasks = tasks
        self.job_id: str = job["id"]
        self.operation: str = job["operation"]
        self.step: str = job["step"]
        self.state: dict[str, Any] = dict(job["step_state"] or {})
        self._job: dict[str, Any] = dict(job)
        self._staged: dict[str, Any] = {}
        self._inflight: dict[str, str] = {}  # task id -> node id, for TASK_CANCEL

    # ---- the row ----

    @property
    def job(self) -> Mapping[str, Any]:
        """A read-only view of the job row as of the start of this step (plus this step's writes)."""
        return MappingProxyType(self._job)

    @property
    def sessions(self) -> sessionmaker[Session]:
        """Session factory: ``with ctx.sessions.begin() as s:`` — keep transactions short, and never
        await an agent task inside one (STYLE 8)."""
        return self.store.sessions

    async def db(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run a short synchronous database function off the event loop."""
        return await asyncio.to_thread(fn, *args, **kw)

    async def refresh(self) -> Mapping[str, Any]:
        self._job = await asyncio.to_thread(self.store.get_job, self.job_id)
        return self.job

    # ---- progress ----

    async def set_phase(self, phase: str, progress: int | None = None) -> None:
        """Enter ``phase``; written at once. ``progress`` defaults to the phase table's value."""
        if progress is None:
            progress = phase_progress(self.operation, phase)
        await self.progress(progress, phase=phase)

    async def progress(self, progress: int | None = None, *, phase: str | None = None, **fields: Any) -> None:
        """Report progress (and e.g. ``pull_progress``, node counts); throttled to one write per
        ``job.progress_flush`` per job, phase changes written at once (TPL-33). Never decreases."""
        if phase is not None:
            self._job["phase"] = phase
        if progress is not None:
            self._job["progress"] = max(self._job.get("progress") or 0, int(progress))
        self._job.update(fields)
        await asyncio.to_thread(self.store.report_progress, self.job_id, phase=phase, progress=progress,
                                owner=self.owner, **fields)

    # ---- persisted state ----

    def stage(self, **columns: Any) -> None:
        """Queue job columns to write with this step's completion (or the next :meth:`save`)."""
        self._staged.update(columns)
        self._job.update(columns)

    def take_staged(self) -> dict[str, Any]:
        staged, self._staged = self._staged, {}
        return staged

    async def save(self) -> None:
        """Persist ``state`` and staged columns now, keeping the current step; JobLost if the
        job is no longer ours."""
        ok = await asyncio.to_thread(self.store.save_step, self.job_id, self.owner,
                                     step_state=self.state, **self.take_staged())
        if not ok:
            raise JobLost(self.job_id)

    # ---- agent tasks ----

    def task_id(self, node_id: str, try_no: int = 0, step: str | None = None) -> str:
        """The deterministic task id of (job, step, node, try) (CONV-1)."""
        return ids.task_id(self.job_id, step or self.step, node_id, try_no)

    async def run_task(self, node_id: str, op: str, args: dict[str, Any], *, try_no: int = 0,
                       step: str | None = None,
                       on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Send one task through the TaskPort with its deterministic id and wait for the result."""
        if self.tasks is None:
            raise RuntimeError("this runner has no TaskPort")
        tid = self.task_id(node_id, try_no, step)
        self._inflight[tid] = node_id
        try:
            return await self.tasks.run_task(node_id, op, args, tid, on_progress)
        finally:
            self._inflight.pop(tid, None)

    async def cancel_inflight(self) -> None:
        """Send TASK_CANCEL for this job's running tasks, if the TaskPort can (TPL-32)."""
        cancel = getattr(self.tasks, "cancel_task", None)
        if cancel is None:
            return
        for tid, node in list(self._inflight.items()):
            try:
                await cancel(node, tid)
            except Exception:
                log.warning("job %s: TASK_CANCEL %s on %s failed", self.job_id, tid, node, exc_info=True)


_REGISTRY: dict[str, type[JobType]] = {}


class JobType:
    """One operation's ordered, idempotent steps. Subclasses set ``operation`` and ``steps`` and
    implement ``step_<name>`` for each; ``cleanup`` and ``result`` are optional hooks."""

    operation: ClassVar[str] = ""
    steps: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if not cls.steps:
            return
        if len(set(cls.steps)) != len(cls.steps):
            raise TypeError(f"{cls.__name__}: duplicate step names")
        missing = [s for s in cls.steps if not callable(getattr(cls, cls.method_name(s), None))]
        if missing:
            raise TypeError(f"{cls.__name__}: no method for step(s) {', '.join(missing)} "
                            f"(expected {', '.join(cls.method_name(s) for s in missing)})")

    @staticmethod
    def method_name(step: str) -> str:
        return f"step_{step.lower()}"

    async def run_step(self, step: str, ctx: JobContext) -> None:
        out = getattr(self, self.method_name(step))(ctx)
        if inspect.isawaitable(out):
            await out

    async def cleanup(self, ctx: JobContext, error: Mapping[str, str]) -> None:
        """Undo or release what a failed or cancelled job leaves behind; runs before the job
        ends FAILED and again after a crash during it, so it must be idempotent too."""

    async def result(self, ctx: JobContext) -> dict[str, Any]:
        """Job columns to write with the READY transition (e.g. ``artifact_id``)."""
        return {}


def register(cls: type[JobType]) -> type[JobType]:
    """Class decorator: make a job type the default handler of its operation."""
    if not cls.operation or not cls.steps:
        raise TypeError(f"{cls.__name__} needs an operation and steps")
    _REGISTRY[cls.operation] = cls
    return cls


def registered() -> dict[str, type[JobType]]:
    return dict(_REGISTRY)
