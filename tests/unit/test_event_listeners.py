"""In-process event listeners (WIRE-18): every published event reaches each listener in
order, and a failing listener neither stops the publisher nor the other listeners."""
from __future__ import annotations

from typing import Any

from coordinator.events import EventBus


def test_listeners_see_every_event_and_a_failing_one_is_contained(caplog: Any) -> None:
    bus = EventBus(None)
    seen: list[tuple[int, str, str]] = []

    def broken(_ev: Any) -> None:
        raise RuntimeError("listener bug")
    bus.listen(broken)
    bus.listen(lambda ev: seen.append((ev.seq, ev.topic, ev.kind)))
    bus.publish("node.n1", "health", {"node": "n1"})
    ev = bus.publish("node.n1", "catalog", {"node": "n1"})
    assert ev.seq == 2
    assert seen == [(1, "node.n1", "health"), (2, "node.n1", "catalog")]
    assert "listener bug" in caplog.text and "node.n1" in caplog.text
