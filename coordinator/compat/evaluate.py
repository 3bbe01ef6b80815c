"""The compat evaluation (COMPAT-1 to COMPAT-3): a pure function of a replica's pins, the
node's current trusted versions (NODE-11) and the template's policy. No clock, no database,
so the scanner, the matrix, DIST-7's evaluation at READY and the unit tests agree.
"""
from __future__ import annotations

from enum import StrEnum
from typing import Any, Mapping


class Compat(StrEnum):
    OK = "OK"
    STALE = "STALE"
    UNKNOWN = "UNKNOWN"
    MISSING = "MISSING"  # matrix only: no READY replica on the node (COMPAT-6)


class Policy(StrEnum):
    STRICT = "STRICT"
    GUEST_ONLY = "GUEST_ONLY"


# COMPAT-1: what every replica pins (and what the matrix shows as bound / current).
PINNED = ("guest_image", "agent", "hypervisor", "host_kernel")


def policy_of(spec: Mapping[str, Any] | None) -> Policy:
    """The template's policy from its stored spec; STRICT (the default, COMPAT-2) when the
    spec predates the field or holds something unexpected."""
    value = (spec or {}).get("compat_policy")
    return Policy(value) if value in Policy.__members__ else Policy.STRICT


def compared(policy: Policy | str, has_memory_snapshot: bool) -> tuple[str, ...]:
    """COMPAT-2: STRICT compares guest image, agent and hypervisor, plus the host kernel when
    the replica carries a memory snapshot (a restore needs the same kernel); GUEST_ONLY the
    guest image only."""
    if policy == Policy.GUEST_ONLY:
        return ("guest_image",)
    return ("guest_image", "agent", "hypervisor") + (("host_kernel",) if has_memory_snapshot else ())


def evaluate(policy: Policy | str, pins: Mapping[str, Any] | None, current: Mapping[str, Any] | None, *,
             node_ready: bool, has_memory_snapshot: bool = False) -> Compat:
    """COMPAT-3: UNKNOWN if the node is not READY or any compared value is empty or missing on
    either side; else STALE if one differs; else OK."""
    if not node_ready:
        return Compat.UNKNOWN
    pins, current = pins or {}, current or {}
    stale = False
    for key in compared(policy, has_memory_snapshot):
        bound, now = str(pins.get(key) or ""), str(current.get(key) or "")
        if not bound or not now:
            return Compat.UNKNOWN
        stale = stale or bound != now
    return Compat.STALE if stale else Compat.OK


def reports_every_compared(policy: Policy | str, current: Mapping[str, Any] | None,
                           has_memory_snapshot: bool = False) -> bool:
    """COMPAT-8's condition for adopting a baseline: the node reports every compared version."""
    current = current or {}
    return all(str(current.get(k) or "") for k in compared(policy, has_memory_snapshot))
