"""``storage status [--refresh]`` — every node's store usage and storage mode (SNAP-22).

Wire: ADMIN {command: "storage status", args: {refresh?}} → RESULT {nodes: [{node_id, address,
health, usage, mode, total, used, free, last_error, last_update}], refreshed}, sorted by node
id. ``usage`` is the SNAP-15 percentage (one decimal), ``last_update`` the time (ms) of the
figures, ``last_error`` the error of the node's latest refresh ("" once one succeeds).

``--refresh`` sends PROBE_STORAGE to every READY node (``storage.refresh_timeout``, 5 s) and
answers with the fresh figures; a node whose probe failed reads ``unknown`` with its error.
The fresh figures also reach the storage gate (SNAP-16) at once.
"""
from __future__ import annotations

from typing import Any

from protocol.schema import Bool

from ..command import Arg, Command
from ..render import rfc3339, table


class StorageStatus(Command):
    name = "storage status"
    summary = "store usage and storage mode of every node"
    args = (Arg("refresh", "ask every READY node for fresh figures first", Bool(), flag=True, default=False),)

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        probe = ctx.storage
        if probe is None:  # a context without task dispatch (unit tests): figures as they are
            from ...storage import StorageProbe
            probe = StorageProbe(ctx.nodes, None, ctx.config.storage)
        failed = await probe.refresh() if args["refresh"] else {}
        return {"nodes": probe.rows(failed), "refreshed": bool(args["refresh"])}

    def render(self, result: dict[str, Any], console) -> None:  # type: ignore[no-untyped-def]
        if not result["nodes"]:
            console.print("no nodes")
            return
        t = table("NODE", "ADDRESS", "USAGE", "MODE", "LAST ERROR", "LAST UPDATE")
        for n in result["nodes"]:
            usage = f"{n['usage']}%" if n["total"] else "-"
            t.add_row(n["node_id"], n["address"] or "-", usage, n["mode"], n["last_error"] or "-",
                      rfc3339(n["last_update"]))
        console.print(t)
