"""The node registry: live session state in memory, durable state in the database.

Heartbeats touch memory only; ``flush()`` writes ``last_seen`` and storage in one batch per
``heartbeat.last_seen_flush`` (NODE-9). HELLO, versions and admin-state changes are written
before they are acknowledged. All methods run on the event loop thread; database work is
pushed to worker threads, serialised per node by a per-node lock (never a global one).
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import Engine

from protocol.canonical import digest
from protocol.errors import MalformedMessage, NodeNotFound, SessionUnknown
from protocol.messages import Heartbeat, HeartbeatAck, Hello, Versions, Welcome

from .db import node_store
from .events import EventBus
from .health import AdminState, Health, Judge, Thresholds

log = logging.getLogger(__name__)
_NO_STORAGE: dict[str, int] = {}


@dataclass(slots=True)
class LiveNode:
    node_id: str
    admin_state: str = AdminState.ACTIVE
    address: str = ""
    blob_endpoint: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    capabilities: dict[str, bool] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    facts_digest: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    versions_digest: str = ""
    # Persisted mirror identity (epoch, seq, digest) and whether it equals the node's catalog.
    mirror: tuple[str, int, str] = ("", 0, "")
    mirror_complete: bool = False
    created_ms: int = 0
    last_seen: float | None = None
    session_id: str | None = None
    session_started: float | None = None
    interval_sent: float = 0.0
    beat_seq: int = 0
    reported_catalog: tuple[int, str] = (0, "")
    catalog_mismatch_beats: int = 0
    # When we last asked for a full snapshot; while one is on its way we do not ask again.
    snapshot_asked: float | None = None
    storage: dict[str, int] | None = None
    storage_at: float | None = None
    mem_free: int | None = None
    sandboxes: int = 0
    # Runtime refs (WIRE-8, WIRE-9, SNAP-19): the digest of the last report applied (None: none
    # yet in this process, so ask once), and of one received but not applied yet (so a beat
    # right behind it does not ask for it again).
    refs_digest: str | None = None
    refs_pending: str | None = None
    health: Health = Health.SUSPECT  # last value the lease loop published; views re-derive
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class NodeRegistry:
    def __init__(self, engine: Engine, thresholds: Thresholds, events: EventBus,
                 clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.t = thresholds
        self.events = events
        self.clock = clock
        self.nodes: dict[str, LiveNode] = {}
        self._dirty: set[str] = set()
        self.started = clock()
        self.grace_until = self.started + thresholds.failover_grace
        self.heartbeats = 0

    # --- start-up ------------------------------------------------------------------
    def load(self) -> None:
        """Read every node row; called once before the endpoints serve (GC-13)."""
        for row in node_store.load_nodes(self.engine):
            n = LiveNode(
                node_id=row["id"], admin_state=row["admin_state"], address=row["address"],
                blob_endpoint=row["blob_endpoint"], labels=row["labels"] or {},
                capabilities=row["capabilities"] or {}, facts=row["facts"] or {},
                facts_digest=row["facts_digest"], versions=row["versions"],
                versions_digest=row["versions_digest"],
                mirror=(row["catalog_epoch"], row["catalog_seq"], row["catalog_digest"]),
                created_ms=row["created_ms"],
                last_seen=row["last_seen_ms"] / 1000 if row["last_seen_ms"] is not None else None,
                mem_free=row["mem_free"], sandboxes=row["sandboxes"] or 0)
            if row["storage_total"] is not None:
                n.storage = {"total": row["storage_total"], "used": row["storage_used"],
                             "free": row["storage_free"]}
                n.storage_at = (row["storage_at_ms"] or 0) / 1000
            n.health = self.health(n)
            self.nodes[n.node_id] = n

    # --- derived views --------------------------------------------------------------
    def interval(self) -> float:
        return self.t.effective_interval(len(self.nodes))

    def judge(self, now: float | None = None) -> Judge:
        return Judge(now=self.clock() if now is None else now, h=self.interval(), t=self.t,
                     grace_until=self.grace_until)

    def health(self, n: LiveNode, now: float | None = None, judge: Judge | None = None) -> Health:
        j = judge or self.judge(now)
        return j.of(n.last_seen, n.session_id is not None, n.mirror_complete)

    def trusted_versions(self, n: LiveNode, now: float | None = None) -> dict[str, str]:
        """NODE-11: versions count only from READY nodes; for any other node every version reads
        unknown (""), never a stale stored value. Compat, matrix and resolve read them here."""
        if self.health(n, now) is not Health.READY:
            return {k: "" for k in n.versions}
        return dict(n.versions)

    def get(self, node_id: str) -> LiveNode:
        n = self.nodes.get(node_id)
        if n is None:
            raise NodeNotFound(f"node {node_id} is not known", {"node": node_id})
        return n

    # --- session messages -----------------------------------------------------------
    async def hello(self, msg: Hello) -> Welcome:
        """WIRE-6, NODE-1: create or refresh the node, then open a new session."""
        node_id = msg.node_id
        n = self.nodes.get(node_id)
        created = n is None
        if n is None:
            n = LiveNode(node_id=node_id)
        async with n.lock:
            now = self.clock()
            facts_digest = digest(msg.facts)
            versions_digest = digest(msg.versions)
            facts_changed = facts_digest != n.facts_digest
            versions_changed = versions_digest != n.versions_digest
            await asyncio.to_thread(
                node_store.upsert_hello, self.engine, node_id=node_id, now_ms=int(now * 1000),
                address=msg.address, blob_endpoint=msg.blob_endpoint, labels=msg.labels,
                capabilities=msg.capabilities, facts=msg.facts if facts_changed else None,
                facts_digest=facts_digest, versions=msg.versions if versions_changed else None,
                versions_digest=versions_digest)
            if created:
                self.nodes[node_id] = n
                n.created_ms = int(now * 1000)
            n.address, n.blob_endpoint = msg.address, msg.blob_endpoint
            n.labels, n.capabilities = msg.labels, msg.capabilities
            n.facts, n.facts_digest = msg.facts, facts_digest
            n.versions, n.versions_digest = msg.versions, versions_digest
            cat = msg.catalog
            # NODE-3: READY at once when HELLO matches the persisted mirror, else WARMING until a snapshot lands.
            n.mirror_complete = (cat["epoch"], cat["seq"], cat["digest"]) == n.mirror and bool(n.mirror[0])
            n.reported_catalog = (cat["seq"], cat["digest"])
            n.catalog_mismatch_beats = 0
            n.snapshot_asked = None if n.mirror_complete else now
            n.session_id = secrets.token_hex(16)
            n.session_started = now
            n.last_seen = now
            n.beat_seq = 0
            h = self.interval()
            n.interval_sent = h
            self._dirty.add(node_id)
        if created:
            self.events.publish(f"node.{node_id}", "created", {"node": node_id, "address": msg.address})
        elif versions_changed:  # as on VERSIONS: compat scans listen for it (COMPAT-4)
            self.events.publish(f"node.{node_id}", "versions", {"node": node_id, "versions": msg.versions})
        self.events.publish(f"node.{node_id}", "session", {"node": node_id, "session": n.session_id[:8],
                                                           "mirror_complete": n.mirror_complete})
        log.info("node %s: session %s (%s)%s", node_id, n.session_id[:8], msg.address,
                 " new node" if created else "")
        return Welcome(parent_id=msg.msg_id, session_id=n.session_id, heartbeat_interval=int(h * 1000),
                       lease_ttl=int(self.t.lost_after(h) * 1000), want_full_catalog=not n.mirror_complete)

    def touch(self, node_id: str) -> LiveNode | None:
        """Any message from a known node refreshes its last_seen (WIRE-9)."""
        n = self.nodes.get(node_id)
        if n is not None:
            n.last_seen = self.clock()
            self._dirty.add(node_id)
        return n

    def session(self, node_id: str, session_id: str) -> LiveNode:
        n = self.touch(node_id)
        if n is None or n.session_id is None or n.session_id != session_id:
            raise SessionUnknown("no live session for this node; send HELLO", {"node": node_id})
        return n

    def heartbeat(self, node_id: str, msg: Heartbeat) -> HeartbeatAck | None:
        """The hot path (WIRE-8): memory only, no database write. None means the plain ACK
        (no new interval, nothing wanted), which the endpoint sends without building one."""
        n = self.session(node_id, msg.session_id)
        self.heartbeats += 1
        n.beat_seq = msg.seq
        n.storage, n.storage_at = msg.storage, n.last_seen
        n.mem_free, n.sandboxes = msg.mem_free, msg.sandboxes
        wants: list[str] = []
        if msg.versions_digest != n.versions_digest:
            wants.append("versions")
        if msg.refs_digest not in (n.refs_digest, n.refs_pending) and n.mirror_complete:
            wants.append("refs")  # reports count only from READY nodes (SNAP-19)
        reported = (msg.catalog_seq, msg.catalog_digest)
        n.reported_catalog = reported
        h = self.interval()
        if (n.mirror[1], n.mirror[2]) != reported or not n.mirror_complete:
            # A delta may be in flight, so a gap must outlive a beat; and a snapshot already asked
            # for is not asked again until it had time to arrive (CAT-5).
            n.catalog_mismatch_beats += 1
            waiting = n.snapshot_asked is not None and n.last_seen - n.snapshot_asked < max(10.0, 5 * h)
            if (n.catalog_mismatch_beats >= 2 or not n.mirror_complete) and not waiting:
                wants.append("catalog")
                n.catalog_mismatch_beats = 0
                n.snapshot_asked = n.last_seen
        else:
            n.catalog_mismatch_beats = 0
        interval = None
        if h != n.interval_sent:
            n.interval_sent = h
            interval = int(h * 1000)
        if interval is None and not wants:
            return None
        return HeartbeatAck(parent_id=msg.msg_id, interval=interval, wants=wants or None)

    async def versions(self, node_id: str, msg: Versions) -> None:
        """WIRE-9: full versions, written only when the digest changed (NODE-9)."""
        n = self.session(node_id, msg.session_id)
        if digest(msg.versions) != msg.digest:
            raise MalformedMessage("VERSIONS digest does not match its versions", {"field": "digest"})
        async with n.lock:
            if msg.digest == n.versions_digest:
                return
            await asyncio.to_thread(node_store.write_versions, self.engine, node_id, msg.versions,
                                    msg.digest, int(self.clock() * 1000))
            n.versions, n.versions_digest = msg.versions, msg.digest
        self.events.publish(f"node.{node_id}", "versions", {"node": node_id, "versions": msg.versions})

    # --- admin state ------------------------------------------------------------------
    async def set_admin_state(self, node_id: str, state: AdminState) -> LiveNode:
        """NODE-4: persisted, independent of health, idempotent."""
        n = self.get(node_id)
        async with n.lock:
            if n.admin_state != state:
                ok = await asyncio.to_thread(node_store.set_admin_state, self.engine, node_id, str(state),
                                             int(self.clock() * 1000))
                if not ok:
                    raise NodeNotFound(f"node {node_id} is not known", {"node": node_id})
                old, n.admin_state = n.admin_state, state
                self.events.publish(f"node.{node_id}", "admin_state",
                                    {"node": node_id, "old": str(old), "new": str(state)})
        return n

    # --- batching ---------------------------------------------------------------------
    def take_dirty(self) -> list[tuple[Any, ...]]:
        """Rows for ``node_store.flush_seen``: plain tuples, cheap to build for 10k nodes a second."""
        rows = []
        nodes = self.nodes
        for node_id in self._dirty:
            n = nodes.get(node_id)
            if n is None or n.last_seen is None:
                continue
            st = n.storage or _NO_STORAGE
            rows.append((int(n.last_seen * 1000), st.get("total"), st.get("used"), st.get("free"),
                         int(n.storage_at * 1000) if n.storage_at else None, n.mem_free, n.sandboxes, node_id))
        self._dirty.clear()
        return rows

    async def flush(self) -> int:
        rows = self.take_dirty()
        if not rows:
            return 0
        try:
            return await asyncio.to_thread(node_store.flush_seen, self.engine, rows)
        except Exception:
            # Keep them for the next flush: a flaky database must not lose last_seen.
            self._dirty.update(r[-1] for r in rows)
            raise
