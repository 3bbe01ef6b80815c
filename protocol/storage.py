"""Storage figures to a mode, and the refusal that names it (SNAP-15, SNAP-16) — shared by the
coordinator's gate (from heartbeat figures) and the agent's own gate (from its disk), so both
word a refusal the same way."""
from __future__ import annotations

from protocol.errors import NodeStorageBlocked

# SNAP-16: writes need one of these; deletes are always allowed.
WRITABLE = ("healthy", "warn")


def usage_percent(total: int | None, used: int | None) -> float:
    """SNAP-15: used × 100 / total, used clamped to total; 0 when total is 0 or missing."""
    if not total:
        return 0.0
    return min(used or 0, total) * 100.0 / total


def level(usage: float, *, warn: float, reject: float, delete_only: float) -> str:
    """healthy below ``warn``, then warn, reject, delete_only at their thresholds (in %)."""
    if usage >= delete_only:
        return "delete_only"
    if usage >= reject:
        return "reject"
    if usage >= warn:
        return "warn"
    return "healthy"


def blocked(node: str, usage: float, mode: str, action: str = "snapshot operations") -> NodeStorageBlocked:
    """SNAP-16's refusal ``{node, usage, mode}``. ``action`` names the write: "snapshot
    operations", "builds", "incoming transfers"."""
    usage = round(usage, 1)
    if mode == "unknown":
        message = f"storage state of node {node} is unknown"
    else:
        message = f"{action} are blocked on node {node} (usage={usage:g}%)"
    return NodeStorageBlocked(message, {"node": node, "usage": usage, "mode": mode})
