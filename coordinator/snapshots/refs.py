"""Runtime references of sandboxes to snapshots: the rows (SPEC SNAP-18 to SNAP-21, NODE-14).

A ref says "sandbox S on node N runs from snapshot X" (binding ``memory_backing``). While one is
ACTIVE, a DELETED snapshot stays a tombstone and its files stay on the node (SNAP-12, SNAP-14).
Refs change in four ways:

* acquire (create from a snapshot, rollback) — in the caller's transaction (SNAP-18);
* release on sandbox destroy (SNAP-19) and on node removal (NODE-14, db/node_removal.py);
* a complete report from a READY node (SNAP-19, SNAP-20) — the node's truth wins;
* the reconciler (SNAP-21): unreachable nodes only get ``last_error``, never a release; an
  orphan ref on a tombstone expires only when the sandbox is unknown and long unseen.

Everything here is synchronous database work: callers on the event loop use ``asyncio.to_thread``.
Functions taking ``engine_or_conn`` accept an Engine (own transaction) or a Connection/Session
(the caller's transaction).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from typing import Any, Callable, Iterator

from sqlalchemy import Engine, func, insert, select, update

from protocol import ids

from ..db.models import RuntimeRef, Snapshot

log = logging.getLogger(__name__)

ACTIVE, RELEASED = "ACTIVE", "RELEASED"
BINDING = "memory_backing"

SWITCHED = "switched runtime ref"                 # SNAP-18
DESTROYED = "sandbox destroyed"                   # SNAP-19
RECONCILED = "reconciled runtime ref"             # SNAP-20
NOT_OBSERVED = "runtime ref not observed on node"  # SNAP-20
ORPHAN_EXPIRED = "orphan ref expired"             # SNAP-21
NODE_REMOVED = "node removed"                     # NODE-14

RR = RuntimeRef.__table__
SN = Snapshot.__table__
_BINDING_MAX = 32  # the column's width
_GEN_MAX = (1 << 63) - 1
_CHUNK = 500  # ids per IN (...) list: well under every backend's parameter limit


def _now_ms() -> int:
    return int(time.time() * 1000)


@contextlib.contextmanager
def _tx(engine_or_conn: Any) -> Iterator[Any]:
    """A transaction of our own on an Engine, else the caller's connection as it is."""
    if isinstance(engine_or_conn, Engine):
        with engine_or_conn.begin() as c:
            yield c
    else:
        yield engine_or_conn


def _release(c: Any, ref_ids: list[int], reason: str, now_ms: int) -> None:
    """Compare-and-set on ACTIVE: a ref released meanwhile keeps its first reason."""
    for i in range(0, len(ref_ids), _CHUNK):
        c.execute(update(RR).where(RR.c.id.in_(ref_ids[i:i + _CHUNK]), RR.c.status == ACTIVE)
                  .values(status=RELEASED, released_ms=now_ms, release_reason=reason))


def _insert(c: Any, *, snapshot_id: str, sandbox_id: str, node_id: str, binding: str, generation: int,
            now_ms: int) -> int:
    res = c.execute(insert(RR).values(snapshot_id=snapshot_id, sandbox_id=sandbox_id, node_id=node_id,
                                      binding=binding, generation=generation, status=ACTIVE,
                                      attached_ms=now_ms, last_seen_ms=now_ms, released_ms=None,
                                      release_reason="", last_error=""))
    return int(res.inserted_primary_key[0])


# --- acquire and release (SNAP-18, SNAP-19) --------------------------------------------------

def acquire(conn: Any, *, snapshot_id: str, sandbox_id: str, node_id: str, generation: int, now_ms: int,
            binding: str = BINDING) -> int:
    """SNAP-18: inside the caller's transaction, release the sandbox's ACTIVE refs of this
    binding ("switched runtime ref") and insert the new ACTIVE ref; returns its id. The caller
    holds the sandbox lock (SNAP-7), so the partial unique index never trips here."""
    old = [r for (r,) in conn.execute(select(RR.c.id).where(RR.c.sandbox_id == sandbox_id, RR.c.binding == binding,
                                                              RR.c.status == ACTIVE))]
    _release(conn, old, SWITCHED, now_ms)
    return _insert(conn, snapshot_id=snapshot_id, sandbox_id=sandbox_id, node_id=node_id, binding=binding,
                   generation=generation, now_ms=now_ms)


def release_sandbox(engine: Any, sandbox_id: str, reason: str = DESTROYED, now_ms: int | None = None) -> list[str]:
    """SNAP-19: release every ACTIVE ref of the sandbox; returns the affected snapshot ids
    (sorted, unique) for the tombstone finaliser (SNAP-14)."""
    return _release_all(engine, RR.c.sandbox_id == sandbox_id, reason, now_ms)


def release_node(conn: Any, node_id: str, reason: str = NODE_REMOVED, now_ms: int | None = None) -> list[str]:
    """NODE-14: release every ACTIVE ref of a removed node (in the removal's transaction)."""
    return _release_all(conn, RR.c.node_id == node_id, reason, now_ms)


