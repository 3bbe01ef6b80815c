"""What the key commands share: the selector argument and the CURVE-off refusal."""
from __future__ import annotations

import re
from typing import Any

from protocol.errors import InvalidRequest
from protocol.schema import Str

from ..command import Arg

# A z85 public key (40 chars), a fingerprint (SHA256:16 hex, or the hex alone) or a node id.
KEY = Arg("key", "public key, fingerprint or the node id the key claims",
          Str(64, re.compile(r"[!-~]{1,64}\Z"), 1, "key, fingerprint or node id"), positional=True,
          required=True, metavar="KEY|NODE")


def registry(ctx: Any) -> Any:
    if ctx.keys is None:
        raise InvalidRequest("key acceptance needs security.curve = true on the coordinator",
                             {"field": "security.curve", "reason": "curve_off"})
    return ctx.keys


def render_key(result: dict[str, Any], console: Any) -> None:
    k = result["key"]
    console.print(f"key {k['fingerprint']} for node {k['node_id']}: {k['state']}", highlight=False)


def decided(ctx: Any, rec: Any) -> dict[str, Any]:
    """After accept or reject: tell subscribers (WIRE-18) and return the key's view."""
    ctx.events.publish(f"node.{rec.node_id}", "key", {"node": rec.node_id, "fingerprint": rec.fingerprint,
                                                      "state": rec.state})
    return {"key": rec.view()}
