"""The storage gate's mode (SNAP-15): a pure function of the latest heartbeat figures."""
from __future__ import annotations

from .health import Health


def usage_percent(total: int | None, used: int | None) -> float:
    if not total:
        return 0.0
    return min(used or 0, total) * 100.0 / total


def storage_mode(health: Health, storage: dict[str, int] | None, *, warn: float, reject: float,
                 delete_only: float, fresh: bool = True) -> str:
    """healthy < warn ≤ warn < reject ≤ reject < delete_only ≤ delete_only; unknown when the
    node is not READY or sent no figures within its lease."""
    if health is not Health.READY or storage is None or not fresh:
        return "unknown"
    u = usage_percent(storage.get("total"), storage.get("used"))
    if u >= delete_only:
        return "delete_only"
    if u >= reject:
        return "reject"
    if u >= warn:
        return "warn"
    return "healthy"