def _release_all(engine_or_conn: Any, which: Any, reason: str, now_ms: int | None) -> list[str]:
    now_ms = _now_ms() if now_ms is None else now_ms
    with _tx(engine_or_conn) as c:
        rows = c.execute(select(RR.c.id, RR.c.snapshot_id).where(which, RR.c.status == ACTIVE)).all()
        _release(c, [r.id for r in rows], reason, now_ms)
    return sorted({r.snapshot_id for r in rows})


# --- reading ------------------------------------------------------------------------------

def active_refs(engine_or_conn: Any, snapshot_id: str) -> list[dict[str, Any]]:
    """The ACTIVE refs of one snapshot, oldest first (SNAP-12's ``refs``)."""
    stmt = select(RR).where(RR.c.snapshot_id == snapshot_id, RR.c.status == ACTIVE).order_by(RR.c.id)
    if isinstance(engine_or_conn, Engine):
        with engine_or_conn.connect() as c:
            return [dict(r) for r in c.execute(stmt).mappings()]
    return [dict(r) for r in engine_or_conn.execute(stmt).mappings()]


def ref_summary(engine: Any, snapshot_ids: list[str]) -> dict[str, tuple[int, list[str]]]:
    """SNAP-17 list items: snapshot → (ACTIVE ref count, sorted sandbox ids); every asked id is
    in the answer, (0, []) when it has no ACTIVE ref."""
    out: dict[str, tuple[int, list[str]]] = {s: (0, []) for s in snapshot_ids}
    wanted = sorted(set(snapshot_ids))
    found: dict[str, list[str]] = {}
    ctx = engine.connect() if isinstance(engine, Engine) else contextlib.nullcontext(engine)
    with ctx as c:
        for i in range(0, len(wanted), _CHUNK):
            stmt = select(RR.c.snapshot_id, RR.c.sandbox_id).where(RR.c.snapshot_id.in_(wanted[i:i + _CHUNK]),
                                                                   RR.c.status == ACTIVE)
            for snap, sbx in c.execute(stmt):
                found.setdefault(snap, []).append(sbx)
    for snap, sandboxes in found.items():
        out[snap] = (len(sandboxes), sorted(set(sandboxes)))
    return out


def active_generation(conn: Any, sandbox_id: str) -> int:
    """SNAP-9: the generation of the sandbox's ACTIVE ref(s), 0 when it has none."""
    stmt = select(func.max(RR.c.generation)).where(RR.c.sandbox_id == sandbox_id, RR.c.status == ACTIVE)
    if isinstance(conn, Engine):
        with conn.connect() as c:
            value = c.execute(stmt).scalar()
    else:
        value = conn.execute(stmt).scalar()
    return int(value or 0)


# --- a node's complete report (SNAP-19, SNAP-20) -------------------------------------------

def _check_item(item: Any) -> tuple[str, str, str, int] | str:
    """(snapshot, sandbox, binding, generation), or why the item is refused."""
    if not isinstance(item, dict):
        return "not a map"
    snap, sbx = item.get("snapshot_id"), item.get("sandbox_id")
    binding, gen = item.get("binding", BINDING), item.get("generation", 0)
    if not ids.valid("snapshot", snap):
        return "snapshot_id is not a snapshot id"
    if not ids.valid("sandbox", sbx):
        return "sandbox_id is not a sandbox id"
    if not isinstance(binding, str) or not 0 < len(binding) <= _BINDING_MAX or not binding.isprintable():
        return f"binding must be a string of 1 to {_BINDING_MAX} printable characters"
    if type(gen) is not int or not 0 <= gen <= _GEN_MAX:
        return "generation must be an integer ≥ 0"
    return snap, sbx, binding, gen


