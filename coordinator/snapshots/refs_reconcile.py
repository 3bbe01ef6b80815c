"""The runtime-ref reconciler pass (SPEC GC-10, SNAP-19 to SNAP-21): at start, then every
``reconcile.interval``.

* READY nodes: their applied ref digest is forgotten, so their next heartbeat is asked for a
  complete report (WIRE-8 ``wants: refs``), which refreshes and releases refs (SNAP-19, SNAP-20).
* SUSPECT/LOST nodes: their ACTIVE refs get ``last_error`` "node unreachable since T", where T
  is their last contact; never released for it (SNAP-21).
* Orphan refs on tombstones expire when the sandbox is unknown — no sandbox record and no
  mirrored catalog entry — and was last seen longer than ``refs.orphan_ttl`` ago (SNAP-21).
Released snapshots go to ``on_released`` (the tombstone finaliser, SNAP-14).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from sqlalchemy import Engine

from ..health import Health
from ..sandboxes import catalog_sandboxes, record
from . import refs

log = logging.getLogger(__name__)

OnReleased = Callable[[list[str]], Awaitable[None]]


def sandbox_known(engine: Engine, sandbox_id: str) -> bool:
    """SNAP-21: known = a sandbox record, or a sandbox entry in any node's mirrored catalog.
    Database errors propagate: ``expire_orphans`` then keeps the ref."""
    return record(engine, sandbox_id) is not None or bool(catalog_sandboxes(engine, sandbox_id))


async def reconcile_refs(engine: Engine, registry: Any, *, now_ms: int, ttl_ms: int,
                         on_released: OnReleased | None = None) -> list[str]:
    """One pass over every node; returns the snapshot ids whose refs expired."""
    for node_id in sorted(registry.nodes):
        n = registry.nodes.get(node_id)
        if n is None:
            continue
        health = registry.health(n)
        try:
            if health is Health.READY:
                n.refs_digest = None  # the next heartbeat is asked for a full report (SNAP-19, SNAP-20)
            elif health in (Health.SUSPECT, Health.LOST):
                since = int(n.last_seen * 1000) if n.last_seen is not None else int(n.created_ms or 0)
                marked = await asyncio.to_thread(refs.mark_unreachable, engine, node_id, since)
                if marked:
                    log.info("node %s is %s: %d runtime ref(s) marked unreachable", node_id, health, marked)
        except Exception:  # noqa: BLE001 — one node's trouble must not stop the pass
            log.exception("runtime refs of node %s: reconcile failed", node_id)
    expired = await asyncio.to_thread(refs.expire_orphans, engine, now_ms=now_ms, ttl_ms=ttl_ms,
                                      sandbox_known=lambda sid: sandbox_known(engine, sid))
    if expired:
        log.info("orphan runtime refs expired on %s", ", ".join(expired))
        if on_released is not None:
            await on_released(expired)
    return expired


async def run_refs_reconciler(engine: Engine, registry: Any, *, interval: float, ttl_ms: int,
                              on_released: OnReleased | None = None,
                              clock: Callable[[], float] | None = None) -> None:
    """GC-10: a pass at start, then every ``interval`` seconds, until cancelled."""
    now = clock or time.time
    while True:
        try:
            await reconcile_refs(engine, registry, now_ms=int(now() * 1000), ttl_ms=ttl_ms,
                                 on_released=on_released)
        except Exception:  # noqa: BLE001
            log.exception("runtime ref reconcile pass failed")
        await asyncio.sleep(interval)
