"""``job watch JOB [--wait-timeout D]`` — follow a job to its end with progress (CLI-3, CLI-4).

Wire: ADMIN {command: "job watch", args: {job, wait_timeout?}} → PROGRESS while it runs →
RESULT {job, timed_out, follow_up?}; tcctl exits 3 when the wait ran out.
"""
from __future__ import annotations

from ..command import Command
from ._jobs import JOB, WAIT_TIMEOUT, get_job, maybe_wait, render_job


class JobWatch(Command):
    name = "job watch"
    summary = "follow a job to READY or FAILED, showing its progress"
    args = (JOB, WAIT_TIMEOUT)

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        await get_job(ctx, args["job"])  # JobNotFound before any waiting
        return await maybe_wait(ctx, {**args, "wait": True}, args["job"], {})

    def render(self, result, console):  # type: ignore[no-untyped-def]
        render_job(result["job"], console)
