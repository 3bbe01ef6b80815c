"""Reconnect backoff (SPEC WIRE-10): 0.5 s doubling to 30 s, full jitter, reset on WELCOME."""
from __future__ import annotations

import random

import pytest

from agent.backoff import Backoff


class _Top:
    """A random source that always draws the top of the range, to read the caps directly."""

    def uniform(self, lo: float, hi: float) -> float:
        return hi


def test_cap_doubles_from_initial_to_maximum() -> None:
    """WIRE-10: caps 0.5, 1, 2, … then stay at 30 s."""
    b = Backoff(0.5, 30.0, rng=_Top())  # type: ignore[arg-type]
    delays = [b.next_delay() for _ in range(10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]


def test_many_failures_stay_at_the_cap() -> None:
    """WIRE-10: no overflow after a long outage; the cap holds."""
    b = Backoff(0.5, 30.0, rng=_Top())  # type: ignore[arg-type]
    for _ in range(5000):
        last = b.next_delay()
    assert last == 30.0


def test_reset_returns_to_initial() -> None:
    """WIRE-10: WELCOME resets the backoff."""
    b = Backoff(0.5, 30.0, rng=_Top())  # type: ignore[arg-type]
    for _ in range(6):
        b.next_delay()
    b.reset()
    assert b.failures == 0
    assert b.next_delay() == 0.5


def test_full_jitter_draws_uniformly_below_the_cap() -> None:
    """WIRE-10: each delay is uniform(0, cap) — the same draws a seeded Random gives."""
    b = Backoff(0.5, 30.0, rng=random.Random(42))
    ref = random.Random(42)
    caps = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    for cap in caps:
        assert b.next_delay() == ref.uniform(0.0, cap)


def test_full_jitter_spreads_over_the_whole_window() -> None:
    """WIRE-10: with full jitter delays land anywhere in [0, cap], not near the cap only."""
    rng = random.Random(7)
    draws = []
    for _ in range(2000):
        b = Backoff(0.5, 30.0, rng=rng)
        for _ in range(7):
            b.next_delay()  # cap is now 30 s
        draws.append(b.next_delay())
    assert all(0.0 <= d <= 30.0 for d in draws)
    assert min(draws) < 1.5 and max(draws) > 28.5
    assert 13.0 < sum(draws) / len(draws) < 17.0  # mean of uniform(0, 30)


@pytest.mark.parametrize("initial,maximum", [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_bad_bounds_are_refused(initial: float, maximum: float) -> None:
    with pytest.raises(ValueError):
        Backoff(initial, maximum)
