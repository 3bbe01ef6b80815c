"""What the compat commands share: the scanner from the context, READY nodes' trusted versions."""
from __future__ import annotations

from typing import Any

from protocol.errors import InvalidRequest


def scanner(ctx: Any) -> Any:
    if ctx.compat is None:
        raise InvalidRequest("compat scans are not served by this coordinator", {"field": "command"})
    return ctx.compat


def ready_versions(ctx: Any) -> dict[str, dict[str, str]]:
    """NODE-11: trusted versions of READY nodes only, read on the event loop thread."""
    from ...health import Health
    reg = ctx.nodes
    now = reg.clock()
    return {nid: reg.trusted_versions(n, now) for nid, n in sorted(reg.nodes.items())
            if reg.health(n, now) is Health.READY}
