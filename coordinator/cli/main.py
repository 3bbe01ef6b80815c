"""``tcctl`` — subcommands generated from the coordinator's command registry (CLI-1..CLI-5).

Exit codes: 0 ok, 1 coordinator error, 2 usage, 3 ``--wait`` timed out with work pending,
4 coordinator unreachable. ``--json`` prints exactly one JSON document: the result, or
``{"error": {code, name, message, details}}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from protocol import ids
from protocol.errors import InvalidRequest, TCError, Timeout

from ..admin import commands as _commands  # noqa: F401 — registers every command
from ..admin.command import REGISTRY, Command
from .client import DEFAULT_ENDPOINT, AdminClient, Unreachable

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_WAIT, EXIT_UNREACHABLE = 0, 1, 2, 3, 4


def _common() -> argparse.ArgumentParser:
    c = argparse.ArgumentParser(add_help=False)
    g = c.add_argument_group("common options")
    g.add_argument("--json", action="store_true", help="print one JSON document")
    g.add_argument("--endpoint", action="append", default=None, metavar="ENDPOINT",
                   help=f"admin endpoint, repeatable (default: $TC_ADMIN, else {DEFAULT_ENDPOINT})")
    g.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="longest silence to wait for the coordinator (default 30)")
    return c


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tcctl", description="templatecenter admin CLI")
    groups = p.add_subparsers(dest="group", metavar="GROUP", required=True)
    common = _common()
    by_group: dict[str, Any] = {}
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        group, _, verb = name.partition(" ")
        if group not in by_group:
            gp = groups.add_parser(group, help=f"{group} commands")
            by_group[group] = gp.add_subparsers(dest="verb", metavar="COMMAND", required=True)
        sp = by_group[group].add_parser(verb, parents=[common], help=cls.summary, description=cls.summary)
        sp.set_defaults(command=name)
        for a in cls.all_args():
            if a.positional:
                sp.add_argument(a.name, metavar=a.metavar or a.name.upper(), help=a.help,
                                nargs=None if a.required else "?")
            elif a.flag:
                sp.add_argument(a.option, dest=a.name, action="store_true", help=a.help)
            else:
                sp.add_argument(a.option, dest=a.name, help=a.help, choices=a.choices, metavar=a.metavar)
    return p


def _emit_json(doc: Any) -> None:
    print(json.dumps(doc, sort_keys=True, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    cls: type[Command] = REGISTRY[ns.command]
    raw = {a.name: getattr(ns, a.name) for a in cls.all_args() if getattr(ns, a.name, None) is not None}
    generated_rid = None
    if cls.mutating and "request_id" not in raw:
        generated_rid = raw["request_id"] = ids.new_request_id()
    try:
        cls.validate(raw)  # usage errors are caught here, before anything is sent
    except InvalidRequest as exc:
        if ns.json:
            _emit_json({"error": exc.to_wire()})
        else:
            parser.exit(EXIT_USAGE, f"tcctl: {exc.message}\n")
        return EXIT_USAGE
    endpoints = ns.endpoint or [e for e in os.environ.get("TC_ADMIN", "").split(",") if e] or [DEFAULT_ENDPOINT]
    if generated_rid and not ns.json:
        print(f"request id: {generated_rid}", file=sys.stderr)
    client = AdminClient(endpoints, timeout=ns.timeout)
    progress = None if ns.json else (lambda m: print(f"… {m.message or 'working'}", file=sys.stderr))
    try:
        result = client.request(ns.command, raw, progress)
    except Unreachable as exc:
        err = Timeout(str(exc), {"command": ns.command, "attempts": exc.attempts})
        if ns.json:
            _emit_json({"error": err.to_wire()})
        else:
            print(f"tcctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except TCError as exc:
        if ns.json:
            _emit_json({"error": exc.to_wire()})
        else:
            details = f" {json.dumps(exc.details, sort_keys=True)}" if exc.details else ""
            print(f"tcctl: {exc.name}: {exc.message}{details}", file=sys.stderr)
        return EXIT_ERROR
    if ns.json:
        if generated_rid and isinstance(result, dict):
            result = {**result, "request_id": generated_rid}
        _emit_json(result)
    else:
        from rich.console import Console
        cls().render(result, Console(highlight=False))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
