"""The job runner with a tiny example job type, on SQLite and PostgreSQL (TPL-31, TPL-32, CONV-4, CONV-5).

Steps run in order and the next step is persisted after each; a runner stopped mid-step leaves
the job RUNNING at that step and a new runner resumes there without rerunning finished steps;
cancel and errors end FAILED with the right ``{name, message}``; two runners on one database
never both claim a job. No sleeps: tests wait on events and ``join``.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import Clock, async_wait_for

from coordinator.jobs.base import JobContext, JobType
from coordinator.jobs.runner import JobRunner
from coordinator.jobs.store import JobStore
from protocol import ids
from protocol.errors import NodeUnavailable, TCError

REQ = {"image": "registry.local/app:1"}


class FakeTasks:
    """A TaskPort: records tasks; ops in ``block`` wait until cancelled via TASK_CANCEL."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []
        self.cancelled: list[str] = []
        self.block: set[str] = set()
        self.started = asyncio.Event()
        self._release: dict[str, asyncio.Event] = {}

    async def run_task(self, node_id: str, op: str, args: dict[str, Any], task_id: str,
                       on_progress: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
        self.sent.append((node_id, op, task_id))
        if on_progress:
            on_progress({"progress": 50})
        if op in self.block:
            ev = self._release.setdefault(task_id, asyncio.Event())
            self.started.set()
            await ev.wait()
            raise TCError("task cancelled")
        return {"ok": True, "task_id": task_id}

    async def cancel_task(self, node_id: str, task_id: str) -> None:
        self.cancelled.append(task_id)
        self._release.setdefault(task_id, asyncio.Event()).set()


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.cleanups: list[tuple[str, dict[str, str]]] = []
        self.gate: asyncio.Event | None = None  # step TWO waits on it when set
        self.entered_two = asyncio.Event()
        self.fail_with: BaseException | None = None
        self.cleanup_gate: asyncio.Event | None = None


def example_type(rec: Recorder) -> type[JobType]:
    class Example(JobType):
        operation = "CREATE"
        steps = ("ONE", "TWO", "THREE")

        async def step_one(self, ctx: JobContext) -> None:
            rec.calls.append((ctx.job_id, "ONE"))
            await ctx.set_phase("PULLING")
            ctx.state["builder"] = "n1"
            ctx.stage(builder_node_id="n1")
            result = await ctx.run_task("n1", "BUILD", {"x": 1})
            ctx.state["task"] = result["task_id"]

        async def step_two(self, ctx: JobContext) -> None:
            rec.calls.append((ctx.job_id, "TWO"))
            assert ctx.state["builder"] == "n1"  # persisted by ONE, visible after a resume
            await ctx.set_phase("DISTRIBUTING")
            rec.entered_two.set()
            if rec.gate is not None:
                await rec.gate.wait()
            if rec.fail_with is not None:
                raise rec.fail_with
            await ctx.run_task("n2", "FETCH", {})

        async def step_three(self, ctx: JobContext) -> None:
            rec.calls.append((ctx.job_id, "THREE"))
            await ctx.set_phase("CREATING_TEMPLATE")
            ctx.stage(nodes_expected=1, nodes_ready=1)

        async def cleanup(self, ctx: JobContext, error: Any) -> None:
            rec.cleanups.append((ctx.job_id, dict(error)))
            if rec.cleanup_gate is not None:
                await rec.cleanup_gate.wait()

        async def result(self, ctx: JobContext) -> dict[str, Any]:
            return {"artifact_id": "art-" + "a" * 24}

    return Example


def new_store(engine, clock: Clock) -> JobStore:
    return JobStore(engine, clock=clock)


def submit(store: JobStore, rid: str = "r-1") -> str:
    return store.create_template(request_id=rid, request={**REQ, "n": rid}).job_id


def test_steps_run_in_order_and_end_ready(engine, clock: Clock) -> None:
    rec, tasks = Recorder(), FakeTasks()
    store = new_store(engine, clock)
    job_id = submit(store)

    async def main() -> None:
        runner = JobRunner(store, tasks, owner="c1", types=[example_type(rec)])
        assert await runner.run_once() == [job_id]
        await runner.join(30)

    asyncio.run(main())
    assert rec.calls == [(job_id, "ONE"), (job_id, "TWO"), (job_id, "THREE")]
    job = store.get_job(job_id)
    assert job["status"] == "READY" and job["phase"] == "READY" and job["progress"] == 100  # CONV-5
    assert job["error"] is None and job["owner"] == "c1" and job["started_ms"] and job["finished_ms"]
    assert job["builder_node_id"] == "n1" and job["nodes_ready"] == 1 and job["artifact_id"] == "art-" + "a" * 24
    assert job["step_state"]["task"] == ids.task_id(job_id, "ONE", "n1", 0)  # deterministic task id
    assert tasks.sent == [("n1", "BUILD", ids.task_id(job_id, "ONE", "n1", 0)),
                          ("n2", "FETCH", ids.task_id(job_id, "TWO", "n2", 0))]
    assert job["step"] == "THREE"


@pytest.mark.parametrize("release", [True, False])
def test_stopped_mid_step_resumes_at_the_persisted_step(engine, clock: Clock, release: bool) -> None:
    """TPL-31: a crash (the runner stopped mid-step) leaves RUNNING at step TWO; a new runner resumes
    there — at once after an orderly release, else once the old owner's lease lapsed."""
    rec, tasks = Recorder(), FakeTasks()
    rec.gate = asyncio.Event()  # TWO never finishes in the first runner
    store_a = new_store(engine, clock)
    job_id = submit(store_a)

    async def first() -> None:
        a = JobRunner(store_a, tasks, owner="coord-a", types=[example_type(rec)], lease_ms=10_000)
        await a.run_once()
        await asyncio.wait_for(rec.entered_two.wait(), 30)
        await a.stop(release=release)

    asyncio.run(first())
    job = store_a.get_job(job_id)
    assert job["status"] == "RUNNING" and job["step"] == "TWO" and job["step_state"]["builder"] == "n1"
    assert job["phase"] == "DISTRIBUTING" and job["progress"] == 70

    rec.gate = None
    rec.entered_two = asyncio.Event()
    store_b = new_store(engine, clock)

    async def second() -> list[str]:
        b = JobRunner(store_b, tasks, owner="coord-b", types=[example_type(rec)], lease_ms=10_000)
        got = await b.run_once()
        if not release:
            assert got == []  # coord-a's lease still runs
            clock.t += 11
            got = await b.run_once()
        await b.join(30)
        return got

    assert asyncio.run(second()) == [job_id]
    assert [c[1] for c in rec.calls] == ["ONE", "TWO", "TWO", "THREE"]  # ONE never reran
    job = store_b.get_job(job_id)
    assert job["status"] == "READY" and job["owner"] == "coord-b" and job["progress"] == 100


def test_cancel_at_a_step_boundary(engine, clock: Clock) -> None:
    """TPL-32: cancel_requested stops the job before its next step, cleans up, ends FAILED JobCancelled."""
    rec, tasks = Recorder(), FakeTasks()
    rec.gate = asyncio.Event()
    store = new_store(engine, clock)
    job_id = submit(store)

    async def main() -> None:
        runner = JobRunner(store, tasks, owner="c1", types=[example_type(rec)], cancel_poll_s=3600)
        await runner.run_once()
        await asyncio.wait_for(rec.entered_two.wait(), 30)
        await asyncio.to_thread(store.request_cancel, job_id)
        rec.gate.set()  # TWO completes; the boundary after it sees the cancel
        await runner.join(30)

    asyncio.run(main())
    assert [c[1] for c in rec.calls] == ["ONE", "TWO"]
    job = store.get_job(job_id)
    assert job["status"] == "FAILED" and job["progress"] == 100
    assert job["error"] == {"name": "JobCancelled", "message": "job cancelled"}
    assert rec.cleanups == [(job_id, job["error"])]


def test_cancel_mid_step_sends_task_cancel(engine, clock: Clock) -> None:
    rec, tasks = Recorder(), FakeTasks()
    store = new_store(engine, clock)
    job_id = submit(store)
    tasks.block = {"FETCH"}  # step TWO's task runs until TASK_CANCEL

    async def main() -> None:
        runner = JobRunner(store, tasks, owner="c1", types=[example_type(rec)], cancel_poll_s=0.01)
        await runner.run_once()
        await asyncio.wait_for(tasks.started.wait(), 30)
        await asyncio.to_thread(store.request_cancel, job_id)
        await runner.join(30)

    asyncio.run(main())
    job = store.get_job(job_id)
    assert tasks.cancelled == [ids.task_id(job_id, "TWO", "n2", 0)]
    assert job["status"] == "FAILED" and job["error"]["name"] == "JobCancelled"  # not the task's error
    assert [c[1] for c in rec.calls] == ["ONE", "TWO"]


@pytest.mark.parametrize("exc,name", [(NodeUnavailable("node n2 is LOST"), "NodeUnavailable"),
                                      (ValueError("boom /secret/path"), "Internal")])
def test_errors_map_to_a_failed_end(engine, clock: Clock, exc: BaseException, name: str) -> None:
    rec, tasks = Recorder(), FakeTasks()
    rec.fail_with = exc
    store = new_store(engine, clock)
    job_id = submit(store)

    async def main() -> None:
        runner = JobRunner(store, tasks, owner="c1", types=[example_type(rec)])
        await runner.run_once()
        await runner.join(30)

    asyncio.run(main())
    job = store.get_job(job_id)
    assert job["status"] == "FAILED" and job["progress"] == 100 and job["error"]["name"] == name
    assert job["step"] == "TWO"  # the step that failed
    if name == "Internal":
        assert "log ref" in job["error"]["message"] and "boom" not in job["error"]["message"]
        assert "Traceback" not in repr(job)
    else:
        assert job["error"]["message"] == "node n2 is LOST"
    assert rec.cleanups == [(job_id, job["error"])]


def test_crash_during_cleanup_is_finished_on_resume(engine, clock: Clock) -> None:
    """The error is written before cleanup (TPL-15); a runner stopped in cleanup leaves RUNNING with
    the error; the next runner reruns cleanup and ends FAILED with that same error."""
    rec, tasks = Recorder(), FakeTasks()
    rec.fail_with = NodeUnavailable("node n2 is LOST")
    rec.cleanup_gate = asyncio.Event()
    store = new_store(engine, clock)
    job_id = submit(store)

    async def first() -> None:
        runner = JobRunner(store, tasks, owner="c1", types=[example_type(rec)])
        await runner.run_once()
        await async_wait_for(lambda: rec.cleanups, 30, "the cleanup", 0.01)
        await runner.stop()

    asyncio.run(first())
    job = store.get_job(job_id)
    assert job["status"] == "RUNNING" and job["error"]["name"] == "NodeUnavailable"
    rec.cleanup_gate = None

    async def second() -> None:
        runner = JobRunner(store, tasks, owner="c2", types=[example_type(rec)])
        await runner.run_once()
        await runner.join(30)

    asyncio.run(second())
    job = store.get_job(job_id)
    assert job["status"] == "FAILED" and job["error"] == {"name": "NodeUnavailable", "message": "node n2 is LOST"}
    assert len(rec.cleanups) == 2 and [c[1] for c in rec.calls] == ["ONE", "TWO"]


def test_two_runners_never_both_claim_a_job(engine, clock: Clock) -> None:
    """CONV-4: PENDING→RUNNING is a compare-and-set; each job runs its steps exactly once."""
    rec, tasks = Recorder(), FakeTasks()
    store_a, store_b = new_store(engine, clock), new_store(engine, clock)
    job_ids = [submit(store_a, f"r-{i}") for i in range(12)]

    async def main() -> tuple[list[str], list[str]]:
        kind = example_type(rec)
        a = JobRunner(store_a, tasks, owner="a", types=[kind])
        b = JobRunner(store_b, tasks, owner="b", types=[kind])
        got_a, got_b = await asyncio.gather(a.run_once(), b.run_once())
        await asyncio.gather(a.join(60), b.join(60))
        return got_a, got_b

    got_a, got_b = asyncio.run(main())
    assert sorted(got_a + got_b) == sorted(job_ids) and not set(got_a) & set(got_b)
    per_job = Counter(job for job, step in rec.calls if step == "ONE")
    assert all(per_job[j] == 1 for j in job_ids)
    owners = {store_a.get_job(j)["owner"] for j in job_ids}
    assert all(store_a.get_job(j)["status"] == "READY" for j in job_ids)
    assert owners <= {"a", "b"}


def test_loop_picks_up_submitted_jobs(engine, clock: Clock) -> None:
    rec, tasks = Recorder(), FakeTasks()
    store = new_store(engine, clock)

    async def main() -> str:
        runner = JobRunner(store, tasks, owner="c1", types=[example_type(rec)], poll_s=3600)
        await runner.start()
        job_id = await asyncio.to_thread(submit, store)
        runner.wake()
        await async_wait_for(lambda: store.get_job(job_id)["status"] == "READY", 30, "the job READY", 0.01)
        await runner.stop()
        return job_id

    job_id = asyncio.run(main())
    assert store.get_job(job_id)["status"] == "READY"
