"""``node accept KEY|NODE`` — bind a pending key to the node id it claims (SEC-4, NODE-1).

Wire: ADMIN {command: "node accept", args: {key, request_id?}} → RESULT {key: {...}}.
Unauthorized if another accepted key holds that node id. Idempotent.
"""
from __future__ import annotations

from ..command import Command
from ._keys import KEY, decided, registry, render_key


class NodeAccept(Command):
    name = "node accept"
    summary = "accept an agent's key (by public key, fingerprint or claimed node id)"
    args = (KEY,)
    mutating = True

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        return decided(ctx, await registry(ctx).accept(args["key"]))

    render = staticmethod(render_key)  # type: ignore[assignment]
