"""``compat adopt-baseline TPL`` — re-pin a template's UNKNOWN replicas to their nodes' current
versions (COMPAT-8).

Wire: ADMIN {command: "compat adopt-baseline", args: {template, request_id}} → RESULT
{template_id, adopted, nodes}. Only READY replicas whose compat is UNKNOWN, on READY nodes that
report every version the template's policy compares, are re-pinned and set OK; ``adopted`` counts
them. Running it again adopts nothing new (it is idempotent by nature; the request id is only
recorded in the log). TemplateNotFound for an unknown or DELETING template.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from protocol.errors import TemplateNotFound

from ..command import Command
from ._jobs import TEMPLATE

log = logging.getLogger(__name__)


class CompatAdoptBaseline(Command):
    name = "compat adopt-baseline"
    summary = "re-pin a template's UNKNOWN replicas to the versions their READY nodes report now"
    args = (TEMPLATE,)
    mutating = True

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        from ...compat import store
        from ._compat import ready_versions
        from ._jobs import resolve_template
        tpl = await resolve_template(ctx, args["template"])
        if tpl["status"] == "DELETING":
            raise TemplateNotFound(f"template {tpl['id']} is being deleted", {"template": tpl["id"]})
        changes = await asyncio.to_thread(store.adopt_baseline, ctx.engine, tpl["id"], ready_versions(ctx),
                                          int(time.time() * 1000))
        nodes = [c.node_id for c in changes]
        log.info("compat adopt-baseline %s (request %s): %d replica(s) re-pinned %s", tpl["id"],
                 args.get("request_id"), len(nodes), nodes)
        for c in changes:
            ctx.events.publish(f"template.{c.template_id}", "compat", c.to_dict())
        return {"template_id": tpl["id"], "adopted": len(nodes), "nodes": nodes}

    def render(self, result: dict[str, Any], console) -> None:  # type: ignore[no-untyped-def]
        nodes = ", ".join(result["nodes"]) or "none"
        console.print(f"template {result['template_id']}: {result['adopted']} replica(s) re-pinned ({nodes})",
                      highlight=False)
