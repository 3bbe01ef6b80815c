"""Heartbeat-driven compat scans (COMPAT-4), a background loop module (STYLE 11).

Triggers, all from the coordinator's event stream (``EventBus.listen``):

* ``node.<id>`` ``versions`` — a changed versions digest (VERSIONS, or a HELLO that brought
  new versions) → a scan of that node after the debounce (``compat.debounce``, 5 s);
* ``session`` with a complete mirror, ``health`` turning READY, a full ``catalog`` snapshot
  applied — the node became READY (WARMING→READY, or back from SUSPECT) → a debounced scan;
* coordinator start → every READY node (``run`` begins with ``schedule_ready``).

Debounce is per node and does not slide: the first event fixes the due time, later events
before it are folded in, so a scan lands within the debounce of the first change. At most one
scan per node is in flight; one that falls due meanwhile waits for it. A scan that outlives
``compat.scan_timeout`` is reported as a Timeout, and the node stays busy until its
transaction ends (a second scan never overlaps it).

``run_once`` scans the nodes that are due now and returns what changed: what tests call.
Cluster locks (HA-5) come with scale-out; one coordinator runs this loop today.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy.engine import Engine

from protocol.errors import NodeNotFound, TCError, Timeout
from protocol.messages import Event

from ..health import Health
from ..nodes import NodeRegistry
from . import store

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ScanResult:
    node: str
    scanned: int = 0
    changes: list[store.Change] = field(default_factory=list)
    error: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"node_id": self.node, "scanned": self.scanned, "changes": [c.to_dict() for c in self.changes],
                "error": self.error}


class CompatScanner:
    def __init__(self, registry: NodeRegistry, engine: Engine, *, debounce: float, scan_timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.reg = registry
        self.engine = engine
        self.debounce = debounce
        self.scan_timeout = scan_timeout
        self.clock = clock
        self._due: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._wake = asyncio.Event()
        self._running: set[asyncio.Task[Any]] = set()
        self.scans = 0  # completed scans, for `node show`-style counters and tests

    # --- triggers --------------------------------------------------------------------------

    def on_event(self, ev: Event) -> None:
        """EventBus listener: note the node, never block (the publisher is the event loop)."""
        if not ev.topic.startswith("node."):
            return
        node = ev.topic[len("node."):]
        data = ev.data or {}
        if (ev.kind == "versions"
                or (ev.kind == "session" and data.get("mirror_complete"))
                or (ev.kind == "health" and data.get("new") == Health.READY)
                or (ev.kind == "catalog" and not data.get("delta"))):
            self.schedule(node)

    def schedule(self, node_id: str, delay: float | None = None) -> None:
        """A scan of the node after ``delay`` (default the debounce); one already pending keeps
        its earlier due time."""
        due = self.clock() + (self.debounce if delay is None else delay)
        if node_id not in self._due or due < self._due[node_id]:
            self._due[node_id] = due
            self._wake.set()

    def schedule_ready(self) -> list[str]:
        """COMPAT-4 at start: every READY node, now."""
        nodes = [nid for nid, n in sorted(self.reg.nodes.items()) if self.reg.health(n) is Health.READY]
        for nid in nodes:
            self.schedule(nid, delay=0.0)
        return nodes

    def pending(self) -> dict[str, float]:
        return dict(self._due)

    # --- scanning --------------------------------------------------------------------------

    def busy(self, node_id: str) -> bool:
        lock = self._locks.get(node_id)
        return lock is not None and lock.locked()

    async def scan(self, node_id: str) -> ScanResult:
        """Scan one node now (after any scan of it in flight). NodeNotFound for an unknown node;
        a timeout or a database error is reported in the result, not raised."""
        n = self.reg.get(node_id)
        lock = self._locks.setdefault(node_id, asyncio.Lock())
        await lock.acquire()
        try:
            # NODE-11: read at scan time on the loop thread; a node that is not READY reads unknown.
            ready = self.reg.health(n) is Health.READY
            current = self.reg.trusted_versions(n)
            work = asyncio.ensure_future(asyncio.to_thread(
                store.scan_node, self.engine, node_id, current, ready, int(time.time() * 1000)))
        except BaseException:
            lock.release()
            raise
        work.add_done_callback(lambda _f: self._finished(lock))
        result = ScanResult(node_id)
        try:
            result.scanned, result.changes = await asyncio.wait_for(asyncio.shield(work), self.scan_timeout)
        except asyncio.TimeoutError:
            result.error = Timeout(f"compat scan of node {node_id} took longer than {self.scan_timeout:g}s",
                                   {"node": node_id}).to_wire()
        except TCError as exc:
            result.error = exc.to_wire()
        except Exception as exc:  # noqa: BLE001 — a flaky database fails this scan, not the loop
            log.exception("compat scan of node %s failed", node_id)
            result.error = TCError(f"compat scan of node {node_id} failed: {exc.__class__.__name__}",
                                   {"node": node_id}).to_wire()
        self.scans += 1
        for c in result.changes:
            log.info("compat: %s on %s %s -> %s", c.template_id, c.node_id, c.old, c.new)
            self.reg.events.publish(f"template.{c.template_id}", "compat", c.to_dict())
        return result

    def _finished(self, lock: asyncio.Lock) -> None:
        lock.release()
        self._wake.set()  # a node that fell due while busy can go now

    async def _scan_quiet(self, node_id: str) -> ScanResult:
        """A triggered scan. A node that is not READY (yet, or any more) is skipped rather than
        flipped to UNKNOWN and back: its READY transition schedules the scan that counts, and
        until then resolve and the matrix leave it out anyway (NODE-5, NODE-11)."""
        n = self.reg.nodes.get(node_id)
        if n is None or self.reg.health(n) is not Health.READY:
            return ScanResult(node_id)
        try:
            return await self.scan(node_id)
        except NodeNotFound:  # removed meanwhile (NODE-14): nothing to scan
            return ScanResult(node_id)

    def _take_due(self, now: float) -> list[str]:
        due = sorted(n for n, t in self._due.items() if t <= now and not self.busy(n))
        for n in due:
            del self._due[n]
        return due

    async def run_once(self, now: float | None = None) -> dict[str, ScanResult]:
        """Scan every node whose debounce has expired (in parallel); their results by node."""
        nodes = self._take_due(self.clock() if now is None else now)
        results = await asyncio.gather(*(self._scan_quiet(n) for n in nodes))
        return {r.node: r for r in results}

    async def run(self) -> None:
        self.schedule_ready()
        while True:
            try:
                for node in self._take_due(self.clock()):
                    task = asyncio.ensure_future(self._scan_quiet(node))
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
                waits = [t for n, t in self._due.items() if not self.busy(n)]
                timeout = min(waits) - self.clock() if waits else 60.0
                self._wake.clear()
                if timeout > 0:
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout)
                    except asyncio.TimeoutError:
                        pass
            except asyncio.CancelledError:
                for task in self._running:
                    task.cancel()
                raise
            except Exception:  # noqa: BLE001 — a bad pass must not end the loop
                log.exception("compat scanner pass failed")
                await asyncio.sleep(1.0)
