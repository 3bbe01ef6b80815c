"""``template show TPL`` — one template with its spec, runtime config and replicas (TPL-29).

Wire: ADMIN {command: "template show", args: {template}} → RESULT {template: {..., spec,
runtime_config, replicas: [{node_id, status, phase, pins, compat, has_memory_snapshot,
last_error, last_error_phase}], latest_job}}; TemplateNotFound if unknown.
"""
from __future__ import annotations

import asyncio

from ..command import Command
from ._jobs import TEMPLATE, resolve_template, store


class TemplateShow(Command):
    name = "template show"
    summary = "show a template: spec, generated runtime config, replicas by node"
    args = (TEMPLATE,)

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        from ...jobs.store import job_info
        tpl = await resolve_template(ctx, args["template"])
        jobs = store(ctx)
        reps = await asyncio.to_thread(ctx.templates.rows.replicas, tpl["id"])
        latest = await asyncio.to_thread(jobs.latest_job, tpl["id"])
        origin = None
        if tpl["source_kind"] == "commit":  # TPL-23: what it was committed from (its first job's request)
            first = await asyncio.to_thread(jobs.list_jobs, resource_id=tpl["id"], operation="COMMIT", limit=1)
            origin = (first[0]["request"] or {}).get("source") if first else None
        return {"template": {
            "template_id": tpl["id"], "alias": tpl["alias"], "requested_alias": tpl["requested_alias"],
            "status": tpl["status"], "source": tpl["source_kind"], "image": tpl["image_ref"],
            "manifest_digest": tpl["manifest_digest"], "artifact_id": tpl["artifact_id"], "spec": tpl["spec"],
            "runtime_config": tpl["runtime_config"], "last_error": tpl["last_error"],
            "replicas": [{k: r[k] for k in ("node_id", "status", "phase", "pins", "compat", "has_memory_snapshot",
                                           "last_error", "last_error_phase", "artifact_id")} for r in reps],
            "latest_job": job_info(latest) if latest else None,
            "committed_from": origin, "created_ms": tpl["created_ms"], "updated_ms": tpl["updated_ms"]}}

    def render(self, result, console):  # type: ignore[no-untyped-def]
        from rich.table import Table
        t = result["template"]
        console.print(f"template {t['template_id']}  alias {t['alias'] or '-'}  {t['status']}")
        if t.get("source") == "commit":
            src = t.get("committed_from") or {}
            console.print(f"  committed from {src.get('kind', '?')} {src.get('id', '?')}  "
                          f"artifact {t['artifact_id'] or '-'}", highlight=False)
        else:
            console.print(f"  image {t['image']}@{t['manifest_digest'] or '?'}  artifact {t['artifact_id'] or '-'}")
        if t["last_error"]:
            console.print(f"  last error: {t['last_error']}")
        rc = t["runtime_config"] or {}
        if rc:
            console.print(f"  runtime: entrypoint {rc.get('entrypoint')} cmd {rc.get('cmd')} user {rc.get('user')} "
                          f"workdir {rc.get('workdir')} ports {rc.get('ports')}")
        table = Table(box=None, pad_edge=False)
        for col in ("NODE", "STATUS", "PHASE", "COMPAT", "PINS", "LAST ERROR"):
            table.add_column(col)
        for r in t["replicas"]:
            pins = ",".join(f"{k}={v}" for k, v in sorted((r["pins"] or {}).items()) if v)
            table.add_row(r["node_id"], r["status"], r["phase"], r["compat"], pins[:60], r["last_error"][:60])
        console.print(table)
