"""Reconnect backoff (SPEC WIRE-10): exponential with full jitter.

The cap doubles from ``initial`` up to ``maximum`` on every failure, and each delay is drawn
uniformly from [0, cap] ("full jitter"): after a coordinator restart a fleet of agents
spreads its HELLOs over the whole window instead of arriving in synchronised waves. A
WELCOME resets the cap. Pure logic; the random source is injected so tests can seed it.
"""
from __future__ import annotations

import random


class Backoff:
    """Delays for successive reconnect attempts; ``reset()`` after a successful WELCOME."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError("backoff needs 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self._rng = rng or random.Random()
        self._failures = 0

    @property
    def cap(self) -> float:
        """The upper bound of the next delay."""
        # min() before the power would overflow a float after ~1000 failures; clamp the exponent.
        return min(self.maximum, self.initial * 2.0 ** min(self._failures, 64))

    @property
    def failures(self) -> int:
        return self._failures

    def next_delay(self) -> float:
        """Draw the next delay in [0, cap] and double the cap for the attempt after."""
        delay = self._rng.uniform(0.0, self.cap)
        self._failures += 1
        return delay

    def reset(self) -> None:
        self._failures = 0
