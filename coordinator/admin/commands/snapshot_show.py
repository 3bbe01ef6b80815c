"""``snapshot show SNAP`` — one snapshot with its runtime refs, its copy and recent jobs (SNAP-17).

Wire: ADMIN {command: "snapshot show", args: {snapshot}} → RESULT {snapshot_id, name, status,
sandbox_id, node_id, template_id, base_artifact_id, pins, host_facts, sizes, pause_ms, last_error,
created_ms, updated_ms, runtime_ref_count, runtime_ref_sandboxes, runtime_refs, replicas, jobs}.
A tombstone (DELETED) is SnapshotNotFound (SNAP-12).
"""
from __future__ import annotations

import asyncio
from typing import Any

from ..command import Command
from ._snapshot import SNAPSHOT, render_snapshot, service


class SnapshotShow(Command):
    name = "snapshot show"
    summary = "show one snapshot"
    args = (SNAPSHOT,)

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(service(ctx).show, args["snapshot"])

    def render(self, result: dict[str, Any], console) -> None:  # type: ignore[no-untyped-def]
        render_snapshot(result, console)
        users = result.get("runtime_ref_sandboxes") or []
        console.print(f"  runtime refs: {result['runtime_ref_count']}" + (f" ({', '.join(users)})" if users else ""),
                      highlight=False)
        for r in result.get("replicas") or []:
            console.print(f"  copy on {r['node_id']}: {r['status']}, "
                          f"{'listed' if r['in_catalog'] else 'NOT listed'} in its catalog", highlight=False)
        for j in (result.get("jobs") or [])[:5]:
            console.print(f"  job {j['job_id']} {j['operation']} {j['status']} {j['phase']} {j['progress']}%",
                          highlight=False)
