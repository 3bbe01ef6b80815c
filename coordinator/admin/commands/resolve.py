"""``resolve TPL|SNAP [--node N]`` — which node can start a sandbox from this template now (RES-1 to
RES-3, COMPAT-5, RT-18).

Wire: ADMIN {command: "resolve", args: {template, node?}} → RESULT {template_id, node, address,
replica: {template_id, node_id, artifact_id, compat, has_memory_snapshot}, restore: memory|cold},
answered from the in-memory index (a warm index queries no database). Candidates: READY
replicas on placeable, sandbox-capable nodes with room (free memory ≥ sandbox memory + 256 MiB,
< 64 sandboxes), never STALE; OK before UNKNOWN, memory snapshot before cold boot, fewer running
sandboxes, node id; a preferred node wins when it is a candidate.
Errors: TemplateNotFound (unknown or DELETING), TemplateStaleNeedsRedo {template, nodes},
TemplateHasNoReadyReplica {template, nodes: [{node, reason}]}; snapshots: SnapshotNotFound.
"""
from __future__ import annotations

from typing import Any

from protocol import ids
from protocol.errors import InvalidRequest
from protocol.schema import Str

from ..command import Arg, Command

TARGET = Arg("template", "template id or alias (or snapshot id)", Str(64, None, 1, "template"), positional=True,
             required=True, metavar="TPL|SNAP")
NODE = Arg("node", "preferred node (used when it is a candidate)", Str(63, ids.NODE_ID, 1, "node id"),
           metavar="NODE")


class Resolve(Command):
    name = "resolve"
    summary = "pick the node that can start a sandbox from a template now"
    args = (TARGET, NODE)

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        index = getattr(ctx, "resolve", None)
        if index is None:
            raise InvalidRequest("resolve is not served by this coordinator", {"field": "command"})
        return await index.resolve(args["template"], args.get("node"))

    def render(self, result: dict[str, Any], console) -> None:  # type: ignore[no-untyped-def]
        console.print(f"{result['template_id']} → node {result['node']} ({result['address']}), "
                      f"compat {result['replica']['compat']}, restore {result['restore']}", highlight=False)
