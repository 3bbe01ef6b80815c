"""``sandbox show SBX [--console]`` — one sandbox, optionally with its console tail (RT-19).

Wire: ADMIN {command: "sandbox show", args: {sandbox, console?}} → RESULT {sandbox: {... as in
``sandbox list``, runtime_config, spec, request_id, console?}}. ``console`` is the last 64 KiB
of the sandbox's console, read from its node (CONSOLE_SANDBOX). Unknown → SandboxNotFound.
"""
from __future__ import annotations

from typing import Any

from protocol.schema import Bool

from ..command import Arg, Command
from ..render import rfc3339
from ._sandbox import SANDBOX, service


class SandboxShow(Command):
    name = "sandbox show"
    summary = "show one sandbox (with --console: the last 64 KiB of its console)"
    args = (SANDBOX, Arg("console", "add the last 64 KiB of the console", Bool(), flag=True, default=False))

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        return {"sandbox": await service(ctx).show(args["sandbox"], console=bool(args.get("console")))}

    def render(self, result: dict[str, Any], console) -> None:  # type: ignore[no-untyped-def]
        s = result["sandbox"]
        lines = [f"sandbox:   {s['sandbox_id']}  {s['name'] or ''}",
                 f"state:     {s['state']} (recorded {s['recorded_state'] or '-'})  exit code "
                 f"{s['exit_code'] if s['exit_code'] is not None else '-'}",
                 f"node:      {s['node_id']}  restore {s['restore']}",
                 f"source:    {s['source']['kind']} {s['source']['id']}",
                 f"size:      {s['vcpus']} vCPU, {s['memory_mib']} MiB",
                 f"created:   {rfc3339(s['created_ms'])}"]
        if s.get("last_error"):
            lines.append(f"error:     {s['last_error']}")
        console.print("\n".join(lines), highlight=False, markup=False)
        if "console" in s:
            console.print("--- console ---", highlight=False)
            console.print(s["console"], highlight=False, markup=False, end="")
