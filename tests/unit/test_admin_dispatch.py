"""The admin dispatcher maps every exception to a code in one place (STYLE 4, WIRE-19, CLI-5)."""
from __future__ import annotations

import asyncio
from typing import Any

from coordinator.admin.command import REGISTRY, Arg, Command
from coordinator.admin.context import AdminContext
from coordinator.admin.dispatcher import dispatch
from protocol.errors import NodeNotFound
from protocol.messages import Admin, Error, Progress, Result
from protocol.schema import Int


class _Slow(Command):
    name = "test slow"
    args = (Arg("steps", "how many progress periods to run", Int(0, 100), default=3),)

    async def execute(self, ctx: AdminContext, args: dict[str, Any]) -> Any:
        for _ in range(args["steps"]):
            await asyncio.sleep(0.05)  # the command under test is slow on purpose
        return {"done": args["steps"]}


class _Boom(Command):
    name = "test boom"

    async def execute(self, ctx: AdminContext, args: dict[str, Any]) -> Any:
        raise ValueError("secret internals")


class _Missing(Command):
    name = "test missing"

    async def execute(self, ctx: AdminContext, args: dict[str, Any]) -> Any:
        raise NodeNotFound("node x is not known", {"node": "x"})


CTX = AdminContext(config=None, engine=None, nodes=None, events=None, peers=None)  # type: ignore[arg-type]


def run(command: str, args: dict[str, Any], every: float = 10.0) -> tuple[Any, list[Any]]:
    sent: list[Any] = []
    reply = asyncio.run(dispatch(CTX, Admin(msg_id="m1", command=command, args=args), sent.append, every))
    return reply, sent


def test_result_and_progress_while_slow() -> None:
    """WIRE-19: PROGRESS while a command runs past progress_every, then RESULT; parent_id set."""
    reply, sent = run("test slow", {"steps": 6}, every=0.06)
    assert isinstance(reply, Result) and reply.result == {"done": 6} and reply.parent_id == "m1"
    assert sent and all(isinstance(p, Progress) and p.parent_id == "m1" for p in sent)


def test_error_mapping() -> None:
    """Unknown command → UnsupportedMessage; bad args → InvalidRequest with field; TCError kept;
    anything else → Internal with a log reference and no internals."""
    reply, _ = run("test nope", {})
    assert isinstance(reply, Error) and reply.name == "UnsupportedMessage" and reply.code == 1003
    reply, _ = run("test slow", {"steps": "many"})
    assert reply.name == "InvalidRequest" and reply.details["field"] == "steps"
    reply, _ = run("test slow", {"bogus": 1})
    assert reply.name == "InvalidRequest" and reply.details == {"field": "bogus", "reason": "unknown"}
    reply, _ = run("test missing", {})
    assert reply.name == "NodeNotFound" and reply.code == 4001 and reply.details == {"node": "x"}
    reply, _ = run("test boom", {})
    assert reply.name == "Internal" and reply.code == 1000 and "secret" not in reply.message
    assert reply.details["log_ref"]


def test_registry_has_node_commands_and_mutating_ones_take_request_id() -> None:
    """CLI-2, CLI-5: the first admin slice."""
    import coordinator.admin.commands  # noqa: F401
    for name in ("node list", "node show", "node cordon", "node uncordon"):
        assert name in REGISTRY
    assert any(a.name == "request_id" for a in REGISTRY["node cordon"].all_args())
    assert not any(a.name == "request_id" for a in REGISTRY["node list"].all_args())
