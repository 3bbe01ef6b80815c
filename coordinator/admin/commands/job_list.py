"""``job list [--template T] [--status S] [--operation OP] [--limit N]`` — newest first (TPL-33, CLI-5).

Wire: ADMIN {command: "job list", args: {...}} → RESULT {jobs: [TPL-33 view]}; limit 20 by default, 100 at most.
"""
from __future__ import annotations

import asyncio

from protocol.schema import Int, Str

from ..render import table
from ..command import Arg, Command
from ._jobs import resolve_template, store

STATUSES = ("PENDING", "RUNNING", "READY", "FAILED")
OPERATIONS = ("CREATE", "REDO", "COMMIT", "DELETE", "SNAPSHOT_CREATE", "SNAPSHOT_ROLLBACK", "SNAPSHOT_DELETE")


def _limit(x, p):  # type: ignore[no-untyped-def]
    if isinstance(x, str) and x.isdigit():
        x = int(x)
    return Int(1, 100)(x, p)


class JobList(Command):
    name = "job list"
    summary = "list jobs, newest first"
    args = (
        Arg("template", "only this template's jobs (id or alias)", Str(64), metavar="TPL"),
        Arg("status", "only jobs in this status", Str(16), choices=STATUSES, metavar="STATUS"),
        Arg("operation", "only this operation", Str(24), choices=OPERATIONS, metavar="OP"),
        Arg("limit", "at most this many (default 20, max 100)", _limit, default=20, metavar="N"),
    )

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        from ...jobs.store import job_info
        resource = (await resolve_template(ctx, args["template"]))["id"] if args.get("template") else None
        rows = await asyncio.to_thread(store(ctx).list_jobs, status=args.get("status"), resource_id=resource,
                                       operation=args.get("operation"), limit=args["limit"])
        return {"jobs": [job_info(r) for r in rows]}

    def render(self, result, console):  # type: ignore[no-untyped-def]
        t = table("JOB", "OP", "RESOURCE", "STATUS", "PHASE", "%", "ERROR")
        for j in result["jobs"]:
            err = j.get("error") or {}
            t.add_row(j["job_id"], j["operation"], j["resource_id"], j["status"], j["phase"], str(j["progress"]),
                      err.get("name", ""))
        console.print(t)
