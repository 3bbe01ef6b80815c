"""``node drain NODE [--wait] [--wait-timeout DURATION]`` — mark a node DRAINING and list what
remains there (NODE-4, NODE-6, CLI-3, CLI-4).

Wire: ADMIN {command: "node drain", args: {node, wait?, wait_timeout?, request_id?}}
→ RESULT {node: summary, remaining: {sandboxes, replicas, snapshots}}; with ``wait`` also
``timed_out`` and, when it is true, ``follow_up`` (the command that resumes the wait).
Idempotent: draining a DRAINING node changes nothing and reports what remains.

With ``wait`` the coordinator holds the request until the node reports no sandbox, sending
PROGRESS {node, sandboxes} whenever the count changes and at least every
``admin.progress_every`` (WIRE-19). ``wait_timeout`` (default ``admin.wait_timeout``) bounds
the wait; on expiry the result says ``timed_out: true`` and tcctl exits 3.
"""
from __future__ import annotations

import asyncio
from typing import Any

from protocol.config import parse_duration
from protocol.schema import Bool, SchemaError

from ..command import Arg, Command
from ._admin_state import remaining, render_state, set_state
from ._args import NODE


def duration(x: Any, p: str) -> float:
    """A duration such as ``30s``, ``15m`` or a number of seconds (CONV-3)."""
    if isinstance(x, str) and len(x) > 32:
        raise SchemaError(p, "a duration is at most 32 characters")
    try:
        return parse_duration(x)
    except ValueError as exc:
        raise SchemaError(p, str(exc)) from None


class NodeDrain(Command):
    name = "node drain"
    summary = "mark a node DRAINING and list what remains there; --wait until no sandbox runs"
    args = (
        NODE,
        Arg("wait", "wait until no sandbox runs on the node", Bool(), flag=True, default=False),
        Arg("wait_timeout", "longest wait with --wait, e.g. 30s or 15m (default admin.wait_timeout, 30m)",
            duration, metavar="DURATION"),
    )
    mutating = True

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        node_id = args["node"]
        result = await set_state(ctx, node_id, "DRAINING")
        n = ctx.nodes.get(node_id)
        result["remaining"] = remaining(n)
        if not args["wait"]:
            return result
        timeout = args["wait_timeout"]
        if timeout is None:
            timeout = ctx.config.admin.wait_timeout
        done = await self._wait_empty(ctx, node_id, timeout)
        from ..views import node_summary
        n = ctx.nodes.get(node_id)
        result.update(node=node_summary(ctx, n, ctx.nodes.clock()), remaining=remaining(n), timed_out=not done)
        if not done:
            result["waited_s"] = timeout
            result["follow_up"] = f"tcctl node drain {node_id} --wait"
        return result

    @staticmethod
    async def _wait_empty(ctx: Any, node_id: str, timeout: float) -> bool:
        """True once the node reports 0 sandboxes, False when ``timeout`` s pass first.

        Polls the in-memory count (heartbeats update it, NODE-9) at half the heartbeat
        interval, capped at 0.5 s: cheap, and a change is seen within one beat."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        every = ctx.config.admin.progress_every
        poll = min(0.5, max(0.02, ctx.nodes.interval() / 2))
        last_count: int | None = None
        last_sent = float("-inf")
        while True:
            left = ctx.nodes.get(node_id).sandboxes  # NodeNotFound if removed meanwhile
            if left == 0:
                return True
            now = loop.time()
            if now >= deadline:
                return False
            if left != last_count or now - last_sent >= every:
                ctx.progress(f"node {node_id}: draining, {left} sandbox(es) still running",
                             {"node": node_id, "sandboxes": left})
                last_count, last_sent = left, now
            await asyncio.sleep(min(poll, deadline - now))

    def render(self, result: dict[str, Any], console) -> None:  # type: ignore[no-untyped-def]
        render_state(result, console)
        r = result["remaining"]
        lines = [f"remaining: {r['sandboxes']} sandbox(es), {len(r['replicas'])} replica(s), "
                 f"{len(r['snapshots'])} snapshot(s)"]
        lines += [f"  replica {x}" for x in r["replicas"]] + [f"  snapshot {x}" for x in r["snapshots"]]
        if result.get("timed_out"):
            lines.append(f"wait timed out after {result.get('waited_s', 0):g}s with work pending; "
                         f"follow with: {result['follow_up']}")
        # soft_wrap: the follow-up command must stay on one line to be copied.
        console.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)
