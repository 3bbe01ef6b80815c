"""``node keys`` — agent keys with fingerprint, claimed node id, state, first/last seen (SEC-4).

Wire: ADMIN {command: "node keys", args: {state?}} → RESULT {keys: [...]}, pending first, then
by first seen.
"""
from __future__ import annotations

from typing import Any

from protocol.schema import Enum

from ..command import Arg, Command
from ..render import rfc3339, table
from ._keys import registry

STATES = ("pending", "accepted", "rejected")


class NodeKeys(Command):
    name = "node keys"
    summary = "list agent keys and their acceptance state"
    args = (Arg("state", "only keys in this state", Enum(STATES), choices=STATES),)

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        keys = registry(ctx).keys.values()
        rows = [k.view() for k in keys if not args["state"] or k.state == args["state"]]
        order = {s: i for i, s in enumerate(STATES)}
        rows.sort(key=lambda r: (order[r["state"]], r["first_seen"], r["fingerprint"]))
        return {"keys": rows}

    def render(self, result: dict[str, Any], console) -> None:  # type: ignore[no-untyped-def]
        if not result["keys"]:
            console.print("no keys")
            return
        t = table("FINGERPRINT", "NODE", "STATE", "FIRST SEEN", "LAST SEEN", "PUBLIC KEY")
        for k in result["keys"]:
            t.add_row(k["fingerprint"], k["node_id"], k["state"], rfc3339(k["first_seen"]),
                      rfc3339(k["last_seen"]), k["public_key"])
        console.print(t)
