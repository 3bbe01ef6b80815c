"""``snapshot create SBX [--name NAME]`` — snapshot a running sandbox (SNAP-1 to SNAP-6).

Wire: ADMIN {command: "snapshot create", args: {sandbox, name?, request_id}} → RESULT {snapshot_id,
name, status, sandbox_id, node_id, template_id, base_artifact_id, pins, host_facts, sizes, pause_ms,
…, job}. Synchronous, capped at ``snapshot.op_timeout`` (15 min): past it, Timeout with the job id
while the job runs on (SNAP-5). The same request id returns the same snapshot (SNAP-6).
"""
from __future__ import annotations

from typing import Any

from protocol.schema import Str

from ..command import Arg, Command
from ._sandbox import SANDBOX
from ._snapshot import render_snapshot, service


class SnapshotCreate(Command):
    name = "snapshot create"
    summary = "snapshot a running sandbox (it pauses briefly and runs on)"
    args = (SANDBOX, Arg("name", "a display name (a label, up to 128 characters)", Str(128, None, 0, "name"),
                         default="", metavar="NAME"))
    mutating = True

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        return await service(ctx).create(request_id=args["request_id"], sandbox=args["sandbox"],
                                         name=args.get("name") or "")

    def render(self, result: dict[str, Any], console) -> None:  # type: ignore[no-untyped-def]
        render_snapshot(result, console)
