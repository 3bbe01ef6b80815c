"""The REDO job (TPL-19 to TPL-22): make a template's replicas whole again.

    PLAN            the targets were fixed at submission (TPL-20, ``jobs.scope``); if the artifact
                    is READY with a verified copy on a READY node, only redistribute
                    (DISTRIBUTING 60), else rebuild from RESOLVE_IMAGE
    RESOLVE_IMAGE … REGISTER   as CREATE, skipped when redistributing only
    DISTRIBUTE      per target: remove the template's replica data (leftovers tolerated), verify
                    the node's copy by full sha256 (VERIFY_ARTIFACT), fetch it again if it is
                    missing or wrong (a partial file from an earlier try is resumed), re-pin
    PUBLISH         aggregate over all the template's replicas; the current alias is kept and a
                    lost or cleared one is never re-claimed
"""
from __future__ import annotations

from typing import Any

from protocol.errors import ArtifactChecksumMismatch, ArtifactNotFound, NodeUnavailable, TCError

from ..health import Health
from ..jobs import transitions as tr
from ..jobs.base import JobContext
from .create_job import CreateJob


class RedoJob(CreateJob):
    operation = "REDO"
    steps = ("PLAN", "RESOLVE_IMAGE", "CLAIM_ARTIFACT", "BUILD", "REGISTER", "DISTRIBUTE", "PUBLISH")
    claims_alias = False

    async def step_plan(self, ctx: JobContext) -> None:
        tpl = self._template(ctx)
        await self._settle(ctx)
        ctx.state["targets"] = list(ctx.job.get("scope") or [])
        art = await ctx.db(self.services.rows.artifact, tpl["artifact_id"]) if tpl["artifact_id"] else None
        ready_holders = []
        if art is not None and art["status"] == tr.READY:
            ready_holders = [n for n in await super()._holders(ctx, art, ctx.state["targets"])
                             if self.services.fleet.health(n) is Health.READY]
        if not ready_holders and tpl["source_kind"] == "commit":  # TPL-21: nothing to rebuild from
            raise ArtifactNotFound(f"template has no source image and no copy of {tpl['artifact_id']} survives",
                                   {"template_id": tpl["id"], "artifact_id": tpl["artifact_id"]})
        ctx.state["redistribute_only"] = bool(ready_holders)
        if ready_holders:
            ctx.state["claim"] = {"outcome": "adopt", "generation": art["generation"]}
            ctx.stage(artifact_id=art["id"], fingerprint=art["fingerprint"])
            await ctx.set_phase("DISTRIBUTING")
        else:
            ctx.stage(resume_phase="BUILDING_EXT4")
            await ctx.set_phase("PULLING")

    async def step_resolve_image(self, ctx: JobContext) -> None:
        if ctx.state.get("redistribute_only"):
            return
        targets = ctx.state["targets"]
        await super().step_resolve_image(ctx)
        ctx.state["targets"] = targets  # REDO's own targets, not the spec's

    async def step_claim_artifact(self, ctx: JobContext) -> None:
        if not ctx.state.get("redistribute_only"):
            await super().step_claim_artifact(ctx)

    async def _holders(self, ctx: JobContext, art: dict[str, Any], wanted: list[str]) -> set[str]:
        """TPL-22: each target's old replica data goes, and its copy counts only after a full
        sha256 check on the node; a bad copy is removed so the fetch starts clean."""
        holders = await super()._holders(ctx, art, wanted)
        tpl_id = ctx.job["resource_id"]
        for node in wanted:
            try:
                await ctx.run_task(node, "REMOVE_REPLICA", {"template_id": tpl_id}, step="DISTRIBUTE:REMOVE")
            except NodeUnavailable:
                holders.discard(node)
                continue
            except TCError:
                pass  # leftovers are tolerated (TPL-22)
            if node not in holders:
                continue
            try:
                await ctx.run_task(node, "VERIFY_ARTIFACT", {"artifact_id": art["id"]}, step="DISTRIBUTE:VERIFY")
            except (ArtifactChecksumMismatch, ArtifactNotFound):
                holders.discard(node)
                await ctx.run_task(node, "REMOVE_ARTIFACT", {"artifact_id": art["id"]}, step="DISTRIBUTE:DROP")
        return holders
