"""``tc-coordinator [--config FILE] [--migrate] [--set section.key=value …]`` (CFG-2)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from protocol import daemon
from protocol.config import ConfigError
from protocol.errors import TCError

from .config import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tc-coordinator", description="templatecenter coordinator")
    p.add_argument("--config", help="TOML file (default: none; /etc/templatecenter/coordinator.toml under systemd)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one configuration key (repeatable)")
    p.add_argument("--migrate", action="store_true", help="bring the database schema to head before serving")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    daemon.setup_logging("tc-coordinator", "coordinator", getattr(logging, a.log_level.upper(), logging.INFO))
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        cfg = load_config(a.config, a.set)
        daemon.check_plain_tcp([cfg.coordinator.agent_endpoint, cfg.coordinator.admin_endpoint,
                                cfg.coordinator.events_endpoint], cfg.security.curve)
    except ConfigError as exc:
        print(f"tc-coordinator: config error: {exc}", file=sys.stderr)
        return 2
    from .server import serve
    try:
        asyncio.run(serve(cfg, migrate=a.migrate))
    except TCError as exc:
        print(f"tc-coordinator: {exc.name}: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
