"""The event PUB endpoint (WIRE-18): ``job.<id>``, ``node.<id>``, ``template.<id>`` and
``snapshot.<id>`` topics, each event numbered by one per-coordinator sequence so a
subscriber that sees a gap knows to re-read state.

Frames: ``[topic] [b"TC1"] [b"EVENT"] [msgpack body]`` — the topic first, so SUB prefix
filters work.
"""
from __future__ import annotations

import logging
import secrets
import time
from typing import Any, Callable

import zmq

from protocol.envelope import PROTOCOL
from protocol.messages import Event

log = logging.getLogger(__name__)


Listener = Callable[[Event], None]


class EventBus:
    """Publishes on the PUB socket and to in-process listeners (the compat scanner, the
    catalog presence checks): one stream of facts, so a loop inside the coordinator sees
    exactly what a subscriber outside sees."""

    def __init__(self, sock: zmq.Socket | None) -> None:
        self._sock = sock
        self.seq = 0
        # Distinguishes this coordinator run, so a subscriber can tell a restart from a gap.
        self.epoch = secrets.token_hex(8)
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        """Call ``listener(event)`` on the event loop for every event. It must only note the
        event or schedule work (never block); an exception it raises is logged and dropped."""
        self._listeners.append(listener)

    def publish(self, topic: str, kind: str, data: dict[str, Any]) -> Event:
        self.seq += 1
        ev = Event(seq=self.seq, topic=topic, ts=int(time.time() * 1000), kind=kind, data=data, epoch=self.epoch)
        if self._sock is not None:
            try:
                self._sock.send_multipart([topic.encode(), PROTOCOL, b"EVENT", ev.encode()], zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # a slow subscriber never stalls the coordinator
                log.debug("event %s not sent: %s", topic, exc)
        for listener in self._listeners:
            try:
                listener(ev)
            except Exception:  # noqa: BLE001 — a listener's bug must not stop the publisher
                log.exception("event listener %r failed on %s %s", listener, topic, kind)
        return ev
