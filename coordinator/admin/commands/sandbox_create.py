"""``sandbox create --template T|--snapshot S [--node N] [--name N] [--wait-ready]`` (RT-17).

Wire: ADMIN {command: "sandbox create", args: {template?, snapshot?, node?, name?, wait_ready?,
request_id}} → RESULT {sandbox: {sandbox_id, name, source, template_id, node_id, address, state,
restore, vcpus, memory_mib, created_ms, exit_code, boot_ms, ready_ms, restored}} once the agent
reports RUNNING (after the template's readiness probe with ``--wait-ready``, RT-9).

The node comes from resolve (RES-2) unless ``--node`` names one; that node must be placeable
(NodeNotEligible), have a sandbox runtime (SandboxUnsupported) and writable storage
(NodeStorageBlocked, SNAP-16). A retry with the same request id returns the same sandbox.
A snapshot source restores the snapshot on its node (SNAP-8; a tombstone is SnapshotNotFound).
"""
from __future__ import annotations

from typing import Any

from protocol import ids
from protocol.schema import Bool, Str

from ..command import Arg, Command
from ..render import rfc3339
from ._sandbox import service


class SandboxCreate(Command):
    name = "sandbox create"
    summary = "start a sandbox from a template (waits until it runs)"
    args = (Arg("template", "template id or alias", Str(64, None, 1, "template"), metavar="TPL"),
            Arg("snapshot", "snapshot id", Str(29, None, 1, "snapshot"), metavar="SNAP"),
            Arg("node", "run it on this node (must be placeable and sandbox-capable)",
                Str(63, ids.NODE_ID, 1, "node id"), metavar="NODE"),
            Arg("name", "a display name (a label)", Str(128, None, 0, "name"), default="", metavar="NAME"),
            Arg("wait_ready", "reply only after the template's readiness probe passed (RT-9)", Bool(), flag=True,
                default=False))
    mutating = True

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        sbx = await service(ctx).create(request_id=args["request_id"], template=args.get("template"),
                                        snapshot=args.get("snapshot"), node=args.get("node"),
                                        name=args.get("name") or "", wait_ready=bool(args.get("wait_ready")))
        return {"sandbox": sbx}

    def render(self, result: dict[str, Any], console) -> None:  # type: ignore[no-untyped-def]
        s = result["sandbox"]
        console.print(f"sandbox {s['sandbox_id']}  {s['state']}  on {s['node_id']}"
                      f"{' (' + s['address'] + ')' if s.get('address') else ''}  restore {s['restore']}  "
                      f"template {s['template_id']}  created {rfc3339(s['created_ms'])}", highlight=False)
