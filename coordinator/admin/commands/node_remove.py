"""``node remove NODE`` — forget a LOST node for good (NODE-14).

Wire: ADMIN {command: "node remove", args: {node, request_id?}} → RESULT {removed: node_id};
a node that is not LOST → NodeNotEligible with details.nodes = [{node, reason}]; unknown →
NodeNotFound. Deletes the node row, its versions, catalog mirror and key rows in one
transaction, drops it from the registry and publishes ``node.<id>`` ``removed``. An agent
that comes back with that id is a new node (with CURVE its key needs a new accept, SEC-4).

Its ACTIVE runtime refs are released ("node removed") in the same transaction, and the
tombstone finaliser then runs for their snapshots (SNAP-14). Replica rows (re-aggregating
their templates) and placements are released here once that is built (DIST issues).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..command import Command
from ._args import NODE

log = logging.getLogger(__name__)


class NodeRemove(Command):
    name = "node remove"
    summary = "remove a LOST node, its catalog mirror and its key (it must be accepted again)"
    args = (NODE,)
    mutating = True

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        from protocol.errors import NodeNotEligible, NodeNotFound

        from ...db.node_removal import remove_node
        from ...health import Health
        node_id = args["node"]
        n = ctx.nodes.get(node_id)
        async with n.lock:
            # Judged under the node's lock: a HELLO racing with us waits for the lock, so
            # the node cannot turn READY between this check and the delete.
            health = ctx.nodes.health(n)
            if health is not Health.LOST:
                raise NodeNotEligible(f"node {node_id} is {health}; only LOST nodes can be removed",
                                      {"nodes": [{"node": node_id, "reason": f"health {health}"}]})
            released = await asyncio.to_thread(remove_node, ctx.engine, node_id)
            if released is None:
                raise NodeNotFound(f"node {node_id} is not known", {"node": node_id})
            if ctx.nodes.nodes.get(node_id) is n:
                del ctx.nodes.nodes[node_id]
            keys = getattr(ctx, "keys", None)  # None when security.curve is off
            if keys is not None:
                keys.forget_node(node_id)  # the rows went in remove_node; drop the cached records too
        ctx.events.publish(f"node.{node_id}", "removed", {"node": node_id, "address": n.address})
        if released and ctx.snapshots is not None:
            # SNAP-14: tombstones whose last ACTIVE ref was on this node can go now. After the
            # registry dropped the node, so their delete jobs skip it (nothing left to ask there).
            try:
                await ctx.snapshots.on_refs_released(released)
            except Exception:  # the node is gone either way; the next reconcile pass retries
                log.exception("node %s removed, but the tombstone finaliser for %s failed", node_id, released)
        return {"removed": node_id}

    def render(self, result: dict[str, Any], console) -> None:  # type: ignore[no-untyped-def]
        console.print(f"node {result['removed']} removed; if it returns it joins as a new node",
                      highlight=False, markup=False)
