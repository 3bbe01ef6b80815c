"""The admin-state change shared by cordon, uncordon and (later) drain."""
from __future__ import annotations

from typing import Any


async def set_state(ctx: Any, node_id: str, state: str) -> dict[str, Any]:
    from ...health import AdminState
    from ..views import node_summary
    n = await ctx.nodes.set_admin_state(node_id, AdminState(state))
    return {"node": node_summary(ctx, n, ctx.nodes.clock())}


def render_state(result: dict[str, Any], console: Any) -> None:
    n = result["node"]
    console.print(f"node {n['node_id']}: {n['admin_state']} (health {n['health']})", highlight=False)
