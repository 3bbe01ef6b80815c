"""The agent task runner (WIRE-12, WIRE-13, WIRE-14, CAT-7, IMG-4) against a real catalog
file and small handler functions."""
from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.catalog import TASK_KIND, Catalog
from agent.tasks import TaskContext, TaskRunner, args_digest
from protocol.errors import ImageNotFound
from protocol.message import Message
from protocol.messages import Task, TaskAccepted, TaskCancel, TaskProgress, TaskResult

TID = "tsk-" + "a" * 24
TID2 = "tsk-" + "b" * 24


class Wire:
    """Collects what the runner sends, as the session would."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.event = asyncio.Event()

    async def send(self, msg: Message) -> bool:
        self.sent.append(msg)
        self.event.set()
        return True

    def of(self, cls: type) -> list[Any]:
        return [m for m in self.sent if isinstance(m, cls)]

    async def until(self, pred: Any, timeout: float = 5.0) -> None:
        async def loop() -> None:
            while not pred():
                self.event.clear()
                await self.event.wait()
        await asyncio.wait_for(loop(), timeout)


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    cat = Catalog.open(str(tmp_path))
    yield cat
    cat.close()


def task(op: str = "ECHO", args: dict[str, Any] | None = None, *, task_id: str = TID, msg_id: str = "m-1",
         deadline: int = 0) -> Task:
    return Task(msg_id=msg_id, task_id=task_id, op=op, args=args if args is not None else {"x": 1},
                deadline=deadline)


def runner_with(catalog: Catalog, wire: Wire, handlers: dict[str, Any], **kw: Any) -> TaskRunner:
    r = TaskRunner(catalog, handlers, progress_interval=kw.pop("progress_interval", 0.05), **kw)
    r.attach(wire.send)
    return r


def test_accept_progress_result_and_record_without_credentials(catalog: Catalog) -> None:
    """WIRE-12: TASK_ACCEPTED, TASK_PROGRESS, exactly one TASK_RESULT; WIRE-13/IMG-4: the record
    holds the args digest and the result, never the credentials."""
    calls: list[dict[str, Any]] = []

    def echo(ctx: TaskContext) -> dict[str, Any]:
        calls.append(ctx.args)
        ctx.progress({"phase": "PULLING", "percent": 50.0})
        return {"echo": ctx.args["x"]}

    async def main() -> Wire:
        wire = Wire()
        r = runner_with(catalog, wire, {"ECHO": echo})
        await r.on_task(task(args={"x": 7, "credentials": {"username": "u", "password": "hunter2-secret"}}))
        await wire.until(lambda: wire.of(TaskResult))
        return wire

    wire = asyncio.run(main())
    assert isinstance(wire.sent[0], TaskAccepted) and wire.sent[0].parent_id == "m-1"
    results = wire.of(TaskResult)
    assert len(results) == 1 and results[0].ok and results[0].result == {"echo": 7}
    assert results[0].parent_id == "m-1"
    assert len(calls) == 1
    record = catalog.get(TASK_KIND, TID)
    assert record is not None and record["body"]["status"] == "done" and record["body"]["ok"] is True
    assert record["body"]["args_digest"] == args_digest({"x": 7})
    assert "hunter2-secret" not in json.dumps(catalog.entries())
    assert "hunter2-secret" not in Path(catalog.path).read_bytes().decode("latin-1")


def test_resent_done_task_answers_from_the_record(catalog: Catalog) -> None:
    """WIRE-13: a re-sent id with the same args gets the recorded result, no second run."""
    count = [0]

    def once(ctx: TaskContext) -> dict[str, Any]:
        count[0] += 1
        return {"n": count[0]}

    async def main() -> Wire:
        wire = Wire()
        r = runner_with(catalog, wire, {"ECHO": once})
        await r.on_task(task())
        await wire.until(lambda: len(wire.of(TaskResult)) == 1)
        await r.on_task(task(msg_id="m-2"))
        await wire.until(lambda: len(wire.of(TaskResult)) == 2)
        return wire

    wire = asyncio.run(main())
    first, second = wire.of(TaskResult)
    assert count[0] == 1
    assert first.result == second.result == {"n": 1}
    assert second.parent_id == "m-2"
    assert len(wire.of(TaskAccepted)) == 2


def test_resent_running_task_is_accepted_and_answered_once_to_the_newest_sender(catalog: Catalog) -> None:
    """WIRE-13: TASK_ACCEPTED while running; the one result answers the newest msg_id."""
    gate = threading.Event()

    def slow(ctx: TaskContext) -> dict[str, Any]:
        assert gate.wait(5)
        return {"ok": 1}

    async def main() -> Wire:
        wire = Wire()
        r = runner_with(catalog, wire, {"ECHO": slow})
        await r.on_task(task())
        await r.on_task(task(msg_id="m-2"))
        assert r.running() == [TID]
        gate.set()
        await wire.until(lambda: wire.of(TaskResult))
        await asyncio.sleep(0)  # nothing else may follow; give it a turn to show up
        return wire

    wire = asyncio.run(main())
    assert [m.parent_id for m in wire.of(TaskAccepted)] == ["m-1", "m-2"]
    results = wire.of(TaskResult)
    assert len(results) == 1 and results[0].parent_id == "m-2"


def test_same_id_other_args_is_invalid_request(catalog: Catalog) -> None:
    """WIRE-13: other args under a known id → InvalidRequest, the record unchanged."""
    async def main() -> Wire:
        wire = Wire()
        r = runner_with(catalog, wire, {"ECHO": lambda ctx: {}})
        await r.on_task(task(args={"x": 1}))
        await wire.until(lambda: wire.of(TaskResult))
        await r.on_task(task(args={"x": 2}, msg_id="m-2"))
        await wire.until(lambda: len(wire.of(TaskResult)) == 2)
        return wire

    wire = asyncio.run(main())
    bad = wire.of(TaskResult)[1]
    assert not bad.ok and bad.error["name"] == "InvalidRequest" and bad.error["details"]["field"] == "task_id"
    assert catalog.get(TASK_KIND, TID)["body"]["args_digest"] == args_digest({"x": 1})


def test_unknown_op_and_handler_errors_become_error_results(catalog: Catalog) -> None:
    """WIRE-12/15: an op this agent lacks → UnsupportedMessage; a TCError keeps its name; a bug → Internal."""
    def missing(ctx: TaskContext) -> dict[str, Any]:
        raise ImageNotFound("no such image", {"image": ctx.args["x"]})

    def buggy(ctx: TaskContext) -> dict[str, Any]:
        raise KeyError("oops")

    async def main() -> Wire:
        wire = Wire()
        r = runner_with(catalog, wire, {"MISSING": missing, "BUGGY": buggy})
        await r.on_task(task(op="NOPE"))
        await r.on_task(task(op="MISSING", task_id=TID2))
        await r.on_task(task(op="BUGGY", task_id="tsk-" + "c" * 24))
        await wire.until(lambda: len(wire.of(TaskResult)) == 3)
        return wire

    wire = asyncio.run(main())
    by_id = {m.task_id: m for m in wire.of(TaskResult)}
    assert by_id[TID].error["name"] == "UnsupportedMessage"
    assert by_id[TID2].error["name"] == "ImageNotFound" and by_id[TID2].error["details"] == {"image": 1}
    assert by_id["tsk-" + "c" * 24].error["name"] == "Internal"


def test_cancel_and_deadline_stop_the_handler(catalog: Catalog) -> None:
    """WIRE-12: TASK_CANCEL → a TASK_RESULT JobCancelled still follows; WIRE-14: past the deadline → Timeout."""
    def waits(ctx: TaskContext) -> dict[str, Any]:
        assert ctx.cancel.wait(10)
        ctx.check()
        return {}

    async def main() -> Wire:
        wire = Wire()
        r = runner_with(catalog, wire, {"WAIT": waits})
        await r.on_task(task(op="WAIT"))
        await r.on_cancel(TaskCancel(msg_id="c-1", task_id=TID))
        loop_deadline = int((__import__("time").time() + 0.2) * 1000)
        await r.on_task(task(op="WAIT", task_id=TID2, deadline=loop_deadline))
        await wire.until(lambda: len(wire.of(TaskResult)) == 2)
        return wire

    wire = asyncio.run(main())
    by_id = {m.task_id: m for m in wire.of(TaskResult)}
    assert by_id[TID].error["name"] == "JobCancelled"
    assert by_id[TID2].error["name"] == "Timeout"


def test_interrupted_task_reruns_and_old_records_are_pruned(catalog: Catalog) -> None:
    """WIRE-14: a record left running by an earlier process reruns on re-send; CAT-7: done records
    older than the retention go, newer ones stay."""
    catalog.put(TASK_KIND, TID, {"op": "ECHO", "args_digest": args_digest({"x": 1}), "status": "running",
                                 "started": 1})
    catalog.put(TASK_KIND, TID2, {"op": "ECHO", "args_digest": "x", "status": "done", "ok": True,
                                  "started": 1, "ended": 2})
    runs = [0]

    def echo(ctx: TaskContext) -> dict[str, Any]:
        runs[0] += 1
        return {"rerun": True}

    async def main() -> Wire:
        wire = Wire()
        r = runner_with(catalog, wire, {"ECHO": echo})
        assert r.prune() == 1
        await r.on_task(task())
        await wire.until(lambda: wire.of(TaskResult))
        return wire

    wire = asyncio.run(main())
    assert runs[0] == 1 and wire.of(TaskResult)[0].result == {"rerun": True}
    assert catalog.get(TASK_KIND, TID2) is None
    assert catalog.get(TASK_KIND, TID)["body"]["status"] == "done"


def test_progress_is_throttled_to_the_interval_and_the_latest_wins(catalog: Catalog) -> None:
    """WIRE-12/IMG-23: at most one TASK_PROGRESS per interval, carrying the latest figures."""
    def chatty(ctx: TaskContext) -> dict[str, Any]:
        for i in range(2000):
            ctx.progress({"i": i})
        return {}

    async def main() -> Wire:
        wire = Wire()
        r = runner_with(catalog, wire, {"ECHO": chatty}, progress_interval=0.5)
        await r.on_task(task())
        await wire.until(lambda: wire.of(TaskResult))
        return wire

    wire = asyncio.run(main())
    progress = wire.of(TaskProgress)
    assert 1 <= len(progress) <= 3
    assert all(p.parent_id == "m-1" for p in progress)


def test_run_without_a_coordinator_returns_the_result(catalog: Catalog) -> None:
    """Issue 4: the tasks are callable from a harness with no coordinator."""
    async def main() -> TaskResult:
        r = TaskRunner(catalog, {"ECHO": lambda ctx: {"x": ctx.args["x"]}})
        return await r.run("ECHO", {"x": 3}, TID)

    result = asyncio.run(main())
    assert result.ok and result.result == {"x": 3}
