"""``tcctl`` — subcommands generated from the coordinator's command registry (CLI-1..CLI-5).

Exit codes: 0 ok, 1 coordinator error, 2 usage, 3 ``--wait`` timed out with work pending,
4 coordinator unreachable. ``--json`` prints exactly one JSON document on stdout in every
case: the result, or ``{"error": {code, name, message, details}}`` — usage errors included.
Without ``--json``, PROGRESS from a slow command is shown on stderr (``progress.py``).

``tcctl completion bash`` is local: it prints a completion script and sends nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn

from pathlib import Path

from protocol import ids
from protocol import keys as curve
from protocol.keys import KeyPair
from protocol.errors import InvalidRequest, TCError, Timeout

from ..admin import commands as _commands  # noqa: F401 — registers every command
from ..admin.command import REGISTRY, Command
from .client import DEFAULT_ENDPOINT, AdminClient, Unreachable

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_WAIT, EXIT_UNREACHABLE = 0, 1, 2, 3, 4


class UsageError(Exception):
    """argparse found a usage error; main turns it into exit 2 (and JSON with --json)."""

    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    # argparse would print and exit; raising lets main keep --json output one JSON document.
    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.format_usage())


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("templatecenter")
    except Exception:  # noqa: BLE001 — running from a source tree without metadata
        return "unknown"


DEFAULT_KEY_DIR = Path("~/.config/templatecenter").expanduser()


def _common() -> argparse.ArgumentParser:
    c = argparse.ArgumentParser(add_help=False)
    g = c.add_argument_group("common options")
    g.add_argument("--json", action="store_true", help="print one JSON document")
    g.add_argument("--endpoint", action="append", default=None, metavar="ENDPOINT",
                   help=f"admin endpoint, repeatable (default: $TC_ADMIN, else {DEFAULT_ENDPOINT})")
    g.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="longest silence to wait for the coordinator (default 30)")
    g.add_argument("--server-key", default=None, metavar="KEY",
                   help="the coordinator's public key for tcp:// endpoints (CURVE; default $TC_SERVER_KEY)")
    g.add_argument("--key-dir", default=None, metavar="DIR",
                   help=f"where this client's CURVE key pair lives (default $TC_KEY_DIR, else {DEFAULT_KEY_DIR})")
    return c


COMPLETION_HELP = """\
print a shell completion script; install it with:
  source <(tcctl completion bash)
or for every shell: tcctl completion bash > /etc/bash_completion.d/tcctl"""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tcctl", description="templatecenter admin CLI",
                epilog="exit codes: 0 ok, 1 coordinator error, 2 usage, 3 --wait timed out, 4 unreachable")
    p.add_argument("--version", action="version", version=f"tcctl {_version()}")
    groups = p.add_subparsers(dest="group", metavar="GROUP", required=True)
    common = _common()
    # Subparser actions by word prefix: ("template",) holds "create", "alias", …; ("template",
    # "alias") holds "set" — a command name may have more than two words (template alias set).
    levels: dict[tuple[str, ...], Any] = {(): groups}
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        words = tuple(name.split(" "))
        for depth in range(1, len(words)):
            prefix = words[:depth]
            if prefix not in levels:
                parent = levels[prefix[:-1]]
                gp = parent.add_parser(prefix[-1], help=f"{' '.join(prefix)} commands")
                levels[prefix] = gp.add_subparsers(dest="verb" if depth == 1 else f"verb{depth}",
                                                   metavar="COMMAND", required=True)
        sp = levels[words[:-1]].add_parser(words[-1], parents=[common], help=cls.summary, description=cls.summary)
        sp.set_defaults(command=name)
        for a in cls.all_args():
            if not a.cli:
                continue
            if a.positional:
                sp.add_argument(a.name, metavar=a.metavar or a.name.upper(), help=a.help,
                                nargs="*" if a.many else None if a.required else "?")  # many: a list
            elif a.flag:
                sp.add_argument(a.option, dest=a.name, action="store_true", help=a.help)
            else:
                sp.add_argument(a.option, dest=a.name, help=a.help, choices=a.choices, metavar=a.metavar)
    cp = groups.add_parser("completion", help="print a shell completion script",
                           description=COMPLETION_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    shells = cp.add_subparsers(dest="verb", metavar="SHELL", required=True)
    shells.add_parser("bash", parents=[common], help="bash completion: source <(tcctl completion bash)",
                      description=COMPLETION_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
                      ).set_defaults(command=None, local="completion bash")
    kp = groups.add_parser("key", help="this client's CURVE key (for a TCP admin endpoint)")
    kv = kp.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    kv.add_parser("show", parents=[common], help="print this client's public key; list it in the "
                  "coordinator's admin.allowed_keys").set_defaults(command=None, local="key show")
    return p


def _client_keys(ns: argparse.Namespace) -> KeyPair:
    """This client's key pair, made (secret 0600) on first use."""
    key_dir = ns.key_dir or os.environ.get("TC_KEY_DIR") or str(DEFAULT_KEY_DIR)
    return curve.load_or_create(key_dir, "tcctl")


