"""``sandbox destroy SBX`` — stop the sandbox on its node and delete its record (RT-15, RT-19).

Wire: ADMIN {command: "sandbox destroy", args: {sandbox, request_id}} → RESULT {sandbox_id,
node_id, destroyed} once the node reports it gone (DESTROY_SANDBOX; a sandbox already absent on
the node destroys successfully). Unknown to the coordinator and to every catalog → SandboxNotFound.
"""
from __future__ import annotations

from typing import Any

from ..command import Command
from ._sandbox import SANDBOX, service


class SandboxDestroy(Command):
    name = "sandbox destroy"
    summary = "destroy a sandbox (waits for the end)"
    args = (SANDBOX,)
    mutating = True

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        return await service(ctx).destroy(args["sandbox"])

    def render(self, result: dict[str, Any], console) -> None:  # type: ignore[no-untyped-def]
        console.print(f"sandbox {result['sandbox_id']} destroyed on {result['node_id']}", highlight=False)
