"""What one agent↔coordinator connection carries between its steps (SPEC WIRE-4, WIRE-11, HA-4).

Small value types of :mod:`agent.session`: why a connection ended (:class:`Leave`), a frame
of another protocol major (:class:`Foreign`), the state of one live session (:class:`_Live`),
message ids (:class:`MsgIds`) and what HELLO carries (:class:`HelloInfo`). Split off so the
session module keeps the connection loop.
"""
from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True, slots=True)
class Leave:
    """Why a connection ended and where to go next: "next", "same" or an endpoint (HA-4)."""
    reason: str
    goto: str = "next"


@dataclass(frozen=True, slots=True)
class Foreign:
    """A frame in another major of the protocol (``TC<n>``, WIRE-1)."""
    got: str


@dataclass
class _Live:
    """State of one live session (after WELCOME)."""
    session_id: str
    interval: float
    liveness: float
    first_msg: int          # our msg counter at its HELLO: replies to older ids are stale
    versions_digest: str    # last versions digest the coordinator has (HELLO or VERSIONS)
    beat_seq: int = 0
    next_beat: float = 0.0
    last_heard: float = 0.0
    # Snapshot pages and deltas must not interleave: the feed's cursor moves with what was sent.
    catalog_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    lost_logged: bool = False
    refs_sent: str = ""     # digest of the last RUNTIME_REFS sent ("" = none: the empty report)


class MsgIds:
    """``msg_id`` = random per-process prefix + counter: unique per sender, even across restarts (WIRE-4)."""

    def __init__(self) -> None:
        self.prefix = secrets.token_hex(6)
        self.count = 0

    def next(self) -> str:
        self.count += 1
        return f"{self.prefix}-{self.count}"

    def number(self, msg_id: str | None) -> int | None:
        """The counter of one of our ids, None for an id we did not make."""
        head, _, n = (msg_id or "").partition("-")
        return int(n) if head == self.prefix and n.isdigit() else None


@dataclass
class HelloInfo:
    """What HELLO carries besides facts, versions and catalog (those are read per HELLO)."""
    node_id: str
    blob_endpoint: str
    labels: dict[str, str]
    capabilities: dict[str, bool]
    reconcile: dict[str, Any]
    boot_ms: int
    facts: Callable[[], dict[str, Any]] = field(repr=False)
    sandboxes: Callable[[], int] = field(default=lambda: 0, repr=False)  # RUNNING ones, for heartbeats
