"""``node list [--health H] [--admin A]`` — every node with derived health (NODE-2, CLI-5).

Wire: ADMIN {command: "node list", args: {health?, admin?}} → RESULT {nodes: [summary…]},
sorted by node id.
"""
from __future__ import annotations

from typing import Any

from protocol.schema import Enum

from ..command import Arg, Command
from ..render import ago, table

HEALTH = ("WARMING", "READY", "SUSPECT", "LOST")
ADMIN = ("ACTIVE", "CORDONED", "DRAINING")


class NodeList(Command):
    name = "node list"
    summary = "list nodes with their health, admin state and storage"
    args = (
        Arg("health", "only nodes in this health", Enum(HEALTH), choices=HEALTH),
        Arg("admin", "only nodes in this admin state", Enum(ADMIN), choices=ADMIN),
    )

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        from ..views import node_summary
        judge = ctx.nodes.judge()
        now = judge.now
        out = []
        for node_id in sorted(ctx.nodes.nodes):
            s = node_summary(ctx, ctx.nodes.nodes[node_id], now, judge)
            if args["health"] and s["health"] != args["health"]:
                continue
            if args["admin"] and s["admin_state"] != args["admin"]:
                continue
            out.append(s)
        return {"nodes": out, "heartbeats": ctx.nodes.heartbeats,
                "bad_messages": ctx.peers.totals()}

    def render(self, result: dict[str, Any], console) -> None:  # type: ignore[no-untyped-def]
        t = table("NODE", "ADDRESS", "HEALTH", "ADMIN", "STORAGE", "SANDBOXES", "LAST SEEN", "AGENT")
        for n in result["nodes"]:
            st = n["storage"]
            storage = f"{st['usage']}% {st['mode']}" if st["total"] else st["mode"]
            t.add_row(n["node_id"], n["address"], n["health"], n["admin_state"], storage,
                      str(n["sandboxes"]), ago(n["silent_ms"]) + " ago" if n["silent_ms"] is not None else "never",
                      n["agent_version"] or "-")
        if not result["nodes"]:
            console.print("no nodes")
            return
        console.print(t)
