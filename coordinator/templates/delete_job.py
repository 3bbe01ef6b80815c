"""The DELETE job (TPL-26 to TPL-28, GC-1 to GC-5).

    MARK_DELETING     the template turns DELETING: hidden from resolve, alias released
    REMOVE_REPLICAS   REMOVE_REPLICA on every replica node (already gone = success); with
                      ``--force`` unreachable or unknown nodes count as done
    CLEANUP_ARTIFACTS last-owner cleanup of the template's artifacts, this template excluded:
                      referenced → kept (deadline renewed); else REMOVE_ARTIFACT on every node
                      holding a copy, then the row and its placements go
    DROP_ROWS         the template and replica rows go; the job ends READY

A node that cannot be reached leaves the template DELETING and the job FAILED naming the
pending nodes; a new delete resumes (TPL-27).
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar, Mapping

from protocol.errors import NodeUnavailable

from ..jobs import transitions as tr
from ..jobs.base import JobContext, JobType
from .create_job import Services

log = logging.getLogger(__name__)


class DeleteJob(JobType):
    operation = "DELETE"
    steps = ("MARK_DELETING", "REMOVE_REPLICAS", "CLEANUP_ARTIFACTS", "DROP_ROWS")
    services: ClassVar[Services]

    def _force(self, ctx: JobContext) -> bool:
        return bool((ctx.job.get("request") or {}).get("force"))

    async def step_mark_deleting(self, ctx: JobContext) -> None:
        await ctx.set_phase("DELETING")
        tpl = await ctx.db(self.services.rows.template, ctx.job["resource_id"])
        if tpl is None:
            return
        ctx.state["artifacts"] = [a for a in (tpl["artifact_id"], tpl["memstate_artifact_id"]) if a]
        if tpl["status"] != tr.DELETING:
            await ctx.db(self.services.rows.mark_deleting, tpl["id"], tpl["status"])

    async def _on_node(self, ctx: JobContext, node: str, op: str, args: dict[str, Any], pending: list[str]) -> None:
        health = self.services.fleet.health(node)
        if health is None and self._force(ctx):
            return  # TPL-28: an unknown node counts as done; GC-11 cleans it when it returns
        try:
            await ctx.run_task(node, op, args, step=f"{ctx.step}:{op}")
        except NodeUnavailable:
            if not self._force(ctx):
                pending.append(node)

    async def step_remove_replicas(self, ctx: JobContext) -> None:
        tpl_id = ctx.job["resource_id"]
        pending: list[str] = []
        for rep in await ctx.db(self.services.rows.replicas, tpl_id):
            await self._on_node(ctx, rep["node_id"], "REMOVE_REPLICA", {"template_id": tpl_id}, pending)
        if pending:
            raise NodeUnavailable(f"template {tpl_id} stays DELETING: node(s) {', '.join(sorted(pending))} "
                                  "could not remove its replica; delete again once they are back",
                                  {"nodes": sorted(pending)})

    async def step_cleanup_artifacts(self, ctx: JobContext) -> None:
        tpl_id = ctx.job["resource_id"]
        rows, fleet = self.services.rows, self.services.fleet
        pending: list[str] = []
        for art in sorted(ctx.state.get("artifacts", [])):
            nodes = await ctx.db(rows.cleanup_begin, art, tpl_id, await ctx.db(fleet.copies, art))
            if nodes is None:
                log.info("job %s: artifact %s is still referenced: kept", ctx.job_id, art)
                continue
            before = len(pending)
            for node in nodes:
                await self._on_node(ctx, node, "REMOVE_ARTIFACT", {"artifact_id": art}, pending)
            if len(pending) == before:
                await ctx.db(rows.cleanup_finish, art, tpl_id)
        if pending:
            # GC-5: a partial failure leaves CLEANUP_PENDING for GC; the template can still go.
            log.warning("job %s: artifact copies left on %s for GC", ctx.job_id, ", ".join(sorted(set(pending))))

    async def step_drop_rows(self, ctx: JobContext) -> None:
        await ctx.db(self.services.rows.drop_template, ctx.job["resource_id"])

    async def cleanup(self, ctx: JobContext, error: Mapping[str, str]) -> None:
        """The template stays DELETING; a new delete resumes (TPL-27)."""