def apply_report(engine: Engine, node_id: str, refs: list[dict[str, Any]], now_ms: int) -> list[str]:
    """Apply a COMPLETE ref report from a READY node (SNAP-19, SNAP-20); returns the snapshot ids
    whose refs were released, sorted, for the tombstone finaliser (SNAP-14).

    Per reported ref (sandbox, binding, snapshot, generation):
    * the sandbox's ACTIVE ref names the same snapshot → node, generation, last seen updated,
      last error cleared;
    * it names another snapshot → the old one RELEASED "reconciled runtime ref", the reported
      one inserted — unless the report's generation is older than the ACTIVE ref's: the agent
      never goes back a generation (SNAP-9), so that report is stale and changes nothing;
    * there is none → the reported ref is inserted.
    An ACTIVE ref of this node the report does not name is RELEASED "runtime ref not observed on
    node". Bad items are skipped with a warning; their sandbox's refs are then left alone,
    since the report says nothing reliable about them."""
    items: dict[tuple[str, str], tuple[str, int]] = {}
    unsure: set[str] = set()  # sandboxes named only by refused items
    for n, item in enumerate(refs if isinstance(refs, list) else []):
        checked = _check_item(item)
        if isinstance(checked, str):
            log.warning("node %s: runtime ref #%d skipped: %s", node_id, n, checked)
            sbx = item.get("sandbox_id") if isinstance(item, dict) else None
            if ids.valid("sandbox", sbx):
                unsure.add(sbx)
            continue
        snap, sbx, binding, gen = checked
        if (sbx, binding) in items:
            log.warning("node %s: runtime ref #%d skipped: sandbox %s binding %s reported twice",
                        node_id, n, sbx, binding)
            continue
        items[(sbx, binding)] = (snap, gen)
    released: set[str] = set()
    with engine.begin() as c:
        # The ACTIVE refs this report speaks about: the node's own, and the reported sandboxes'
        # wherever the coordinator thinks they are.
        active: dict[tuple[str, str], Any] = {}
        for r in c.execute(select(RR).where(RR.c.node_id == node_id, RR.c.status == ACTIVE)):
            active[(r.sandbox_id, r.binding)] = r
        sandboxes = sorted({s for s, _ in items})
        for i in range(0, len(sandboxes), _CHUNK):
            for r in c.execute(select(RR).where(RR.c.sandbox_id.in_(sandboxes[i:i + _CHUNK]),
                                                RR.c.status == ACTIVE)):
                active[(r.sandbox_id, r.binding)] = r
        for (sbx, binding), (snap, gen) in sorted(items.items()):
            cur = active.get((sbx, binding))
            if cur is not None and cur.snapshot_id == snap:
                c.execute(update(RR).where(RR.c.id == cur.id, RR.c.status == ACTIVE)
                          .values(node_id=node_id, generation=gen, last_seen_ms=now_ms, last_error=""))
                continue
            if cur is not None:
                if gen < cur.generation:
                    log.info("node %s: stale runtime ref %s → %s (generation %d < %d) ignored",
                             node_id, sbx, snap, gen, cur.generation)
                    continue
                _release(c, [cur.id], RECONCILED, now_ms)
                released.add(cur.snapshot_id)
            _insert(c, snapshot_id=snap, sandbox_id=sbx, node_id=node_id, binding=binding, generation=gen,
                    now_ms=now_ms)
        gone = [r for key, r in active.items()
                if r.node_id == node_id and key not in items and r.sandbox_id not in unsure]
        _release(c, [r.id for r in gone], NOT_OBSERVED, now_ms)
        released.update(r.snapshot_id for r in gone)
    return sorted(released)


# --- the reconciler's part (SNAP-21) ---------------------------------------------------------

def unreachable_message(since_ms: int) -> str:
    when = dt.datetime.fromtimestamp(since_ms / 1000, dt.timezone.utc).isoformat(timespec="seconds")
    return f"node unreachable since {when.replace('+00:00', 'Z')}"


def mark_unreachable(engine: Engine, node_id: str, since_ms: int) -> int:
    """SNAP-21: the node's ACTIVE refs get ``last_error`` "node unreachable since T" (ISO-8601
    UTC); they are never released for it. Returns how many refs changed (0 when all already say so)."""
    msg = unreachable_message(since_ms)
    with engine.begin() as c:
        res = c.execute(update(RR).where(RR.c.node_id == node_id, RR.c.status == ACTIVE, RR.c.last_error != msg)
                        .values(last_error=msg))
    return int(res.rowcount or 0)


def expire_orphans(engine: Engine, *, now_ms: int, ttl_ms: int, sandbox_known: Callable[[str], bool]) -> list[str]:
    """SNAP-21: an ACTIVE ref on a DELETED snapshot (a tombstone) expires ("orphan ref expired")
    only if its sandbox is unknown to the coordinator AND it was last seen (else attached) more
    than ``ttl_ms`` ago. ``sandbox_known`` raising keeps the ref: a lookup error is no proof.
    Returns the affected snapshot ids, sorted."""
    cutoff = now_ms - ttl_ms
    seen = func.coalesce(RR.c.last_seen_ms, RR.c.attached_ms)
    with engine.connect() as c:
        candidates = c.execute(
            select(RR.c.id, RR.c.snapshot_id, RR.c.sandbox_id).join(SN, SN.c.id == RR.c.snapshot_id)
            .where(RR.c.status == ACTIVE, SN.c.status == "DELETED", seen < cutoff).order_by(RR.c.id)).all()
    expired: list[Any] = []
    for r in candidates:
        try:
            known = sandbox_known(r.sandbox_id)
        except Exception as exc:  # noqa: BLE001 — SNAP-21: lookup errors keep the ref
            log.warning("runtime ref %d (sandbox %s): sandbox lookup failed, kept: %s", r.id, r.sandbox_id, exc)
            continue
        if not known:
            expired.append(r)
    if not expired:
        return []
    with engine.begin() as c:
        # Re-checked in the update: a ref seen or released since the read is left alone.
        for i in range(0, len(expired), _CHUNK):
            c.execute(update(RR).where(RR.c.id.in_([r.id for r in expired[i:i + _CHUNK]]), RR.c.status == ACTIVE,
                                       seen < cutoff)
                      .values(status=RELEASED, released_ms=now_ms, release_reason=ORPHAN_EXPIRED))
    for r in expired:
        log.info("runtime ref %d of sandbox %s on %s expired (orphan)", r.id, r.sandbox_id, r.snapshot_id)
    return sorted({r.snapshot_id for r in expired})
