"""Tasks from the coordinator to agents (SPEC WIRE-12 to WIRE-14, WIRE-11).

``await dispatcher.run_task(node, op, args, task_id)`` sends TASK and returns the result
dict of the TASK_RESULT, or raises the agent's error as its TCError class. In between:

* TASK_ACCEPTED must come within ``task.accept_timeout`` (10 s); an unaccepted task is sent
  again, ``task.resend`` (3) times while the node is READY, then NodeUnavailable;
* TASK_PROGRESS goes to ``on_progress`` (the job runner throttles its writes);
* a node that turns LOST while the task runs → NodeUnavailable (the job moves on, TPL-11);
* a new session of the node (HELLO, WIRE-11) re-sends its in-flight tasks under the same
  ids: the agent answers from its task record (WIRE-13), so nothing runs twice;
* past ``deadline_ms`` → TASK_CANCEL and Timeout; a cancelled caller → TASK_CANCEL.

Task ids are deterministic (``protocol.ids.task_id``), so a coordinator that restarts and
re-sends a step's task gets the recorded outcome instead of a second run (TPL-31).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from protocol.errors import NodeUnavailable, TCError, Timeout, from_wire
from protocol.message import Message
from protocol.messages import Task, TaskAccepted, TaskCancel, TaskProgress, TaskResult

from .health import Health
from .nodes import NodeRegistry

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]


class Sender(Protocol):
    def reply(self, ident: bytes, msg: Message) -> None: ...


@dataclass
class _InFlight:
    node_id: str
    op: str
    args: dict[str, Any]
    deadline_ms: int
    on_progress: ProgressFn | None
    result: asyncio.Future[TaskResult]
    accepted: asyncio.Event = field(default_factory=asyncio.Event)
    msg_ids: set[str] = field(default_factory=set)


class TaskDispatcher:
    def __init__(self, registry: NodeRegistry, *, accept_timeout: float = 10.0, resend: int = 3,
                 watch_every: float = 1.0) -> None:
        self.registry = registry
        self.accept_timeout = accept_timeout
        self.resend = resend
        self.watch_every = watch_every
        self.sender: Sender | None = None
        self._inflight: dict[str, _InFlight] = {}
        self._prefix = secrets.token_hex(4)
        self._n = itertools.count(1)

    def attach(self, sender: Sender) -> None:
        self.sender = sender

    # --- the caller's side ---------------------------------------------------------------

    async def run_task(self, node_id: str, op: str, args: dict[str, Any], task_id: str,
                       on_progress: ProgressFn | None = None, *, deadline_ms: int = 0) -> dict[str, Any]:
        if task_id in self._inflight:  # the same step twice (a resumed job): share the outcome
            return _unwrap(await asyncio.shield(self._inflight[task_id].result))
        loop = asyncio.get_running_loop()
        entry = _InFlight(node_id, op, args, deadline_ms, on_progress, loop.create_future())
        self._inflight[task_id] = entry
        try:
            self._send(task_id, entry)
            await self._await_accept(task_id, entry)
            return _unwrap(await self._await_result(task_id, entry))
        except asyncio.CancelledError:
            self._cancel(task_id, entry, "the job stopped waiting")
            raise
        finally:
            self._inflight.pop(task_id, None)

    async def _await_accept(self, task_id: str, entry: _InFlight) -> None:
        sends = 0
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(entry.accepted.wait()), self.accept_timeout)
                return
            except asyncio.TimeoutError:
                pass
            if entry.result.done():  # an answer from the record may come without a fresh ACCEPTED
                return
            ready = self._health(entry.node_id) is Health.READY
            if not ready or sends >= self.resend:
                raise NodeUnavailable(
                    f"node {entry.node_id} did not accept task {entry.op} ({task_id}) "
                    f"after {sends + 1} send(s)", {"node": entry.node_id, "task_id": task_id})
            sends += 1
            log.info("task %s (%s) to %s not accepted: sending again (%d/%d)", task_id, entry.op,
                     entry.node_id, sends, self.resend)
            self._send(task_id, entry)

    async def _await_result(self, task_id: str, entry: _InFlight) -> TaskResult:
        while True:
            timeout = self.watch_every
            if entry.deadline_ms:
                left = entry.deadline_ms / 1000 - time.time()
                if left <= 0:
                    self._cancel(task_id, entry, "deadline passed")
                    raise Timeout(f"task {entry.op} on node {entry.node_id} passed its deadline",
                                  {"node": entry.node_id, "task_id": task_id})
                timeout = min(timeout, left)
            try:
                return await asyncio.wait_for(asyncio.shield(entry.result), timeout)
            except asyncio.TimeoutError:
                pass
            if self._health(entry.node_id) is Health.LOST:
                raise NodeUnavailable(f"node {entry.node_id} was lost while running task {entry.op}",
                                      {"node": entry.node_id, "task_id": task_id})

    def _health(self, node_id: str) -> Health | None:
        node = self.registry.nodes.get(node_id)
        return None if node is None else self.registry.health(node)

    def _send(self, task_id: str, entry: _InFlight) -> None:
        if self.sender is None:
            raise NodeUnavailable("the agent endpoint is not serving", {"node": entry.node_id})
        msg_id = f"{self._prefix}-{next(self._n)}"
        entry.msg_ids.add(msg_id)
        self.sender.reply(entry.node_id.encode(), Task(msg_id=msg_id, task_id=task_id, op=entry.op,
                                                       args=entry.args, deadline=entry.deadline_ms))

    def _cancel(self, task_id: str, entry: _InFlight, why: str) -> None:
        if self.sender is not None and entry.accepted.is_set() and not entry.result.done():
            log.info("task %s (%s) on %s: TASK_CANCEL (%s)", task_id, entry.op, entry.node_id, why)
            self.sender.reply(entry.node_id.encode(),
                              TaskCancel(msg_id=f"{self._prefix}-{next(self._n)}", task_id=task_id))

    async def cancel_task(self, node_id: str, task_id: str) -> None:
        """TPL-32: ask the agent to stop a task; its TASK_RESULT (JobCancelled) still follows."""
        entry = self._inflight.get(task_id)
        if entry is not None and entry.node_id == node_id:
            self._cancel(task_id, entry, "job cancelled")

    # --- the agent endpoint's side ---------------------------------------------------------

    def on_message(self, node_id: str, msg: TaskAccepted | TaskProgress | TaskResult) -> None:
        entry = self._inflight.get(msg.task_id)
        if entry is None or entry.node_id != node_id:
            log.info("node %s: %s for a task not waited on (%s): ignored", node_id, msg.TYPE, msg.task_id)
            return
        if isinstance(msg, TaskAccepted):
            entry.accepted.set()
        elif isinstance(msg, TaskProgress):
            entry.accepted.set()
            if entry.on_progress is not None:
                try:
                    entry.on_progress(msg.progress)
                except Exception:  # noqa: BLE001 — a progress sink must not lose the result
                    log.exception("progress handler for task %s failed", msg.task_id)
        elif not entry.result.done():
            entry.accepted.set()
            entry.result.set_result(msg)

    def on_session(self, node_id: str) -> None:
        """WIRE-11: a node's new session gets its in-flight tasks again, under the same ids."""
        for task_id, entry in self._inflight.items():
            if entry.node_id == node_id and not entry.result.done():
                log.info("node %s has a new session: re-sending task %s (%s)", node_id, task_id, entry.op)
                self._send(task_id, entry)

    def inflight(self) -> list[str]:
        return sorted(self._inflight)


def _unwrap(result: TaskResult) -> dict[str, Any]:
    if result.ok:
        return dict(result.result or {})
    err: TCError = from_wire(result.error or {"name": "Internal", "message": "task failed without an error"})
    raise err
