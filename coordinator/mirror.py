"""Per-node catalog mirrors (CAT-4, CAT-5, NODE-3).

A full CATALOG_SNAPSHOT arrives in pages tagged with the catalog's starting (epoch, seq);
pages are assembled in memory and the mirror is swapped in one transaction after the last
page, when the entries' digest matches. Deltas apply only on a matching epoch with
``from_seq`` equal to the mirror's seq; anything else waits for a snapshot.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from protocol.canonical import catalog_digest
from protocol.errors import MalformedMessage
from protocol.messages import CatalogDelta, CatalogSnapshot

from .db import node_store
from .nodes import LiveNode, NodeRegistry

log = logging.getLogger(__name__)
MAX_ASSEMBLY_ENTRIES = 2_000_000  # bound memory a hostile agent can make us hold


@dataclass(slots=True)
class _Assembly:
    epoch: str
    seq: int
    next_page: int = 0
    entries: list[dict[str, Any]] = field(default_factory=list)


class CatalogMirrors:
    def __init__(self, registry: NodeRegistry) -> None:
        self.reg = registry
        self._assembly: dict[str, _Assembly] = {}

    async def snapshot_page(self, node_id: str, msg: CatalogSnapshot) -> None:
        n = self.reg.session(node_id, msg.session_id)
        try:
            await self._page(n, node_id, msg)
        except MalformedMessage:
            n.snapshot_asked = None  # the next heartbeat asks for a fresh snapshot
            raise

    async def _page(self, n: LiveNode, node_id: str, msg: CatalogSnapshot) -> None:
        a = self._assembly.get(node_id)
        if msg.page == 0 or a is None or (a.epoch, a.seq) != (msg.epoch, msg.seq):
            if msg.page != 0:
                self._assembly.pop(node_id, None)
                raise MalformedMessage(f"CATALOG_SNAPSHOT page {msg.page} without its first page",
                                       {"field": "page", "reason": "out_of_order"})
            a = self._assembly[node_id] = _Assembly(msg.epoch, msg.seq)
        if msg.page != a.next_page:
            self._assembly.pop(node_id, None)
            raise MalformedMessage(f"CATALOG_SNAPSHOT page {msg.page}, expected {a.next_page}",
                                   {"field": "page", "reason": "out_of_order"})
        a.next_page += 1
        a.entries.extend(msg.entries)
        if len(a.entries) > MAX_ASSEMBLY_ENTRIES:
            self._assembly.pop(node_id, None)
            raise MalformedMessage("catalog snapshot too large", {"field": "entries", "reason": "too_large"})
        if not msg.last:
            return
        self._assembly.pop(node_id, None)
        got = catalog_digest(a.entries)
        if got != msg.digest:
            raise MalformedMessage("catalog snapshot digest does not match its entries",
                                   {"field": "digest", "reason": "mismatch"})
        async with n.lock:
            await asyncio.to_thread(node_store.replace_mirror, self.reg.engine, node_id, a.epoch, a.seq,
                                    got, a.entries)
            n.mirror = (a.epoch, a.seq, got)
            n.mirror_complete = True
            n.catalog_mismatch_beats = 0
            n.snapshot_asked = None
        log.info("node %s: catalog mirror replaced (%d entries, seq %d)", node_id, len(a.entries), a.seq)
        self.reg.events.publish(f"node.{node_id}", "catalog", {"node": node_id, "epoch": a.epoch, "seq": a.seq,
                                                               "entries": len(a.entries)})

    async def delta(self, node_id: str, msg: CatalogDelta) -> bool:
        """Apply a delta (CAT-4); False means it was not applied. Rules:

        * mirror incomplete (a snapshot is on its way or will be asked for): ignored;
        * another epoch: the mirror is incomplete until a snapshot (the next beat asks);
        * ``to_seq`` ≤ the mirror's seq: a duplicate or late delta, ignored;
        * ``from_seq`` ≠ the mirror's seq: a gap — the next heartbeat asks for a snapshot,
          unless one was asked for moments ago (CAT-5);
        * applied, then the digest must match the agent's, else a snapshot as for a gap.

        A delta applied resets the heartbeat mismatch count: beats sent while deltas flow are
        ahead of the mirror by the delta in flight, which is no reason for a snapshot."""
        n = self.reg.session(node_id, msg.session_id)
        if msg.to_seq < msg.from_seq:
            raise MalformedMessage("CATALOG_DELTA to_seq is below from_seq", {"field": "to_seq", "reason": "order"})
        async with n.lock:
            epoch, seq, _ = n.mirror
            if not n.mirror_complete:
                return False
            if msg.epoch != epoch:
                log.info("node %s: catalog delta of another epoch; asking for a snapshot", node_id)
                n.mirror_complete = False
                n.snapshot_asked = None
                return False
            if msg.to_seq <= seq:
                return False
            if msg.from_seq != seq:
                log.info("node %s: catalog delta %d→%d does not follow the mirror's seq %d; asking for a snapshot",
                         node_id, msg.from_seq, msg.to_seq, seq)
                n.catalog_mismatch_beats = 2
                return False
            got = await asyncio.to_thread(node_store.apply_delta, self.reg.engine, node_id, msg.to_seq,
                                          msg.upserts, msg.deletes)
            n.mirror = (epoch, msg.to_seq, got)
            n.catalog_mismatch_beats = 0
            if got != msg.digest:
                log.warning("node %s: mirror digest differs after delta to seq %d; asking for a snapshot",
                            node_id, msg.to_seq)
                n.catalog_mismatch_beats = 2
                return False
        kinds = sorted({e["kind"] for e in msg.upserts} | {e["kind"] for e in msg.deletes})
        self.reg.events.publish(f"node.{node_id}", "catalog", {"node": node_id, "epoch": epoch, "seq": msg.to_seq,
                                                               "delta": True, "kinds": kinds})
        return True
