"""``template redo TPL [--nodes N,…] [--failed-only] [--wait]`` — a REDO job (TPL-19 to TPL-22).

Wire: ADMIN {command: "template redo", args: {template, nodes?, failed_only?, wait?, wait_timeout?,
request_id}} → RESULT {template_id, job, created}.

Modes (TPL-19/20): ALL (every placeable node), NODES (the named ones, all placeable, else
NodeNotEligible listing the offenders), FAILED_ONLY / FAILED_NODES (placeable nodes in scope
whose replica is not READY, needs cleanup, or is STALE; none: NoFailedTemplateReplicas).
"""
from __future__ import annotations

import asyncio
from typing import Any

from protocol.errors import NoFailedTemplateReplicas, TemplateNotFound
from protocol.schema import Bool

from ..command import Arg, Command
from ._jobs import maybe_wait, TEMPLATE, WAIT, WAIT_TIMEOUT, render_job, resolve_template, store
from .template_create import _list


def plan(candidates: list[Any], replicas: list[dict[str, Any]], nodes: list[str], failed_only: bool) -> tuple[str, list[str]]:
    """(mode, targets) per TPL-20."""
    from ...templates.placement import targets
    if not failed_only:
        return ("NODES" if nodes else "ALL"), [c.node_id for c in targets(candidates, nodes)]
    mode = "FAILED_NODES" if nodes else "FAILED_ONLY"
    scope = set(nodes) if nodes else {r["node_id"] for r in replicas}
    placeable = {c.node_id for c in candidates if c.placeable}
    needs = {r["node_id"] for r in replicas
             if r["status"] != "READY" or r["cleanup_required"] or r["compat"] == "STALE"}
    chosen = sorted(scope & placeable & needs)
    if not chosen:
        raise NoFailedTemplateReplicas("no replica in scope needs a redo", {"mode": mode})
    return mode, chosen


class TemplateRedo(Command):
    name = "template redo"
    summary = "make a template's replicas whole again (all, --nodes, or --failed-only)"
    args = (TEMPLATE,
            Arg("nodes", "only these nodes, comma-separated", _list, metavar="N,..."),
            Arg("failed_only", "only replicas that are not READY (or STALE)", Bool(), flag=True, default=False),
            WAIT, WAIT_TIMEOUT)
    mutating = True

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        from ...jobs.store import job_info
        jobs = store(ctx)
        tpl = await resolve_template(ctx, args["template"])
        if tpl["status"] == "DELETING":
            raise TemplateNotFound(f"template {tpl['id']} is being deleted", {"template": tpl["id"]})
        candidates = await asyncio.to_thread(ctx.templates.fleet.candidates)
        replicas = await asyncio.to_thread(ctx.templates.rows.replicas, tpl["id"])
        nodes = [str(n) for n in (args.get("nodes") or [])]
        mode, chosen = plan(candidates, replicas, nodes, bool(args.get("failed_only")))
        submitted = await asyncio.to_thread(
            jobs.submit_job, request_id=args["request_id"], operation="REDO", resource_type="template",
            resource_id=tpl["id"], request={"template": tpl["id"], "nodes": sorted(nodes),
                                            "failed_only": bool(args.get("failed_only"))},
            phase="PULLING", redo_mode=mode, scope=chosen)
        if submitted.created:
            ctx.wake_jobs()
        result: dict[str, Any] = {"template_id": tpl["id"], "created": submitted.created,
                                  "job": job_info(submitted.job)}
        return await maybe_wait(ctx, args, submitted.job["id"], result)

    def render(self, result, console):  # type: ignore[no-untyped-def]
        console.print(f"template {result['template_id']}")
        render_job(result["job"], console)
