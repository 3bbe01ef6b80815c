"""The lease loop: re-derives every node's health and publishes the changes (NODE-2, NODE-8).

Health is never stored; this loop only remembers the last value it published, so that a
transition (READY → SUSPECT → LOST, or back) becomes one ``node.<id>`` event and one log
line. Later issues hang NODE-12's reactions (failing a LOST node's tasks) off the same
transitions. ``run_once`` is what tests call.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from .health import Health
from .nodes import NodeRegistry

log = logging.getLogger(__name__)

Listener = Callable[[str, Health, Health], None]


class LeaseLoop:
    def __init__(self, registry: NodeRegistry, period: float | None = None) -> None:
        # None: a quarter of the heartbeat interval, within 50 ms..1 s — transitions land within
        # H/4 of their threshold, and a pass over 10k nodes (a few ms) runs at most 4 times per H.
        self.reg = registry
        self.fixed_period = period
        self.listeners: list[Listener] = []

    def run_once(self, now: float | None = None) -> list[tuple[str, Health, Health]]:
        judge = self.reg.judge(now)
        now = judge.now
        changes = []
        of = judge.of
        for n in self.reg.nodes.values():
            new = of(n.last_seen, n.session_id is not None, n.mirror_complete)
            if new is not n.health:
                changes.append((n.node_id, n.health, new))
                n.health = new
        if len(changes) > 20:  # a mass transition (coordinator stall, network split): one line
            summary: dict[str, int] = {}
            for _, old, new in changes:
                summary[f"{old}->{new}"] = summary.get(f"{old}->{new}", 0) + 1
            log.warning("%d nodes changed health: %s", len(changes),
                        ", ".join(f"{k} {v}" for k, v in sorted(summary.items())))
        for node_id, old, new in changes:
            age = self._age(node_id, now)
            if len(changes) <= 20:
                log.info("node %s: %s -> %s (silent %.1fs)", node_id, old, new, age)
            self.reg.events.publish(f"node.{node_id}", "health",
                                    {"node": node_id, "old": str(old), "new": str(new),
                                     "silent_ms": int(age * 1000)})
            for fn in self.listeners:
                fn(node_id, old, new)
        return changes

    def _age(self, node_id: str, now: float) -> float:
        last = self.reg.nodes[node_id].last_seen
        return now - last if last is not None else float("inf")

    async def run(self) -> None:
        while True:
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 — a bad pass must not end the loop
                log.exception("lease loop pass failed")
            await asyncio.sleep(self.period)

    @property
    def period(self) -> float:
        if self.fixed_period is not None:
            return self.fixed_period
        return min(1.0, max(0.05, self.reg.interval() / 4))


class FlushLoop:
    """Writes batched last_seen and storage figures (NODE-9)."""

    def __init__(self, registry: NodeRegistry, period: float) -> None:
        self.reg = registry
        self.period = period

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            try:
                await self.reg.flush()
            except Exception:  # noqa: BLE001 — rows stay dirty and go with the next flush
                log.exception("last_seen flush failed")
