"""Per-peer bad-message accounting (WIRE-2, SEC-8).

Every dropped or refused frame is counted against the peer identity it came from. A peer
that sends more than ``max_bad`` bad messages within a minute is ignored for
``cooldown`` seconds. The table is bounded: hostile peers can invent identities, so the
oldest entries are evicted past ``max_peers``.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable


@dataclass(slots=True)
class PeerCounters:
    bad: int = 0          # refused with an error reply
    dropped: int = 0      # dropped without a reply
    ignored: int = 0      # arrived during the peer's cooldown
    window_start: float = 0.0
    window_bad: int = 0
    ignored_until: float = 0.0


class PeerTable:
    def __init__(self, max_bad: int = 100, cooldown: float = 60.0, max_peers: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bad = max_bad
        self.cooldown = cooldown
        self.max_peers = max_peers
        self.clock = clock
        self._peers: OrderedDict[bytes, PeerCounters] = OrderedDict()
        self.total_bad = 0
        self.total_dropped = 0
        self.total_ignored = 0  # messages from peers in their SEC-8 cooldown

    def get(self, peer: bytes) -> PeerCounters | None:
        return self._peers.get(peer)

    def ignored(self, peer: bytes) -> bool:
        """True (and counted) while ``peer`` is in its cooldown."""
        c = self._peers.get(peer)
        if c is not None and c.ignored_until > self.clock():
            c.ignored += 1
            self.total_ignored += 1
            return True
        return False

    def totals(self) -> dict[str, int]:
        return {"refused": self.total_bad, "dropped": self.total_dropped, "ignored": self.total_ignored}

    def record(self, peer: bytes, *, dropped: bool) -> PeerCounters:
        now = self.clock()
        c = self._peers.get(peer)
        if c is None:
            c = self._peers[peer] = PeerCounters(window_start=now)
            if len(self._peers) > self.max_peers:
                self._peers.popitem(last=False)
        else:
            self._peers.move_to_end(peer)
        if dropped:
            c.dropped += 1
            self.total_dropped += 1
        else:
            c.bad += 1
            self.total_bad += 1
        if now - c.window_start > 60.0:
            c.window_start, c.window_bad = now, 0
        c.window_bad += 1
        if c.window_bad > self.max_bad:
            c.ignored_until = now + self.cooldown
        return c
