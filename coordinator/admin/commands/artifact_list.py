"""``artifact list [--status S] [--orphans] [--strays] [--node N]`` — artifacts, newest-updated
first; or the files agents quarantined (CAT-3, CAT-6); or copies matching no READY artifact (GC-12).

Wire: ADMIN {command: "artifact list", args: {status?, orphans?, strays?, node?}} →
RESULT {artifacts: [{artifact_id, kind, status, fingerprint, sha256, size, manifest_digest,
gc_deadline_ms, placements, updated_ms}]}; with ``orphans``: {orphans: [{node_id, orphan_id,
path, original, size, found_ms}]}; with ``strays``: {strays: [{node_id, artifact_id, sha256,
size, reason}]}. Orphans stay on disk until a purge decision (GC-7); strays go after
``gc.stray_grace`` unless in use.
"""
from __future__ import annotations

import asyncio

from protocol.errors import InvalidRequest
from protocol.schema import Bool, Str

from ..command import Arg, Command
from ._args import NODE
from ._jobs import store

STATUSES = ("PENDING", "BUILDING", "READY", "FAILED", "CLEANUP_PENDING", "ORPHANED")


class ArtifactList(Command):
    name = "artifact list"
    summary = "list artifacts with their status and number of copies"
    args = (Arg("status", "only artifacts in this status", Str(16), choices=STATUSES, metavar="STATUS"),
            Arg("orphans", "list files the agents quarantined instead (kept on disk until purged)", Bool(),
                flag=True, default=False),
            Arg("strays", "list node copies that match no READY artifact instead", Bool(), flag=True, default=False),
            Arg("node", "with --orphans or --strays: only this node", NODE.validator, metavar="NODE"))

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        from ._artifacts import list_artifacts, list_orphans, list_strays  # daemon side: SQLAlchemy
        engine = store(ctx).engine
        if args.get("orphans") and args.get("strays"):
            raise InvalidRequest("artifact list: --orphans and --strays are separate views; give one",
                                 {"field": "strays", "reason": "conflict"})
        if args.get("node") and not (args.get("orphans") or args.get("strays")):
            raise InvalidRequest("artifact list: --node goes with --orphans or --strays",
                                 {"field": "node", "reason": "conflict"})
        if args.get("orphans"):
            return {"orphans": await asyncio.to_thread(list_orphans, engine, args.get("node"))}
        if args.get("strays"):
            return {"strays": await asyncio.to_thread(list_strays, engine, args.get("node"))}
        return {"artifacts": await asyncio.to_thread(list_artifacts, engine, args.get("status"))}

    def render(self, result, console):  # type: ignore[no-untyped-def]
        from rich.table import Table
        t = Table(box=None, pad_edge=False)
        if "orphans" in result:
            for col in ("NODE", "QUARANTINED AS", "WAS", "SIZE"):
                t.add_column(col)
            for o in result["orphans"]:
                t.add_row(o["node_id"], o["path"], o["original"], str(o["size"]))
            console.print(t if result["orphans"] else "no orphans")
            return
        if "strays" in result:
            for col in ("NODE", "ARTIFACT", "REASON", "SHA256"):
                t.add_column(col)
            for o in result["strays"]:
                t.add_row(o["node_id"], o["artifact_id"], o["reason"], (o["sha256"] or "")[:16])
            console.print(t if result["strays"] else "no strays")
            return
        for col in ("ARTIFACT", "KIND", "STATUS", "SIZE", "COPIES", "SHA256"):
            t.add_column(col)
        for a in result["artifacts"]:
            t.add_row(a["artifact_id"], a["kind"], a["status"], f"{a['size'] >> 20} MiB", str(a["placements"]),
                      (a["sha256"] or "")[:16])
        console.print(t)
