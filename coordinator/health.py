"""Node health, derived and never stored (NODE-2, NODE-7, NODE-8).

Pure functions, so the lease loop, the admin views and the tests all compute health the
same way from the same inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Health(StrEnum):
    WARMING = "WARMING"
    READY = "READY"
    SUSPECT = "SUSPECT"
    LOST = "LOST"


class AdminState(StrEnum):
    ACTIVE = "ACTIVE"
    CORDONED = "CORDONED"
    DRAINING = "DRAINING"


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Heartbeat settings in seconds (CFG `heartbeat.*`)."""
    interval: float = 2.0
    max_rate: int = 20_000
    suspect_missed: float = 2.0
    lease_missed: float = 5.0
    lease_ttl_min: float = 15.0
    failover_grace: float = 30.0

    def effective_interval(self, node_count: int) -> float:
        """H = max(configured, nodes ÷ max_rate), so the total heartbeat rate stays under the cap (NODE-7)."""
        return max(self.interval, node_count / self.max_rate)

    def suspect_after(self, h: float) -> float:
        return self.suspect_missed * h

    def lost_after(self, h: float) -> float:
        return max(self.lease_ttl_min, self.lease_missed * h)


class Judge:
    """Health at one instant for many nodes: the thresholds are computed once per pass (the
    lease loop judges every node several times a second)."""

    __slots__ = ("now", "suspect_after", "lost_after", "in_grace")

    def __init__(self, *, now: float, h: float, t: Thresholds, grace_until: float) -> None:
        self.now = now
        self.suspect_after = t.suspect_after(h)
        self.lost_after = t.lost_after(h)
        self.in_grace = now < grace_until

    def of(self, last_seen: float | None, in_session: bool, mirror_complete: bool) -> Health:
        """* LOST once silent for max(lease_ttl_min, lease_missed·H) — except during the failover
          grace after a coordinator start, when it reads SUSPECT instead (NODE-8);
        * SUSPECT once silent for suspect_missed·H, or during the grace until it says HELLO again;
        * WARMING while its catalog mirror is incomplete (NODE-3);
        * READY otherwise."""
        if last_seen is None:
            return Health.SUSPECT if self.in_grace else Health.LOST
        age = self.now - last_seen
        if age > self.lost_after:
            return Health.SUSPECT if self.in_grace else Health.LOST
        if age > self.suspect_after:
            return Health.SUSPECT
        if not in_session:
            # Heard recently but without a live session (e.g. heartbeats of a session from before a
            # coordinator restart): not usable until it says HELLO again.
            return Health.SUSPECT
        if not mirror_complete:
            return Health.WARMING
        return Health.READY


def derive(*, now: float, last_seen: float | None, h: float, t: Thresholds, in_session: bool,
           mirror_complete: bool, grace_until: float) -> Health:
    """The health of one node at ``now`` (all times in seconds, same clock); see ``Judge.of``."""
    return Judge(now=now, h=h, t=t, grace_until=grace_until).of(last_seen, in_session, mirror_complete)


def placeable(health: Health, admin: AdminState | str, storage_mode: str) -> bool:
    """NODE-5: READY, ACTIVE, and storage healthy or warn."""
    return health is Health.READY and admin == AdminState.ACTIVE and storage_mode in ("healthy", "warn")
