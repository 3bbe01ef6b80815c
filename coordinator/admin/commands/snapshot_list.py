"""``snapshot list [--id] [--sandbox] [--name] [--status] [--limit N] [--next-token T]`` (SNAP-17).

Wire: ADMIN {command: "snapshot list", args: {...}} → RESULT {snapshots: [{snapshot_id, name, status,
sandbox_id, node_id, …, runtime_ref_count, runtime_ref_sandboxes}], next_token}. Newest first;
DELETING only under a status filter, DELETED (tombstones) never; limit 20 by default, at most 100;
``next_token`` is the decimal offset of the next page ("" on the last page).
"""
from __future__ import annotations

import asyncio
from typing import Any

from protocol.schema import Int, Str

from ..command import Arg, Command
from ..render import rfc3339, table
from ._snapshot import service


def _int(x: Any, p: str) -> int:
    if isinstance(x, str) and x.strip().isdigit():
        x = int(x)
    return Int(1, 1000)(x, p)


class SnapshotList(Command):
    name = "snapshot list"
    summary = "list snapshots, newest first"
    args = (Arg("id", "only this snapshot id", Str(64, None, 1, "snapshot id"), metavar="SNAP"),
            Arg("sandbox", "only snapshots of this sandbox", Str(64, None, 1, "sandbox id"), metavar="SBX"),
            Arg("name", "only snapshots with this display name", Str(128, None, 1, "name"), metavar="NAME"),
            Arg("status", "only this status (CREATING, READY, FAILED, DELETING)", Str(16, None, 1, "status"),
                metavar="STATUS"),
            Arg("limit", "page size (default 20, at most 100)", _int, metavar="N"),
            Arg("next_token", "the page to show, from the previous page's next_token", Str(16, None, 0, "next_token"),
                metavar="TOKEN"))

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(service(ctx).list, snapshot_id=args.get("id"), sandbox=args.get("sandbox"),
                                       name=args.get("name"), status=args.get("status"), limit=args.get("limit"),
                                       next_token=args.get("next_token"))

    def render(self, result: dict[str, Any], console) -> None:  # type: ignore[no-untyped-def]
        t = table("SNAPSHOT", "NAME", "STATUS", "SANDBOX", "NODE", "REFS", "CREATED")
        for s in result["snapshots"]:
            t.add_row(s["snapshot_id"], s["name"] or "-", s["status"], s["sandbox_id"], s["node_id"],
                      str(s["runtime_ref_count"]), rfc3339(s["created_ms"]))
        console.print(t)
        if result.get("next_token"):
            console.print(f"more: --next-token {result['next_token']}", highlight=False)
