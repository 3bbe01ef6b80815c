"""``snapshot rollback SBX SNAP`` — put a sandbox back to one of its snapshots (SNAP-8 to SNAP-10).

Wire: ADMIN {command: "snapshot rollback", args: {sandbox, snapshot, request_id}} → RESULT
{sandbox_id, snapshot_id, node_id, generation, state, restore_ms, job}. The sandbox's VM and its
writes since the snapshot are discarded; it resumes from the snapshot on its origin node with a
new generation (SNAP-9), and the sandbox's runtime ref switches to the snapshot (SNAP-18).
"""
from __future__ import annotations

from typing import Any

from protocol.schema import Str

from ..command import Arg, Command
from ._sandbox import SANDBOX
from ._snapshot import service


class SnapshotRollback(Command):
    name = "snapshot rollback"
    summary = "roll a sandbox back to one of its snapshots"
    args = (SANDBOX, Arg("snapshot", "snapshot id", Str(64, None, 1, "snapshot id"), positional=True, required=True,
                         metavar="SNAP"))
    mutating = True

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        return await service(ctx).rollback(request_id=args["request_id"], sandbox=args["sandbox"],
                                           snapshot=args["snapshot"])

    def render(self, result: dict[str, Any], console) -> None:  # type: ignore[no-untyped-def]
        console.print(f"sandbox {result['sandbox_id']} rolled back to {result['snapshot_id']} on {result['node_id']}"
                      f"  generation {result['generation']}  {result['state']}  in {result['restore_ms']} ms",
                      highlight=False)
