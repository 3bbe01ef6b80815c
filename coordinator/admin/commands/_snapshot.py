"""What the snapshot commands share: id arguments, the service lookup, rendering one snapshot."""
from __future__ import annotations

from typing import Any

from protocol.errors import InvalidRequest
from protocol.schema import Str

from ..command import Arg
from ..render import rfc3339

# The format (CONV-1) is checked by the coordinator, which answers InvalidRequest (CONV-2).
SNAPSHOT = Arg("snapshot", "snapshot id", Str(64, None, 1, "snapshot id"), positional=True, required=True,
               metavar="SNAP")


def service(ctx: Any) -> Any:
    if getattr(ctx, "snapshots", None) is None:
        raise InvalidRequest("snapshots are not served by this coordinator", {"field": "command"})
    return ctx.snapshots


def render_snapshot(s: dict[str, Any], console: Any) -> None:
    console.print(f"snapshot {s['snapshot_id']}  {s['status']}  of {s['sandbox_id']} on {s['node_id']}"
                  f"{'  ' + repr(s['name']) if s.get('name') else ''}  created {rfc3339(s['created_ms'])}",
                  highlight=False)
    if s.get("pause_ms") is not None:
        console.print(f"  paused {s['pause_ms']} ms  template {s.get('template_id') or '-'}  "
                      f"base {s.get('base_artifact_id') or '-'}", highlight=False)
    if s.get("last_error"):
        console.print(f"  last error: {s['last_error']}", highlight=False)
