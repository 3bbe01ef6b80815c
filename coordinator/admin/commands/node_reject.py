"""``node reject KEY|NODE`` — the key fails the CURVE handshake from now on (SEC-4).

Wire: ADMIN {command: "node reject", args: {key, request_id?}} → RESULT {key: {...}}. Idempotent.
"""
from __future__ import annotations

from ..command import Command
from ._keys import KEY, decided, registry, render_key


class NodeReject(Command):
    name = "node reject"
    summary = "reject an agent's key: its handshakes fail"
    args = (KEY,)
    mutating = True

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        return decided(ctx, await registry(ctx).reject(args["key"]))

    render = staticmethod(render_key)  # type: ignore[assignment]
