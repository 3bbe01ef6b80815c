"""Agent key acceptance (SEC-3, SEC-4, NODE-1).

CURVE proves which key a peer holds; this module decides what that key may do. Every key
state lives in the database (shared by coordinators) and in memory for the per-message
check:

* unknown → recorded ``pending`` at its first HELLO, which gets NodeKeyPending;
* ``pending`` → HELLO gets NodeKeyPending, other messages are dropped and counted;
* ``accepted`` → bound to the node id it claimed; a HELLO for another id gets Unauthorized,
  and so does another key claiming that id;
* ``rejected`` → the CURVE handshake itself fails (the ZAP handler says no).

At most ``max_pending`` keys wait; the oldest is evicted. A directory of pre-accepted public
keys (``NODE.key``) seeds accepted bindings at start, for provisioning.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import Engine

from protocol import ids
from protocol import keys as curve
from protocol.errors import InvalidRequest, NodeKeyPending, NodeNotFound, Unauthorized

from .db import key_store

log = logging.getLogger(__name__)


@dataclass(slots=True)
class KeyRecord:
    public_key: str
    fingerprint: str
    node_id: str
    state: str
    first_seen_ms: int
    last_seen_ms: int
    decided_ms: int | None = None

    def view(self) -> dict[str, Any]:
        # The public key is public; it is what `node accept` takes. Secrets never reach here.
        return {"fingerprint": self.fingerprint, "public_key": self.public_key, "node_id": self.node_id,
                "state": self.state, "first_seen": self.first_seen_ms, "last_seen": self.last_seen_ms,
                "decided": self.decided_ms}


class KeyRegistry:
    def __init__(self, engine: Engine, max_pending: int = 1000,
                 clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.max_pending = max_pending
        self.clock = clock
        self.keys: dict[str, KeyRecord] = {}
        self.by_node: dict[str, str] = {}  # node id -> its accepted key
        self._lock = asyncio.Lock()        # key-table decisions only; messages never wait on it

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def load(self) -> None:
        for row in key_store.load_keys(self.engine):
            rec = KeyRecord(**row)
            self.keys[rec.public_key] = rec
            if rec.state == "accepted":
                self.by_node[rec.node_id] = rec.public_key

    def seed(self, directory: str) -> int:
        """Pre-accept ``NODE.key`` files (public keys) unless the key or the node is already
        decided. Runs at start, before anything is served."""
        added = 0
        d = Path(directory)
        if not directory or not d.is_dir():
            return 0
        for path in sorted(d.glob("*.key")):
            node_id = path.stem
            if not ids.valid("node", node_id):
                log.warning("pre-accepted key %s: %r is not a node id; skipped", path, node_id)
                continue
            try:
                public = curve.load_public(path)
            except curve.KeyError_ as exc:
                log.warning("pre-accepted key skipped: %s", exc)
                continue
            if public in self.keys or node_id in self.by_node:
                continue
            key_store.insert_key(self.engine, public_key=public, fingerprint=curve.fingerprint(public),
                                 node_id=node_id, state="accepted", now_ms=self._now_ms())
            self.keys[public] = KeyRecord(public, curve.fingerprint(public), node_id, "accepted",
                                          self._now_ms(), self._now_ms(), self._now_ms())
            self.by_node[node_id] = public
            added += 1
        if added:
            log.info("pre-accepted %d key(s) from %s", added, d)
        return added

    # --- the hot checks --------------------------------------------------------------
    def allow_handshake(self, public: str) -> bool:
        """ZAP: every key completes the handshake except a rejected one (SEC-3, SEC-4)."""
        rec = self.keys.get(public)
        return rec is None or rec.state != "rejected"

    def accepted_node(self, public: str | None) -> str | None:
        """The node id an accepted key is bound to, else None (message dropped)."""
        rec = self.keys.get(public) if public else None
        return rec.node_id if rec is not None and rec.state == "accepted" else None

    # --- HELLO -----------------------------------------------------------------------
    async def on_hello(self, public: str, node_id: str) -> None:
        """Raise NodeKeyPending or Unauthorized unless ``public`` is accepted for ``node_id``."""
        async with self._lock:
            rec = self.keys.get(public)
            now = self._now_ms()
            fp = curve.fingerprint(public)
            holder = self.by_node.get(node_id)
            if holder is not None and holder != public:
                # NODE-1: the id is bound to another key; this key is not even recorded as pending.
                raise Unauthorized(f"node {node_id} is bound to another key", {"node": node_id,
                                                                               "fingerprint": fp})
            if rec is None:
                evict = self._evictions()
                await asyncio.to_thread(key_store.insert_key, self.engine, public_key=public, fingerprint=fp,
                                        node_id=node_id, state="pending", now_ms=now, evict=evict)
                for k in evict:
                    self.keys.pop(k, None)
                self.keys[public] = KeyRecord(public, fp, node_id, "pending", now, now)
                log.info("new agent key %s claims node %s: pending (tcctl node accept %s)", fp, node_id, node_id)
                raise NodeKeyPending(f"key {fp} awaits `tcctl node accept {node_id}`",
                                     {"fingerprint": fp, "node": node_id})
            if rec.state == "rejected":
                raise Unauthorized(f"key {fp} is rejected", {"fingerprint": fp})
            if rec.state == "pending":
                if rec.node_id != node_id or now - rec.last_seen_ms > 60_000:
                    await asyncio.to_thread(key_store.update_key, self.engine, public, node_id=node_id,
                                            last_seen_ms=now)
                    rec.node_id, rec.last_seen_ms = node_id, now
                raise NodeKeyPending(f"key {fp} awaits `tcctl node accept {node_id}`",
                                     {"fingerprint": fp, "node": node_id})
            if rec.node_id != node_id:
                raise Unauthorized(f"key {fp} is bound to node {rec.node_id}, not {node_id}",
                                   {"fingerprint": fp, "node": node_id, "bound_to": rec.node_id})
            rec.last_seen_ms = now

    def _evictions(self) -> list[str]:
        pending = sorted((r for r in self.keys.values() if r.state == "pending"), key=lambda r: r.first_seen_ms)
        extra = len(pending) + 1 - self.max_pending
        return [r.public_key for r in pending[:max(0, extra)]]

    # --- admin -------------------------------------------------------------------------
    def find(self, selector: str) -> KeyRecord:
        """A key by public key, fingerprint, or the node id it claims (one match only)."""
        if selector in self.keys:
            return self.keys[selector]
        matches = [r for r in self.keys.values() if selector in (r.fingerprint, r.fingerprint[7:], r.node_id)]
        if selector in self.by_node and len(matches) > 1:
            return self.keys[self.by_node[selector]]
        if not matches:
            raise NodeNotFound(f"no key or node matches {selector}", {"selector": selector})
        if len(matches) > 1:
            raise InvalidRequest(f"{len(matches)} keys match {selector}; name one by fingerprint",
                                 {"field": "key", "reason": "ambiguous",
                                  "candidates": sorted(r.fingerprint for r in matches)})
        return matches[0]

    async def accept(self, selector: str) -> KeyRecord:
        async with self._lock:
            rec = self.find(selector)
            holder = self.by_node.get(rec.node_id)
            if holder is not None and holder != rec.public_key:
                raise Unauthorized(f"node {rec.node_id} is bound to another key ({self.keys[holder].fingerprint})",
                                   {"node": rec.node_id, "bound_to": self.keys[holder].fingerprint})
            if rec.state != "accepted":
                now = self._now_ms()
                await asyncio.to_thread(key_store.update_key, self.engine, rec.public_key, state="accepted",
                                        decided_ms=now)
                rec.state, rec.decided_ms = "accepted", now
                self.by_node[rec.node_id] = rec.public_key
                log.info("key %s accepted for node %s", rec.fingerprint, rec.node_id)
            return rec

    async def reject(self, selector: str) -> KeyRecord:
        async with self._lock:
            rec = self.find(selector)
            if rec.state != "rejected":
                now = self._now_ms()
                await asyncio.to_thread(key_store.update_key, self.engine, rec.public_key, state="rejected",
                                        decided_ms=now)
                if self.by_node.get(rec.node_id) == rec.public_key:
                    del self.by_node[rec.node_id]
                rec.state, rec.decided_ms = "rejected", now
                log.info("key %s rejected (claimed node %s)", rec.fingerprint, rec.node_id)
            return rec

    def forget_node(self, node_id: str) -> None:
        """After `node remove` deleted its rows: rejoining needs a new accept (NODE-14)."""
        for k in [k for k, r in self.keys.items() if r.node_id == node_id]:
            del self.keys[k]
        self.by_node.pop(node_id, None)