def _emit_json(doc: Any) -> None:
    print(json.dumps(doc, sort_keys=True, indent=2))


def _usage(exc_message: str, as_json: bool, details: dict[str, Any] | None = None, usage: str = "") -> int:
    if as_json:
        _emit_json({"error": InvalidRequest(exc_message, details or {}).to_wire()})
    else:
        print(f"{usage}tcctl: {exc_message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except UsageError as exc:
        # Parsing failed, so ns is unknown: honour --json if it was anywhere on the line.
        return _usage(str(exc), "--json" in argv, {"reason": "usage", "usage": exc.usage.strip()}, exc.usage)
    if getattr(ns, "local", None) == "completion bash":
        from .completion import bash_script
        script = bash_script(REGISTRY)
        if ns.json:
            _emit_json({"shell": "bash", "script": script})
        else:
            sys.stdout.write(script)
        return EXIT_OK
    if getattr(ns, "local", None) == "key show":
        pair = _client_keys(ns)
        doc = {"public_key": pair.public, "fingerprint": curve.fingerprint(pair.public)}
        if ns.json:
            _emit_json(doc)
        else:
            print(f"{doc['public_key']}  ({doc['fingerprint']})")
        return EXIT_OK
    cls: type[Command] = REGISTRY[ns.command]
    raw = {a.name: getattr(ns, a.name) for a in cls.all_args() if getattr(ns, a.name, None) is not None}
    try:
        raw = cls.client_args(raw)
    except InvalidRequest as exc:
        if ns.json:
            _emit_json({"error": exc.to_wire()})
            return EXIT_USAGE
        return _usage(exc.message, False)
    generated_rid = None
    if cls.mutating and "request_id" not in raw:
        generated_rid = raw["request_id"] = ids.new_request_id()
    try:
        cls.validate(raw)  # usage errors are caught here, before anything is sent
    except InvalidRequest as exc:
        if ns.json:
            _emit_json({"error": exc.to_wire()})
            return EXIT_USAGE
        return _usage(exc.message, False)
    if ns.timeout <= 0:
        return _usage("--timeout must be a positive number of seconds", ns.json,
                      {"field": "timeout", "reason": "not positive"})
    endpoints = ns.endpoint or [e for e in os.environ.get("TC_ADMIN", "").split(",") if e] or [DEFAULT_ENDPOINT]
    if generated_rid and not ns.json:
        print(f"request id: {generated_rid}", file=sys.stderr)
    server_key = ns.server_key or os.environ.get("TC_SERVER_KEY") or None
    uses_tcp = any(e.startswith("tcp://") for e in endpoints)
    client = AdminClient(endpoints, timeout=ns.timeout, server_key=server_key,
                         client_keys=_client_keys(ns) if (uses_tcp and server_key) else None)
    from .progress import ProgressRenderer
    renderer = None if ns.json else ProgressRenderer()
    try:
        result = client.request(ns.command, raw, renderer)
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
    finally:
        if renderer is not None:
            renderer.close()
    timed_out = isinstance(result, dict) and result.get("timed_out") is True
    if ns.json:
        if cls.mutating and isinstance(result, dict):
            # CLI-2: the id used, generated or given, so a retry can reuse it.
            result = {**result, "request_id": raw["request_id"]}
        _emit_json(result)
    else:
        from rich.console import Console
        cls().render(result, Console(highlight=False))
        if timed_out:
            # CLI-4: say what is pending and how to follow, never just "timed out".
            follow = result.get("follow_up") or f"tcctl {ns.command} --wait"
            print(f"tcctl: wait timed out with work pending ({json.dumps(result.get('remaining'), sort_keys=True)}); "
                  f"follow with: {follow}", file=sys.stderr)
    return EXIT_WAIT if timed_out else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
