"""``compat matrix [--template T]`` — templates × READY nodes with bound and current versions (COMPAT-6).

Wire: ADMIN {command: "compat matrix", args: {template?}} → RESULT {summary: {stale_templates,
stale_replicas, affected_nodes, missing_replicas, unknown_replicas}, nodes: [node id],
templates: [{template_id, alias, policy, overall, nodes: [{node_id, address, compat, bound,
current}]}]}. Cells are re-evaluated now from the replicas' pins and the nodes' trusted versions
(NODE-11); MISSING marks a READY node without a READY replica. TemplateNotFound for an unknown or
DELETING template.
"""
from __future__ import annotations

import asyncio
from typing import Any

from protocol.schema import Str

from ..command import Arg, Command


class CompatMatrix(Command):
    name = "compat matrix"
    summary = "templates × READY nodes: compat status with bound and current versions"
    args = (Arg("template", "only this template (id or alias)", Str(64, None, 1, "template"), metavar="TPL"),)

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        from ...compat import matrix, store
        from ._compat import ready_versions
        from ._jobs import resolve_template
        tpl_id = None
        if args.get("template"):
            tpl = await resolve_template(ctx, args["template"])
            if tpl["status"] == "DELETING":
                from protocol.errors import TemplateNotFound
                raise TemplateNotFound(f"template {tpl['id']} is being deleted", {"template": tpl["id"]})
            tpl_id = tpl["id"]
        nodes = [matrix.NodeView(nid, ctx.nodes.nodes[nid].address, v) for nid, v in ready_versions(ctx).items()]
        templates = await asyncio.to_thread(store.templates, ctx.engine, tpl_id)
        return matrix.build(templates, nodes)

    def render(self, result: dict[str, Any], console) -> None:  # type: ignore[no-untyped-def]
        from rich.table import Table
        table = Table(box=None, pad_edge=False)
        for col in ("TEMPLATE", "ALIAS", "POLICY", "OVERALL", "NODE", "COMPAT", "BOUND → CURRENT"):
            table.add_column(col)
        for row in result["templates"]:
            first = True
            for c in row["nodes"] or [{"node_id": "-", "compat": "-", "bound": {}, "current": {}}]:
                diff = ", ".join(f"{k} {c['bound'].get(k) or '?'} → {v or '?'}" for k, v in sorted(c["current"].items())
                                 if c["bound"] and c["bound"].get(k) != v)
                table.add_row(row["template_id"] if first else "", (row["alias"] or "-") if first else "",
                              row["policy"] if first else "", row["overall"] if first else "",
                              c["node_id"], c["compat"], diff or ("-" if c["compat"] != "MISSING" else "no replica"))
                first = False
        console.print(table)
        s = result["summary"]
        console.print(f"{s['stale_templates']} stale template(s), {s['stale_replicas']} stale replica(s) on "
                      f"{s['affected_nodes']} node(s); {s['unknown_replicas']} unknown, "
                      f"{s['missing_replicas']} missing", highlight=False)
