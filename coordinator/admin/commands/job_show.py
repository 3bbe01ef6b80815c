"""``job show JOB`` — one job (TPL-33).

Wire: ADMIN {command: "job show", args: {job}} → RESULT {job: TPL-33 view}; JobNotFound if unknown.
"""
from __future__ import annotations

from ..command import Command
from ._jobs import JOB, get_job, render_job


class JobShow(Command):
    name = "job show"
    summary = "show a job: status, phase, progress, nodes, error"
    args = (JOB,)

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        from ...jobs.store import job_info
        return {"job": job_info(await get_job(ctx, args["job"]))}

    def render(self, result, console):  # type: ignore[no-untyped-def]
        render_job(result["job"], console)
