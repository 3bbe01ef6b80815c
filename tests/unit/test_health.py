"""Health derivation and storage modes are pure functions (NODE-2, NODE-5, NODE-7, NODE-8, SNAP-15)."""
from __future__ import annotations

import pytest

from coordinator.health import AdminState, Health, Thresholds, derive, placeable
from coordinator.storage import storage_mode

T = Thresholds(interval=2.0, max_rate=20_000, suspect_missed=2, lease_missed=5, lease_ttl_min=15,
               failover_grace=30)


def h(age: float | None, *, in_session=True, mirror=True, now=1000.0, grace_until=0.0, hb=2.0) -> Health:
    return derive(now=now, last_seen=None if age is None else now - age, h=hb, t=T, in_session=in_session,
                  mirror_complete=mirror, grace_until=grace_until)


@pytest.mark.parametrize("age,want", [(0, Health.READY), (4.0, Health.READY), (4.01, Health.SUSPECT),
                                      (15.0, Health.SUSPECT), (15.01, Health.LOST), (None, Health.LOST)])
def test_thresholds_at_default_interval(age, want) -> None:
    """NODE-2: SUSPECT past 2H, LOST past max(15 s, 5H)."""
    assert h(age) is want


def test_lost_threshold_scales_with_interval() -> None:
    """NODE-7: with H = 5 s the lease is 25 s, not 15 s."""
    assert h(20.0, hb=5.0) is Health.SUSPECT
    assert h(25.01, hb=5.0) is Health.LOST


def test_warming_until_mirror_complete_and_suspect_without_session() -> None:
    """NODE-3: WARMING while the mirror is incomplete; a node heard without a session is not READY."""
    assert h(0.1, mirror=False) is Health.WARMING
    assert h(0.1, in_session=False) is Health.SUSPECT


def test_failover_grace_never_lost() -> None:
    """NODE-8: inside the grace a silent known node reads SUSPECT, never LOST."""
    assert h(100.0, grace_until=1000.5) is Health.SUSPECT
    assert h(None, grace_until=1000.5) is Health.SUSPECT
    assert h(100.0, grace_until=999.0) is Health.LOST


def test_effective_interval_keeps_total_rate_under_cap() -> None:
    """NODE-7: H = max(configured, nodes ÷ max_rate)."""
    assert T.effective_interval(10_000) == 2.0
    assert T.effective_interval(40_000) == 2.0
    assert T.effective_interval(100_000) == 5.0


def test_placeable_and_storage_modes() -> None:
    """NODE-5 and SNAP-15."""
    kw = dict(warn=70, reject=85, delete_only=95)
    st = lambda used: {"total": 100, "used": used, "free": 100 - used}  # noqa: E731
    assert storage_mode(Health.READY, st(69), **kw) == "healthy"
    assert storage_mode(Health.READY, st(70), **kw) == "warn"
    assert storage_mode(Health.READY, st(85), **kw) == "reject"
    assert storage_mode(Health.READY, st(95), **kw) == "delete_only"
    assert storage_mode(Health.READY, {"total": 0, "used": 5, "free": 0}, **kw) == "healthy"
    assert storage_mode(Health.SUSPECT, st(10), **kw) == "unknown"
    assert storage_mode(Health.READY, None, **kw) == "unknown"
    assert placeable(Health.READY, AdminState.ACTIVE, "warn")
    assert not placeable(Health.READY, AdminState.CORDONED, "healthy")
    assert not placeable(Health.READY, AdminState.ACTIVE, "reject")
    assert not placeable(Health.WARMING, AdminState.ACTIVE, "healthy")
