"""``template list`` — newest-updated first, PENDING and DELETING included (TPL-29).

Wire: ADMIN {command: "template list", args: {}} → RESULT {templates: [{template_id, alias, status,
source, image, manifest_digest, replicas: {ready, total}, latest_job}]}.
"""
from __future__ import annotations

import asyncio
from typing import Any

from ..render import table
from ..command import Command
from ._jobs import store


def _templates(jobs: Any) -> list[dict[str, Any]]:
    from sqlalchemy import func, select

    from ...db.models import Job, Replica, Template
    t, r, j = Template.__table__, Replica.__table__, Job.__table__
    with jobs.engine.connect() as c:
        rows = [dict(x) for x in c.execute(select(t).order_by(t.c.updated_ms.desc(), t.c.id)).mappings()]
        counts: dict[str, dict[str, int]] = {}
        for tid, status, n in c.execute(select(r.c.template_id, r.c.status, func.count()).group_by(
                r.c.template_id, r.c.status)):
            counts.setdefault(tid, {})[status] = n
        latest: dict[str, str] = {}
        for tid, jid in c.execute(select(j.c.resource_id, j.c.id).where(j.c.resource_type == "template")
                                  .order_by(j.c.created_ms)):
            latest[tid] = jid
    return [{"template_id": x["id"], "alias": x["alias"], "status": x["status"], "source": x["source_kind"],
             "image": x["image_ref"], "manifest_digest": x["manifest_digest"],
             "replicas": {"ready": counts.get(x["id"], {}).get("READY", 0),
                          "total": sum(counts.get(x["id"], {}).values())},
             "latest_job": latest.get(x["id"]), "updated_ms": x["updated_ms"]} for x in rows]


class TemplateList(Command):
    name = "template list"
    summary = "list templates, newest-updated first"

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        return {"templates": await asyncio.to_thread(_templates, store(ctx))}

    def render(self, result, console):  # type: ignore[no-untyped-def]
        t = table("TEMPLATE", "ALIAS", "STATUS", "SOURCE", "READY", "LATEST JOB")
        for x in result["templates"]:
            ref = x["image"] + (f"@{x['manifest_digest'][:19]}" if x["manifest_digest"] else "")
            t.add_row(x["template_id"], x["alias"] or "", x["status"], ref,
                      f"{x['replicas']['ready']}/{x['replicas']['total']}", x["latest_job"] or "")
        console.print(t)
