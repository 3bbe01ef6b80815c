"""``node uncordon NODE`` — return a CORDONED or DRAINING node to ACTIVE (NODE-4).

Wire: ADMIN {command: "node uncordon", args: {node, request_id?}} → RESULT {node: summary}.
Idempotent.
"""
from __future__ import annotations

from ..command import Command
from ._args import NODE
from ._admin_state import render_state, set_state


class NodeUncordon(Command):
    name = "node uncordon"
    summary = "mark a node ACTIVE again"
    args = (NODE,)
    mutating = True

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        return await set_state(ctx, args["node"], "ACTIVE")

    render = staticmethod(render_state)  # type: ignore[assignment]
