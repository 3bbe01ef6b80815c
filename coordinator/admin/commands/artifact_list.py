"""``artifact list [--status S]`` — artifacts, newest-updated first (CLI-5).

Wire: ADMIN {command: "artifact list", args: {status?}} → RESULT {artifacts: [{artifact_id, kind,
status, fingerprint, sha256, size, manifest_digest, gc_deadline_ms, placements, updated_ms}]}.
"""
from __future__ import annotations

import asyncio

from protocol.schema import Str

from ..command import Arg, Command
from ._artifacts import list_artifacts
from ._jobs import store

STATUSES = ("PENDING", "BUILDING", "READY", "FAILED", "CLEANUP_PENDING", "ORPHANED")


class ArtifactList(Command):
    name = "artifact list"
    summary = "list artifacts with their status and number of copies"
    args = (Arg("status", "only artifacts in this status", Str(16), choices=STATUSES, metavar="STATUS"),)

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        return {"artifacts": await asyncio.to_thread(list_artifacts, store(ctx).engine, args.get("status"))}

    def render(self, result, console):  # type: ignore[no-untyped-def]
        from rich.table import Table
        t = Table(box=None, pad_edge=False)
        for col in ("ARTIFACT", "KIND", "STATUS", "SIZE", "COPIES", "SHA256"):
            t.add_column(col)
        for a in result["artifacts"]:
            t.add_row(a["artifact_id"], a["kind"], a["status"], f"{a['size'] >> 20} MiB", str(a["placements"]),
                      (a["sha256"] or "")[:16])
        console.print(t)
