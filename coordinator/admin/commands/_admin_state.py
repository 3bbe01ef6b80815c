"""The admin-state change shared by cordon, uncordon and drain (NODE-4, NODE-6)."""
from __future__ import annotations

from typing import Any


async def set_state(ctx: Any, node_id: str, state: str) -> dict[str, Any]:
    from ...health import AdminState
    from ..views import node_summary
    n = await ctx.nodes.set_admin_state(node_id, AdminState(state))
    return {"node": node_summary(ctx, n, ctx.nodes.clock())}


def remaining(n: Any) -> dict[str, Any]:
    """What still sits on a node for the operator to move or remove (NODE-6).

    ``sandboxes`` is the count the node last reported. Replicas and snapshots stay empty
    lists until the replica and snapshot tables exist (DIST, SNAP issues); the keys are
    there now so the JSON shape does not change when they arrive.
    """
    return {"sandboxes": n.sandboxes, "replicas": [], "snapshots": []}


def render_state(result: dict[str, Any], console: Any) -> None:
    n = result["node"]
    console.print(f"node {n['node_id']}: {n['admin_state']} (health {n['health']})", highlight=False)
