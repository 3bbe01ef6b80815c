"""Tasks on the agent (SPEC WIRE-12 to WIRE-15, CAT-7).

A TASK is recorded in the catalog (kind ``task``) *before* any work starts, so a re-sent id
is answered from the record rather than run twice (WIRE-13):

* same id, same args digest, finished → TASK_ACCEPTED and the recorded TASK_RESULT again;
* same id, same digest, still running → TASK_ACCEPTED (the result goes to the newest sender);
* same id, other args → TASK_RESULT InvalidRequest, nothing recorded;
* a record left ``running`` by a previous process is an interrupted task: a re-sent id runs
  again (WIRE-14) — every handler is written so that a rerun has the same end effects.

Handlers are plain functions run in worker threads (building an image is blocking work);
they report progress through :class:`TaskContext` and honour its cancel event. The record
holds a digest of the args *without* credentials and the result, never the args: request
credentials must not reach the disk (IMG-4).

The runner does not own a socket. The session attaches a ``send`` coroutine while a session
is live; results finished while detached stay in the record and go out when the coordinator
re-sends the task (WIRE-11). Tests drive :meth:`TaskRunner.run` directly, no coordinator.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from protocol import canonical
from protocol.errors import Internal, InvalidRequest, JobCancelled, TCError, Timeout, UnsupportedMessage
from protocol.messages import Task, TaskAccepted, TaskCancel, TaskProgress, TaskResult
from protocol.message import Message

from .catalog import TASK_KIND, Catalog

log = logging.getLogger("tasks")

Send = Callable[[Message], Awaitable[bool]]
# Arg keys that never enter a digest, a record or a log line (IMG-4).
SECRET_ARGS = ("credentials",)


class TaskContext:
    """What a handler sees: its args, a cancel flag and a progress reporter (thread-safe)."""

    def __init__(self, task_id: str, op: str, args: dict[str, Any], report: Callable[[dict[str, Any]], None]) -> None:
        self.task_id = task_id
        self.op = op
        self.args = args
        self.cancel = threading.Event()
        self.cancel_reason: TCError | None = None
        self._report = report

    def progress(self, progress: dict[str, Any]) -> None:
        """Latest progress wins; the runner sends at most one TASK_PROGRESS per interval."""
        self._report(dict(progress))

    def check(self) -> None:
        """Raise the cancel reason (JobCancelled or Timeout) if the task was asked to stop."""
        if self.cancel.is_set():
            raise self.cancel_reason or JobCancelled("task cancelled")

    def stop(self, reason: TCError) -> None:
        if not self.cancel.is_set():
            self.cancel_reason = reason
            self.cancel.set()


Handler = Callable[[TaskContext], dict[str, Any]]


def args_digest(args: dict[str, Any]) -> str:
    return canonical.digest({k: v for k, v in args.items() if k not in SECRET_ARGS})


@dataclass
class _Running:
    ctx: TaskContext
    parent_id: str
    future: asyncio.Task[None] | None = None
    latest: dict[str, Any] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class TaskRunner:
    def __init__(self, catalog: Catalog, handlers: dict[str, Handler], *, progress_interval: float = 1.0,
                 retention: float = 7 * 86400.0, clock: Callable[[], float] = time.time) -> None:
        self._catalog = catalog
        self._handlers = dict(handlers)
        self._interval = progress_interval
        self._retention = retention
        self._clock = clock
        self._send: Send | None = None
        self._running: dict[str, _Running] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- session side ---------------------------------------------------------------

    def attach(self, send: Send | None) -> None:
        """The session's send coroutine while a session is live, None when it ends."""
        self._send = send

    @property
    def ops(self) -> list[str]:
        return sorted(self._handlers)

    def running(self) -> list[str]:
        return sorted(self._running)

    async def on_task(self, task: Task) -> None:
        """WIRE-12/13: accept, answer from the record, or start the work."""
        digest = args_digest(task.args)
        record = self._catalog.get(TASK_KIND, task.task_id)
        if record is not None:
            body = record["body"]
            if body.get("args_digest") != digest or body.get("op") != task.op:
                await self._emit(TaskResult(parent_id=task.msg_id, task_id=task.task_id, ok=False, error=InvalidRequest(
                    f"task {task.task_id} was already sent with other arguments",
                    {"field": "task_id", "reason": "reused with other args"}).to_wire()))
                return
            running = self._running.get(task.task_id)
            if running is not None:
                running.parent_id = task.msg_id
                await self._emit(TaskAccepted(parent_id=task.msg_id, task_id=task.task_id))
                return
            if body.get("status") == "done":
                await self._emit(TaskAccepted(parent_id=task.msg_id, task_id=task.task_id))
                await self._emit(self._result_message(task.msg_id, task.task_id, body))
                return
            log.info("task %s (%s) was interrupted by a restart: running it again", task.task_id, task.op)
        handler = self._handlers.get(task.op)
        if handler is None:
            await self._emit(TaskAccepted(parent_id=task.msg_id, task_id=task.task_id))
            await self._emit(TaskResult(parent_id=task.msg_id, task_id=task.task_id, ok=False, error=UnsupportedMessage(
                f"task op {task.op} is not implemented on this agent", {"op": task.op}).to_wire()))
            return
        self._record(task.task_id, {"op": task.op, "args_digest": digest, "status": "running",
                                    "started": int(self._clock())})
        await self._emit(TaskAccepted(parent_id=task.msg_id, task_id=task.task_id))
        self._start(task, handler)

    async def on_cancel(self, cancel: TaskCancel) -> None:
        running = self._running.get(cancel.task_id)
        if running is None:
            log.info("TASK_CANCEL for %s: not running here", cancel.task_id)
            return
        log.info("TASK_CANCEL for %s (%s)", cancel.task_id, running.ctx.op)
        running.ctx.stop(JobCancelled(f"task {cancel.task_id} was cancelled"))

    # --- harness side (no coordinator) -------------------------------------------------

    async def run(self, op: str, args: dict[str, Any], task_id: str, deadline_ms: int = 0) -> TaskResult:
        """Submit a task as if the coordinator had sent it and wait for its TASK_RESULT."""
        results: list[TaskResult] = []
        done = asyncio.Event()
        previous = self._send

        async def collect(msg: Message) -> bool:
            if isinstance(msg, TaskResult) and msg.task_id == task_id:
                results.append(msg)
                done.set()
            return previous is None or await previous(msg)

        self._send = collect
        try:
            await self.on_task(Task(msg_id=f"local-{task_id}", task_id=task_id, op=op, args=args,
                                    deadline=deadline_ms))
            await done.wait()
        finally:
            self._send = previous
        return results[0]

    async def close(self) -> None:
        """Stop every running task (agent shutdown); their records stay ``running`` (WIRE-14)."""
        for running in list(self._running.values()):
            running.ctx.stop(JobCancelled("the agent is stopping"))
            if running.future is not None:
                running.future.cancel()
        await asyncio.gather(*(r.future for r in self._running.values() if r.future), return_exceptions=True)

    def prune(self) -> int:
        """CAT-7: drop finished task records older than the retention."""
        cutoff = self._clock() - self._retention
        old = [(TASK_KIND, e["id"]) for e in self._catalog.entries(TASK_KIND)
               if e["body"].get("status") == "done" and e["body"].get("ended", 0) < cutoff]
        if old:
            self._catalog.apply(deletes=old)
        return len(old)

    # --- internals --------------------------------------------------------------------

    def _start(self, task: Task, handler: Handler) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        entry: _Running

        def report(progress: dict[str, Any]) -> None:  # from the worker thread
            entry.latest = progress
            loop.call_soon_threadsafe(entry.wake.set)

        entry = _Running(TaskContext(task.task_id, task.op, dict(task.args), report), task.msg_id)
        self._running[task.task_id] = entry
        entry.future = asyncio.create_task(self._drive(task, handler, entry), name=f"task {task.task_id}")

    async def _drive(self, task: Task, handler: Handler, entry: _Running) -> None:
        ctx = entry.ctx
        started = time.monotonic()
        work = asyncio.ensure_future(asyncio.to_thread(self._call, handler, ctx))
        pump = asyncio.create_task(self._pump_progress(entry))
        deadline = task.deadline / 1000 if task.deadline else None
        try:
            while not work.done():
                timeout = None if deadline is None else max(0.0, deadline - self._clock())
                if timeout == 0.0:
                    ctx.stop(Timeout(f"task {task.task_id} passed its deadline"))
                    timeout = None
                await asyncio.wait({work}, timeout=timeout)
            ok, payload = work.result()
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        body = {"op": task.op, "args_digest": args_digest(task.args), "status": "done", "ok": ok,
                "started": int(self._clock() - (time.monotonic() - started)), "ended": int(self._clock())}
        body["result" if ok else "error"] = payload
        self._record(task.task_id, body)
        self._running.pop(task.task_id, None)
        outcome = "ok" if ok else payload.get("name")
        log.info("task %s (%s) finished in %.1fs: %s", task.task_id, task.op, time.monotonic() - started, outcome)
        await self._emit(self._result_message(entry.parent_id, task.task_id, body))

    @staticmethod
    def _call(handler: Handler, ctx: TaskContext) -> tuple[bool, dict[str, Any]]:
        """Run the handler; every failure becomes an error body (one place maps them)."""
        try:
            ctx.check()
            return True, handler(ctx)
        except TCError as exc:
            return False, exc.to_wire()
        except Exception as exc:  # noqa: BLE001 — a handler bug must end the task, not the agent
            log.exception("task %s (%s) failed unexpectedly", ctx.task_id, ctx.op)
            return False, Internal(f"{ctx.op} failed: {type(exc).__name__}: {exc}").to_wire()

    async def _pump_progress(self, entry: _Running) -> None:
        """At most one TASK_PROGRESS per interval, always the latest (WIRE-12)."""
        while True:
            await entry.wake.wait()
            entry.wake.clear()
            if entry.latest is not None:
                progress, entry.latest = entry.latest, None
                await self._emit(TaskProgress(parent_id=entry.parent_id, task_id=entry.ctx.task_id,
                                              progress=progress))
            await asyncio.sleep(self._interval)

    def _result_message(self, parent_id: str, task_id: str, body: dict[str, Any]) -> TaskResult:
        if body.get("ok"):
            return TaskResult(parent_id=parent_id, task_id=task_id, ok=True, result=body.get("result") or {})
        return TaskResult(parent_id=parent_id, task_id=task_id, ok=False, error=body.get("error"))

    def _record(self, task_id: str, body: dict[str, Any]) -> None:
        self._catalog.put(TASK_KIND, task_id, body)

    async def _emit(self, msg: Message) -> None:
        send = self._send
        if send is None:
            return  # no session: the record answers when the task is sent again
        try:
            await send(msg)
        except Exception:  # noqa: BLE001 — a failed send must not lose the task
            log.warning("could not send %s", msg.TYPE, exc_info=True)
