"""``compat rescan [NODE…]`` — scan the named nodes, or every READY node, now (COMPAT-8, COMPAT-4).

Wire: ADMIN {command: "compat rescan", args: {nodes?: [node id]}} → RESULT {nodes: [{node_id,
scanned, changes: [{template_id, node_id, old, new}], error}]} by node id. An unknown node →
NodeNotFound (every unknown one listed, sorted), before anything is scanned. A scan that fails or
outlives ``compat.scan_timeout`` reports its error in its node's entry.
"""
from __future__ import annotations

import asyncio
from typing import Any

from protocol import ids
from protocol.errors import NodeNotFound
from protocol.schema import List, Str

from ..command import Arg, Command

NODES = Arg("nodes", "nodes to scan (default: every READY node)", List(Str(63, ids.NODE_ID, 1, "node id"), 10_000),
            positional=True, many=True, default=None, metavar="NODE")


class CompatRescan(Command):
    name = "compat rescan"
    summary = "re-evaluate replica compat on the named (or all READY) nodes now"
    args = (NODES,)

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        from ._compat import ready_versions, scanner
        scan = scanner(ctx)
        names = sorted(set(args.get("nodes") or []))
        if names:
            unknown = [n for n in names if n not in ctx.nodes.nodes]
            if unknown:
                raise NodeNotFound(f"node(s) {', '.join(unknown)} not known", {"nodes": unknown})
        else:
            names = sorted(ready_versions(ctx))
        results = await asyncio.gather(*(scan.scan(n) for n in names))
        return {"nodes": [r.to_dict() for r in results]}

    def render(self, result: dict[str, Any], console) -> None:  # type: ignore[no-untyped-def]
        if not result["nodes"]:
            console.print("no READY node to scan")
        for n in result["nodes"]:
            head = f"{n['node_id']}: {n['scanned']} replica(s) scanned, {len(n['changes'])} changed"
            if n["error"]:
                head += f"; error {n['error']['name']}: {n['error']['message']}"
            console.print(head, highlight=False)
            for c in n["changes"]:
                console.print(f"  {c['template_id']}: {c['old']} → {c['new']}", highlight=False)
