"""tcctl is generated from the command registry; progress output; drain's wait logic
(CLI-1, CLI-2, CLI-3, CLI-4, CLI-5, NODE-6, WIRE-19).

Pure logic: the parser and renderer in-process, and ``node drain``'s execute against a real
NodeRegistry on a throwaway SQLite file (STYLE 12, first tier).
"""
from __future__ import annotations

import argparse
import asyncio
import io
from pathlib import Path
from typing import Any

import pytest

import coordinator.admin.commands  # noqa: F401 — registers every command
from coordinator.admin.command import REGISTRY
from coordinator.admin.context import AdminContext
from coordinator.cli.main import UsageError, build_parser, main
from coordinator.cli.progress import ProgressRenderer, describe


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _argv(name: str, *extra: str) -> list[str]:
    """A minimal valid command line for a registered command."""
    argv = name.split(" ")
    for a in REGISTRY[name].all_args():
        if a.positional and a.required:
            argv.append("n1")
        elif a.required and not a.flag:
            argv += [a.option, (a.choices or ("x",))[0]]
    return argv + list(extra)


def test_parser_has_every_registry_command() -> None:
    """CLI-5, STYLE 2: every registered command is a tcctl subcommand with its options."""
    groups = _subparsers(build_parser())
    for name, cls in REGISTRY.items():
        sp = groups
        for word in name.split(" "):  # three-word names nest: template → alias → set
            sp = _subparsers(sp)[word] if not isinstance(sp, dict) else sp[word]
        options = {s for a in sp._actions for s in a.option_strings}
        assert {"--json", "--endpoint", "--timeout"} <= options, name
        for a in cls.all_args():
            if not a.positional:
                # Wire-only arguments (filled by client_args, e.g. credentials) have no option.
                assert (a.option in options) == a.cli, (name, a.option)
    assert "bash" in _subparsers(groups["completion"])


@pytest.mark.parametrize("name", sorted(n for n, c in REGISTRY.items() if c.mutating))
def test_mutating_commands_take_request_id(name: str) -> None:
    """CLI-2: mutating commands take --request-id; the others do not."""
    ns = build_parser().parse_args(_argv(name, "--request-id", "retry-7"))
    assert ns.command == name and ns.request_id == "retry-7"


def test_read_only_commands_refuse_request_id() -> None:
    """CLI-2: --request-id belongs to mutating commands only."""
    for name in (n for n, c in REGISTRY.items() if not c.mutating):
        with pytest.raises(UsageError):
            build_parser().parse_args(_argv(name, "--request-id", "x"))


def test_global_options_after_subcommand_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    """CLI-1: --json, --endpoint (repeatable) and --timeout work after the subcommand; --version."""
    ns = build_parser().parse_args(["node", "list", "--json", "--endpoint", "ipc:///a", "--endpoint",
                                    "ipc:///b", "--timeout", "2"])
    assert ns.json and ns.endpoint == ["ipc:///a", "ipc:///b"] and ns.timeout == 2.0
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("tcctl ")


