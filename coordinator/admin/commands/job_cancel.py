"""``job cancel JOB`` — ask an active job to stop (TPL-32).

Wire: ADMIN {command: "job cancel", args: {job, request_id?}} → RESULT {job}. The runner sends
TASK_CANCEL, stops at the next step boundary, cleans up and ends the job FAILED (JobCancelled).
A terminal job is returned unchanged; snapshot jobs: InvalidRequest.
"""
from __future__ import annotations

import asyncio

from ..command import Command
from ._jobs import JOB, get_job, render_job, store


class JobCancel(Command):
    name = "job cancel"
    summary = "cancel an active template job (it ends FAILED with JobCancelled)"
    args = (JOB,)
    mutating = True

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        from ...jobs.store import job_info
        await get_job(ctx, args["job"])
        row = await asyncio.to_thread(store(ctx).request_cancel, args["job"])
        return {"job": job_info(row)}

    def render(self, result, console):  # type: ignore[no-untyped-def]
        render_job(result["job"], console)
