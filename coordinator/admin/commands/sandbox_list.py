"""``sandbox list`` — the coordinator's sandbox records joined with the nodes' catalogs (RT-19).

Wire: ADMIN {command: "sandbox list", args: {}} → RESULT {sandboxes: [{sandbox_id, name, source,
template_id, node_id, state, recorded_state, restore, vcpus, memory_mib, created_ms, exit_code,
recorded, in_catalog, last_error}]}, newest first. ``state`` is the live state the node's
mirrored catalog reports (CAT-6), else the recorded one; sandboxes a node lists that the
coordinator has no record of follow, with ``recorded`` false.
"""
from __future__ import annotations

from typing import Any

from ..command import Command
from ..render import rfc3339
from ._sandbox import service


class SandboxList(Command):
    name = "sandbox list"
    summary = "list sandboxes with their live state"

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        return {"sandboxes": await service(ctx).list()}

    def render(self, result: dict[str, Any], console) -> None:  # type: ignore[no-untyped-def]
        from rich.table import Table
        t = Table("SANDBOX", "NAME", "TEMPLATE", "NODE", "STATE", "RESTORE", "CREATED", box=None)
        for s in result["sandboxes"]:
            t.add_row(s["sandbox_id"] or "-", s["name"] or "-", s["template_id"] or "-", s["node_id"] or "-",
                      s["state"] + ("" if s["recorded"] else " (unrecorded)"), s["restore"], rfc3339(s["created_ms"]))
        console.print(t)
