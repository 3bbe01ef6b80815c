"""``snapshot delete SNAP`` — delete a snapshot (SNAP-11 to SNAP-13).

Wire: ADMIN {command: "snapshot delete", args: {snapshot, request_id}} → RESULT {snapshot_id,
deleted, tombstoned, refs?, job}. Sandboxes running from it do not block the delete: the
snapshot becomes a hidden tombstone (``tombstoned``, ``refs`` = those sandboxes) and its files
go once the last of them is destroyed (SNAP-12, SNAP-14). Allowed whatever the storage mode.
"""
from __future__ import annotations

from typing import Any

from ..command import Command
from ._snapshot import SNAPSHOT, service


class SnapshotDelete(Command):
    name = "snapshot delete"
    summary = "delete a snapshot (a tombstone while sandboxes still run from it)"
    args = (SNAPSHOT,)
    mutating = True

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        return await service(ctx).delete(request_id=args["request_id"], snapshot=args["snapshot"])

    def render(self, result: dict[str, Any], console) -> None:  # type: ignore[no-untyped-def]
        if result.get("tombstoned"):
            console.print(f"snapshot {result['snapshot_id']} deleted (tombstone: its files stay until "
                          f"{', '.join(result.get('refs') or [])} {'is' if len(result.get('refs') or []) == 1 else 'are'}"
                          " destroyed)", highlight=False)
        else:
            console.print(f"snapshot {result['snapshot_id']} deleted", highlight=False)