def test_usage_errors_exit_2_and_stay_one_json_document(capsys: pytest.CaptureFixture[str]) -> None:
    """CLI-1: usage errors exit 2; with --json stdout is one document {error:{code,name,message,details}}."""
    import json
    for argv in (["node", "list", "--bogus", "--json"], ["node", "show", "BAD ID", "--json"],
                 ["node", "drain", "n1", "--wait-timeout", "soon", "--json"]):
        assert main(argv) == 2, argv
        doc = json.loads(capsys.readouterr().out)
        assert set(doc["error"]) == {"code", "name", "message", "details"}
        assert doc["error"]["name"] == "InvalidRequest"
    assert main(["node", "list", "--bogus"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "unrecognized arguments: --bogus" in out.err


def test_progress_renderer_non_tty_deduplicates() -> None:
    """CLI-3, WIRE-19: off a TTY one line per distinct message, never a repeated line."""
    class P:
        def __init__(self, message: str, data: dict[str, Any] | None = None) -> None:
            self.message, self.data = message, data
    buf = io.StringIO()
    r = ProgressRenderer(stream=buf, tty=False)
    for m in (P("node drain: still running"), P("node drain: still running"),
              P("draining", {"sandboxes": 2}), P("draining", {"sandboxes": 2}),
              P("draining", {"sandboxes": 1}), P("node drain: still running")):
        r(m)
    r.close()
    assert buf.getvalue().splitlines() == [
        "… node drain: still running", "… draining (sandboxes=2)", "… draining (sandboxes=1)",
        "… node drain: still running"]
    assert describe("node n1: 3 left", {"node": "n1", "sandboxes": 3}) == "node n1: 3 left"


# --- node drain --wait, in-process ---------------------------------------------------------

def _ctx(tmp_path: Path, sandboxes: int, progress: list[tuple[str, Any]]) -> AdminContext:
    from coordinator.config import load_config
    from coordinator.db.engine import make_engine
    from coordinator.db.models import Base
    from coordinator.db.node_store import upsert_hello
    from coordinator.events import EventBus
    from coordinator.health import Thresholds
    from coordinator.nodes import LiveNode, NodeRegistry
    from protocol.peers import PeerTable

    engine = make_engine(f"sqlite:///{tmp_path}/c.db")
    Base.metadata.create_all(engine)
    upsert_hello(engine, node_id="n1", now_ms=0, address="127.0.0.1", blob_endpoint="", labels={},
                 capabilities={}, facts={}, facts_digest="", versions={}, versions_digest="")
    t = Thresholds(interval=0.05, max_rate=20_000, suspect_missed=2, lease_missed=5, lease_ttl_min=15,
                   failover_grace=0)
    reg = NodeRegistry(engine, t, EventBus(None))
    reg.nodes["n1"] = LiveNode(node_id="n1", sandboxes=sandboxes)
    return AdminContext(config=load_config(None, ["admin.progress_every=50ms"]), engine=engine, nodes=reg,
                        events=reg.events, peers=PeerTable(),
                        progress=lambda m, d=None: progress.append((m, d)))


def _drain(ctx: AdminContext, **args: Any) -> dict[str, Any]:
    cls = REGISTRY["node drain"]

    async def run() -> dict[str, Any]:
        return await cls().execute(ctx, cls.validate({"node": "n1", **args}))
    return asyncio.run(run())


def test_drain_wait_times_out_listing_what_remains(tmp_path: Path) -> None:
    """NODE-6, CLI-3, CLI-4, WIRE-19: a node that keeps a sandbox → timed_out with the remainder,
    PROGRESS {sandboxes} while waiting, and the follow-up command."""
    progress: list[tuple[str, Any]] = []
    ctx = _ctx(tmp_path, 1, progress)
    res = _drain(ctx, wait=True, wait_timeout="300ms")
    assert res["timed_out"] is True
    assert res["remaining"] == {"sandboxes": 1, "replicas": [], "snapshots": []}
    assert res["node"]["admin_state"] == "DRAINING" and res["follow_up"] == "tcctl node drain n1 --wait"
    assert progress and all(d == {"node": "n1", "sandboxes": 1} for _, d in progress)
    assert len(progress) >= 2  # the count is unchanged, so these are the every-progress_every repeats


def test_drain_wait_ends_when_sandboxes_reach_zero(tmp_path: Path) -> None:
    """NODE-6: --wait returns as soon as the node reports no sandbox; idempotent on DRAINING."""
    progress: list[tuple[str, Any]] = []
    ctx = _ctx(tmp_path, 2, progress)

    async def run() -> dict[str, Any]:
        cls = REGISTRY["node drain"]
        task = asyncio.ensure_future(cls().execute(ctx, cls.validate({"node": "n1", "wait": True,
                                                                      "wait_timeout": "30s"})))
        deadline = asyncio.get_running_loop().time() + 10
        while not progress:  # poll until the command is waiting, then let the node empty
            assert asyncio.get_running_loop().time() < deadline, "drain --wait never reported progress"
            await asyncio.sleep(0.01)  # polling interval, not a wait for an outcome
        ctx.nodes.nodes["n1"].sandboxes = 0
        return await asyncio.wait_for(task, 10)
    res = asyncio.run(run())
    assert res["timed_out"] is False and res["remaining"]["sandboxes"] == 0 and "follow_up" not in res
    res = _drain(ctx)  # again, without --wait: no wait fields
    assert res["node"]["admin_state"] == "DRAINING" and "timed_out" not in res


def test_wait_timeout_result_exits_3_and_names_the_follow_up(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """CLI-3, CLI-4: a result with timed_out → exit 3; --json stays one document without
    progress lines; the human form prints what remains and the command to follow with."""
    import json

    from coordinator.cli import main as cli

    class P:
        message, data = "node n1: draining, 1 sandbox(es) still running", {"node": "n1", "sandboxes": 1}

    result = {"node": {"node_id": "n1", "admin_state": "DRAINING", "health": "READY"},
              "remaining": {"sandboxes": 1, "replicas": [], "snapshots": []}, "timed_out": True,
              "waited_s": 1.0, "follow_up": "tcctl node drain n1 --wait"}

    def request(self: Any, command: str, args: dict[str, Any], on_progress: Any = None) -> Any:
        assert command == "node drain" and args["wait"] is True and args["wait_timeout"] == "1s"
        for _ in range(2):
            if on_progress:
                on_progress(P())
        return result
    # The transport is not under test here: main's mapping of a result to an exit code is.
    monkeypatch.setattr(cli.AdminClient, "request", request)
    argv = ["node", "drain", "n1", "--wait", "--wait-timeout", "1s", "--endpoint", "ipc:///nowhere"]
    assert cli.main(argv + ["--json"]) == 3
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert doc["timed_out"] is True and doc["follow_up"] == "tcctl node drain n1 --wait" and doc["request_id"]
    assert out.err == ""
    assert cli.main(argv) == 3
    out = capsys.readouterr()
    assert "tcctl node drain n1 --wait" in out.out and "remaining: 1 sandbox(es)" in out.out
    assert "follow with: tcctl node drain n1 --wait" in out.err
    assert out.err.count("still running") == 1  # the repeated PROGRESS shown once off a TTY
