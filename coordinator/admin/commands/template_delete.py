"""``template delete TPL [--force] [--wait]`` — a DELETE job (TPL-26 to TPL-28).

Wire: ADMIN {command: "template delete", args: {template, force?, wait?, wait_timeout?, request_id}}
→ RESULT {template_id, job, created} (with ``wait``: the finished job).

Refused with TemplateAttemptInProgress "deletion is blocked while a build job is still active"
while a CREATE/REDO/COMMIT job runs (``--force`` cancels it first), and with
TemplateCleanupLocatorMissing when a replica or placement sits on an unknown node (``--force``
counts such nodes as done; their leftovers go when they return).
TemplateInUse while sandboxes made from the template exist (FAILED ones aside), even with ``--force``.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from protocol.errors import TemplateAttemptInProgress, TemplateCleanupLocatorMissing
from protocol.schema import Bool

from ..command import Arg, Command
from ._jobs import maybe_wait, TEMPLATE, WAIT, WAIT_TIMEOUT, render_job, resolve_template, store

BUILD_OPS = ("CREATE", "REDO", "COMMIT")


class TemplateDelete(Command):
    name = "template delete"
    summary = "delete a template: its replicas, then artifacts no other template uses"
    args = (TEMPLATE, Arg("force", "cancel an active build job first; count unknown or unreachable nodes as done",
                          Bool(), flag=True, default=False), WAIT, WAIT_TIMEOUT)
    mutating = True

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        from ...jobs.store import job_info
        jobs = store(ctx)
        tpl = await resolve_template(ctx, args["template"])
        # TPL-26, TPL-28: sandboxes made from it block the delete, --force or not, before any change.
        from ...sandboxes import check_not_in_use
        await asyncio.to_thread(check_not_in_use, ctx.engine, tpl["id"])
        force = bool(args.get("force"))
        active = await asyncio.to_thread(jobs.active_job, tpl["id"])
        if active is not None and active["operation"] in BUILD_OPS:
            if not force:
                raise TemplateAttemptInProgress("deletion is blocked while a build job is still active",
                                                {"template_id": tpl["id"], "job_id": active["id"]})
            await asyncio.to_thread(jobs.request_cancel, active["id"])
            await self._until_ended(ctx, active["id"])
        if not force:
            unknown = await asyncio.to_thread(self._unknown_nodes, ctx, tpl)
            if unknown:
                raise TemplateCleanupLocatorMissing(
                    f"template {tpl['id']} has replicas or copies on unknown node(s) {', '.join(unknown)}; "
                    "use --force to count them as done", {"nodes": unknown})

        def busy(job: dict[str, Any]) -> Exception:
            return TemplateAttemptInProgress(f"template {tpl['id']} is currently {job['status']} "
                                             f"(job_id={job['id']})", {"job_id": job["id"]})
        submitted = await asyncio.to_thread(
            jobs.submit_job, request_id=args["request_id"], operation="DELETE", resource_type="template",
            resource_id=tpl["id"], request={"template": tpl["id"], "force": force}, phase="DELETING",
            on_active=busy)
        if submitted.created:
            ctx.wake_jobs()
        result: dict[str, Any] = {"template_id": tpl["id"], "created": submitted.created,
                                  "job": job_info(submitted.job)}
        return await maybe_wait(ctx, args, submitted.job["id"], result)

    @staticmethod
    def _unknown_nodes(ctx: Any, tpl: dict[str, Any]) -> list[str]:
        reps = ctx.templates.rows.replicas(tpl["id"])
        nodes = {r["node_id"] for r in reps}
        if tpl["artifact_id"]:
            nodes |= set(ctx.templates.rows.placements(tpl["artifact_id"]))
        return sorted(n for n in nodes if n not in ctx.nodes.nodes)

    @staticmethod
    async def _until_ended(ctx: Any, job_id: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = await asyncio.to_thread(store(ctx).get_job, job_id)
            if job["status"] in ("READY", "FAILED"):
                return
            await asyncio.sleep(0.25)

    def render(self, result, console):  # type: ignore[no-untyped-def]
        console.print(f"template {result['template_id']}")
        render_job(result["job"], console)
