"""``node cordon NODE`` — stop new placements on a node; it keeps serving what it holds (NODE-4, NODE-5).

Wire: ADMIN {command: "node cordon", args: {node, request_id?}} → RESULT {node: summary}.
Idempotent.
"""
from __future__ import annotations

from ..command import Command
from ._args import NODE
from ._admin_state import render_state, set_state


class NodeCordon(Command):
    name = "node cordon"
    summary = "mark a node CORDONED: no new placements"
    args = (NODE,)
    mutating = True

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        return await set_state(ctx, args["node"], "CORDONED")

    render = staticmethod(render_state)  # type: ignore[assignment]
