"""The job runner: claims PENDING jobs, resumes RUNNING ones, drives their steps (TPL-31, TPL-32).

A runner has an ``owner`` id (its coordinator instance). Claiming is PENDING→RUNNING by
compare-and-set, so two runners on one database never both run a job; every later write is
fenced on the owner, so a runner whose lease lapsed and whose job was adopted elsewhere stops
(JobLost) instead of writing over the new owner. Leases are renewed every third of
``lease_ms``; an orderly stop releases them so the next runner adopts at once.

The runner honours ``cancel_requested`` at step boundaries (and sends TASK_CANCEL mid-step
through the TaskPort, if it can), and turns every step failure into a FAILED end in one place:
the error is written first (TPL-15), then the type's ``cleanup`` runs, then the transition. A
job found RUNNING with an error already written was interrupted during that cleanup: it is
finished the same way on resume.
"""
from __future__ import annotations

import asyncio
import os
import contextlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from protocol.errors import JobCancelled

from . import transitions as tr
from .base import JobContext, JobLost, JobType, TaskPort, job_error, registered
from .store import JobStore

log = logging.getLogger(__name__)

LEASE_MS = 30_000
POLL_S = 1.0
CANCEL_POLL_S = 1.0


class JobRunner:
    def __init__(self, store: JobStore, tasks: TaskPort | None, *, owner: str,
                 types: Iterable[type[JobType]] | None = None, lease_ms: int = LEASE_MS, poll_s: float = POLL_S,
                 cancel_poll_s: float = CANCEL_POLL_S, max_concurrent: int = 32, crash_after_step: str = "") -> None:
        self.store = store
        self.tasks = tasks
        self.owner = owner
        self.types: dict[str, type[JobType]] = ({t.operation: t for t in types} if types is not None
                                                else registered())
        self.lease_ms = lease_ms
        self.poll_s = poll_s
        self.cancel_poll_s = cancel_poll_s
        self.max_concurrent = max_concurrent
        self.crash_after_step = crash_after_step  # test-only fault injection (job.test_crash_after_step)
        self.running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    # ---- lifecycle ----

    async def start(self) -> None:
        """Resume this owner's (and lapsed owners') RUNNING jobs, start PENDING ones, then keep
        polling (TPL-31)."""
        await self.run_once()
        self._loop_task = asyncio.create_task(self._loop(), name=f"job-runner-{self.owner}")

    async def stop(self, *, release: bool = True) -> None:
        """Stop the loop and every job task where it stands; the rows stay RUNNING at their
        persisted step. ``release`` lets another runner adopt them without waiting for the lease."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        tasks = list(self.running.values())
        ids = list(self.running)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if release:
            await asyncio.to_thread(self.store.release, self.owner, ids)

    def wake(self) -> None:
        """Look for work now (called after a submit)."""
        self._wake.set()

    async def join(self, timeout: float | None = None) -> None:
        """Wait until no job task is running (tests: submit, run_once, join, assert)."""
        async def _all() -> None:
            while self.running:
                await asyncio.gather(*list(self.running.values()), return_exceptions=True)
        await asyncio.wait_for(_all(), timeout)

    async def run_once(self) -> list[str]:
        """One scheduling pass: adopt resumable RUNNING jobs, claim PENDING ones; returns the ids
        started. The jobs run as tasks: ``join`` waits for them."""
        started: list[str] = []
        ops = list(self.types)
        room = self.max_concurrent - len(self.running)
        if room <= 0 or not ops:
            return started
        for job_id in await asyncio.to_thread(self.store.adoptable_running, self.owner, ops, room):
            if job_id in self.running:
                continue
            if await asyncio.to_thread(self.store.adopt, job_id, self.owner, self.lease_ms):
                log.info("job %s: resumed by %s", job_id, self.owner)
                self._spawn(job_id)
                started.append(job_id)
        room = self.max_concurrent - len(self.running)
        if room > 0:
            for job_id in await asyncio.to_thread(self.store.runnable_pending, ops, room):
                if await asyncio.to_thread(self.store.claim, job_id, self.owner, self.lease_ms):
                    self._spawn(job_id)
                    started.append(job_id)
        return started

    async def _loop(self) -> None:
        renew_every = self.lease_ms / 3000.0
        last_renew = asyncio.get_running_loop().time()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                now = asyncio.get_running_loop().time()
                if now - last_renew >= renew_every:
                    last_renew = now
                    await self._renew()
                await self.run_once()
            except Exception:
                log.exception("job runner pass failed; retrying")

    async def _renew(self) -> None:
        held = set(self.running)
        if not held:
            return
        kept = await asyncio.to_thread(self.store.renew, self.owner, held, self.lease_ms)
        for job_id in held - kept:
            task = self.running.get(job_id)
            if task is not None and not task.done():
                log.warning("job %s: lease lost by %s; stopping it here", job_id, self.owner)
                task.cancel()

    def _spawn(self, job_id: str) -> None:
        task = asyncio.create_task(self._run(job_id), name=f"job-{job_id}")
        self.running[job_id] = task
        task.add_done_callback(lambda _t, j=job_id: self.running.pop(j, None))

    # ---- one job ----

    async def _run(self, job_id: str) -> None:
        try:
            await self._drive(job_id)
        except JobLost:
            log.warning("job %s: no longer held by %s; left to its new owner", job_id, self.owner)
        except asyncio.CancelledError:
            raise  # runner stopping: the row stays RUNNING at its persisted step
        except Exception:
            log.exception("job %s: runner error; the job stays RUNNING for the next pass or owner", job_id)
        finally:
            self.store.forget(job_id)

    async def _drive(self, job_id: str) -> None:
        job = await asyncio.to_thread(self.store.get_job, job_id)
        jt = self.types[job["operation"]]()
        ctx = JobContext(job, store=self.store, owner=self.owner, tasks=self.tasks)
        if job["error"]:  # interrupted between writing the error and ending FAILED
            await self._fail(ctx, jt, job["error"], already_written=True)
            return
        steps = jt.steps
        start = job["step"] or steps[0]
        if start not in steps:
            await self._fail(ctx, jt, job_error(RuntimeError(f"unknown persisted step {start!r}"),
                                                job_id=job_id, step=start))
            return
        for i in range(steps.index(start), len(steps)):
            name = steps[i]
            ctx.step = name
            if await asyncio.to_thread(self.store.is_cancel_requested, job_id):
                await self._fail(ctx, jt, _cancelled())
                return
            try:
                await self._run_step(jt, name, ctx)
            except (JobLost, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001 — every step failure ends here, mapped once
                cancelled = await asyncio.to_thread(self.store.is_cancel_requested, job_id)
                await self._fail(ctx, jt, _cancelled() if cancelled else job_error(exc, job_id=job_id, step=name))
                return
            if i + 1 < len(steps):
                ok = await asyncio.to_thread(self.store.save_step, job_id, self.owner, step=steps[i + 1],
                                             step_state=ctx.state, **ctx.take_staged())
                if not ok:
                    raise JobLost(job_id)
                if self.crash_after_step == name:
                    log.critical("job %s: job.test_crash_after_step=%s: exiting now (test fault injection)",
                                 job_id, name)
                    os._exit(70)
        fields = {**ctx.take_staged(), **(await jt.result(ctx))}
        if not await asyncio.to_thread(self.store.finish, job_id, self.owner, tr.READY,
                                       step_state=ctx.state, **fields):
            raise JobLost(job_id)
        log.info("job %s (%s) READY", job_id, ctx.operation)

    async def _run_step(self, jt: JobType, name: str, ctx: JobContext) -> None:
        """Run one step, watching for a cancel request meanwhile to send TASK_CANCEL (TPL-32)."""
        watcher = asyncio.create_task(self._watch_cancel(ctx))
        try:
            await jt.run_step(name, ctx)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch_cancel(self, ctx: JobContext) -> None:
        while True:
            await asyncio.sleep(self.cancel_poll_s)
            if await asyncio.to_thread(self.store.is_cancel_requested, ctx.job_id):
                await ctx.cancel_inflight()
                return

    async def _fail(self, ctx: JobContext, jt: JobType, error: Mapping[str, str], *,
                    already_written: bool = False) -> None:
        error = tr.normalize_error(error)
        if not already_written:
            # TPL-15: the error is on the row before cleanup starts, so a crash in cleanup resumes it.
            ok = await asyncio.to_thread(self.store.save_step, ctx.job_id, self.owner, step_state=ctx.state,
                                         error=error, **ctx.take_staged())
            if not ok:
                raise JobLost(ctx.job_id)
        try:
            await jt.cleanup(ctx, error)
        except (JobLost, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 — cleanup is best effort; GC covers leftovers
            job_error(exc, job_id=ctx.job_id, step="cleanup")
        if not await asyncio.to_thread(self.store.finish, ctx.job_id, self.owner, tr.FAILED, error=error,
                                       step_state=ctx.state, **ctx.take_staged()):
            raise JobLost(ctx.job_id)
        log.info("job %s (%s) FAILED: %s: %s", ctx.job_id, ctx.operation, error["name"], error["message"])


def _cancelled() -> dict[str, Any]:
    return {"name": JobCancelled.name, "message": "job cancelled"}
