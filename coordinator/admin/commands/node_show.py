"""``node show NODE`` — facts, versions, labels, catalog, session, bad-message counters (CLI-5).

Wire: ADMIN {command: "node show", args: {node}} → RESULT {node: detail}; unknown → NodeNotFound.
"""
from __future__ import annotations

from typing import Any

from ..command import Command
from ..render import human_size, rfc3339
from ._args import NODE


class NodeShow(Command):
    name = "node show"
    summary = "show one node in detail"
    args = (NODE,)

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        import asyncio

        from ._artifacts import list_orphans, node_replicas
        from ..views import node_detail
        detail = node_detail(ctx, ctx.nodes.get(args["node"]), ctx.nodes.clock())
        # Replicas from the database, orphans from the node's mirrored catalog (CAT-6).
        detail["replicas"] = await asyncio.to_thread(node_replicas, ctx.engine, args["node"])
        detail["orphans"] = await asyncio.to_thread(list_orphans, ctx.engine, args["node"])
        return {"node": detail}

    def render(self, result: dict[str, Any], console) -> None:  # type: ignore[no-untyped-def]
        n = result["node"]
        st = n["storage"]
        lines = [
            f"node:        {n['node_id']}",
            f"address:     {n['address']}  blob {n['blob_endpoint']}",
            f"health:      {n['health']}   admin: {n['admin_state']}   placeable: {n['placeable']}",
            f"last seen:   {rfc3339(n['last_seen'])}",
            f"storage:     {human_size(st['used'])} used of {human_size(st['total'])} "
            f"({st['usage']}%, {st['mode']}), {human_size(st['free'])} free",
            f"memory free: {human_size(n['mem_free'])}   sandboxes: {n['sandboxes']}",
            f"session:     {n['session']['id'] or '-'} since {rfc3339(n['session']['started'])}, "
            f"beat {n['session']['heartbeat_seq']}, interval {n['session']['interval_ms']}ms",
            f"catalog:     epoch {n['catalog']['epoch'][:12] or '-'} seq {n['catalog']['seq']} "
            f"{'complete' if n['catalog']['complete'] else 'incomplete'} "
            f"(node reports seq {n['catalog']['reported_seq']})",
            f"bad messages: {n['bad_messages']['refused']} refused, {n['bad_messages']['dropped']} dropped",
            "capabilities: " + ", ".join(f"{k}={v}" for k, v in n["capabilities"].items()),
            "labels:      " + (", ".join(f"{k}={v}" for k, v in n["labels"].items()) or "-"),
            "versions:",
            *[f"  {k}: {v or 'unknown'}" for k, v in n["versions"].items()],
            "facts:",
            *[f"  {k}: {v}" for k, v in n["facts"].items()],
            f"replicas:    {len(n['replicas'])}",
            *[f"  {r['template_id']}: {r['status']} {r['phase']} compat {r['compat']}"
              + (f" — {r['last_error']}" if r["last_error"] else "") for r in n["replicas"]],
            f"orphans:     {len(n['orphans'])} (quarantined, kept until purged)",
            *[f"  {o['path']} ({o['size']} bytes, was {o['original']})" for o in n["orphans"]],
        ]
        console.print("\n".join(lines), highlight=False, markup=False)
