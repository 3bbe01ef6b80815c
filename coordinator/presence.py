"""Catalog presence and strays (GC-10, GC-11, GC-12): the node catalogs mirrored by the
coordinator (CAT-6) are compared with what the database says each node holds.

For a READY node with a complete mirror:

* a READY replica whose copy is missing from the catalog turns FAILED "missing from node
  catalog" with ``cleanup_required``, and its template is re-aggregated (TPL-14's rule) unless
  a job of that template is active (the job publishes the aggregate itself);
* a catalog replica entry the coordinator does not know gets a REMOVE_REPLICA task;
* a READY snapshot whose origin is this node and that its catalog does not list turns FAILED
  "missing from node catalog" (snapshots have no ``cleanup_required`` column; tombstones —
  DELETED rows — are never touched); a catalog snapshot entry with no snapshot row at all gets
  a REMOVE_SNAPSHOT task (a create in flight has its CREATING row from the start, SNAP-3);
* a verified copy matching a READY artifact's sha256 becomes a placement; any other copy is a
  stray, removed (REMOVE_ARTIFACT) once it has been seen for ``gc.stray_grace`` (24 h) and is
  in no use (no replica row on that node, no active job, no build in progress).

Across nodes: a READY artifact none of whose recorded holders lists a verified copy any more
— every holder known, READY with a complete mirror, none LOST — becomes FAILED (GC-12).

A rootfs-mode replica is the template's use of an artifact copy, so its presence is the
copy's presence; memory-mode replicas (issue 7) also need their ``replica`` entry.

Rows touched within ``grace`` are left alone for one round: a task result reaches the
coordinator before the catalog delta that carries the same change (both leave the agent in
that order, but the delta is coalesced), and a check in between must not call a fresh copy
missing. :meth:`run_once` is the whole check of one node; :meth:`sweep` checks every node;
``run()`` sweeps at start and every ``reconcile.interval``, and a node is checked again
shortly after each catalog event (GC-10).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from protocol.errors import TCError
from protocol.messages import Event

from .db.models import (
    Artifact,
    Job,
    NodeCatalogEntry,
    Placement,
    Replica,
    Snapshot,
    Template,
)
from .health import Health
from .jobs import transitions as tr
from .snapshots import rows as snaps

log = logging.getLogger(__name__)
A, R, P, T, J = Artifact.__table__, Replica.__table__, Placement.__table__, Template.__table__, Job.__table__
E, SN = NodeCatalogEntry.__table__, Snapshot.__table__
MISSING = "missing from node catalog"
# Artifact statuses whose copies are accounted for elsewhere: a build or export in progress
# (its job owns it) and one awaiting GC-3 cleanup (its placements go with it).
_MANAGED = frozenset({tr.BUILDING, tr.PENDING, tr.CLEANUP_PENDING})


@dataclass(frozen=True, slots=True)
class Findings:
    """What one node's check decided (pure: see :func:`decide`)."""
    missing: list[str] = field(default_factory=list)       # template ids whose READY replica is gone
    unknown: list[str] = field(default_factory=list)       # catalog replica entries nobody knows
    placements: list[str] = field(default_factory=list)    # artifact ids to record as placed here
    strays: list[str] = field(default_factory=list)        # artifact copies matching no READY artifact
    snapshots_missing: list[str] = field(default_factory=list)  # READY snapshots of this node not listed
    snapshots_unknown: list[str] = field(default_factory=list)  # catalog snapshot entries with no row


def decide(node_id: str, replicas: list[Mapping[str, Any]], entries: list[Mapping[str, Any]],
           artifacts: Mapping[str, Mapping[str, Any]], placed: set[str], *, now_ms: int,
           grace_ms: int) -> Findings:
    """GC-11/GC-12 for one node. ``replicas``: this node's replica rows; ``entries``: its
    mirrored catalog; ``artifacts``: artifact rows by id (those the catalog or replicas name);
    ``placed``: artifact ids with a placement row for this node."""
    copies = {e["id"]: e.get("body") or {} for e in entries if e["kind"] == "artifact"}
    verified = {a for a, b in copies.items() if b.get("state") == "verified"}
    replica_entries = {e["id"] for e in entries if e["kind"] == "replica"}
    out = Findings()
    known = set()
    for r in replicas:
        known.add(r["template_id"])
        if r["status"] != tr.READY or now_ms - (r.get("updated_ms") or 0) < grace_ms:
            continue
        gone = r.get("artifact_id") and r["artifact_id"] not in verified
        gone = gone or (r.get("memstate_artifact_id") and r["memstate_artifact_id"] not in verified)
        gone = gone or (r.get("has_memory_snapshot") and r["template_id"] not in replica_entries)
        if gone:
            out.missing.append(r["template_id"])
    out.unknown.extend(sorted(replica_entries - known))
    for art_id in sorted(verified):
        row = artifacts.get(art_id)
        sha = copies[art_id].get("sha256")
        if row is not None and row["status"] == tr.READY and row.get("sha256") == sha:
            if art_id not in placed:
                out.placements.append(art_id)
        elif row is None or row["status"] not in _MANAGED:
            out.strays.append(art_id)
    return out


def decide_snapshots(node_id: str, snapshots: Mapping[str, Mapping[str, Any]],
                     entries: list[Mapping[str, Any]], *, now_ms: int, grace_ms: int) -> tuple[list[str], list[str]]:
    """GC-11 for snapshots on one node → (missing, unknown). ``snapshots``: snapshot rows by id,
    at least this node's and every one its catalog names. Missing: READY, origin here, not
    listed, outside the grace. Unknown: listed with no row in any status — a CREATING row
    (create in flight) or a DELETED tombstone is known, so neither is ever removed here."""
    listed = {e["id"] for e in entries if e["kind"] == "snapshot"}
    missing = sorted(i for i, r in snapshots.items()
                     if r["node_id"] == node_id and r["status"] == snaps.READY and i not in listed
                     and now_ms - (r.get("updated_ms") or 0) >= grace_ms)
    return missing, sorted(listed - set(snapshots))


def stray_copies(engine: Engine, node_id: str) -> list[dict[str, Any]]:
    """A node's artifact copies that match no READY artifact (GC-12), for `artifact list --strays`."""
    with engine.connect() as c:
        copies = {i: b or {} for i, b in c.execute(select(E.c.entry_id, E.c.body).where(
            E.c.node_id == node_id, E.c.kind == "artifact"))}
        rows = {r["id"]: dict(r) for r in c.execute(select(A).where(A.c.id.in_(sorted(copies)))).mappings()}
    entries = [{"kind": "artifact", "id": i, "body": b} for i, b in copies.items()]
    found = decide(node_id, [], entries, rows, set(copies), now_ms=0, grace_ms=0).strays
    out = []
    for art in found:
        row = rows.get(art)
        reason = ("unknown artifact" if row is None else
                  f"artifact is {row['status']}" if row["status"] != tr.READY else "sha256 differs")
        out.append({"node_id": node_id, "artifact_id": art, "sha256": copies[art].get("sha256", ""),
                    "size": copies[art].get("size"), "reason": reason})
    return out


class PresenceChecker:
    def __init__(self, registry: Any, engine: Engine, dispatcher: Any, *, grace: float = 10.0,
                 stray_grace: float = 86400.0, interval: float = 300.0, debounce: float = 0.5,
                 clock: Callable[[], float] = time.time) -> None:
        self.reg = registry
        self.engine = engine
        self.dispatcher = dispatcher
        self.grace_ms = int(grace * 1000)
        self.stray_grace_ms = int(stray_grace * 1000)
        self.interval = interval
        self.debounce = debounce
        self.clock = clock
        self._strays: dict[tuple[str, str], int] = {}  # (node, artifact) → first seen (ms)
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # --- triggers -------------------------------------------------------------------------------

    def on_event(self, ev: Event) -> None:
        """EventBus listener: a node's catalog changed or its session started → check it soon."""
        node = (ev.data or {}).get("node")
        if not isinstance(node, str) or not ev.topic.startswith("node."):
            return
        if ev.kind == "catalog" or (ev.kind == "session" and ev.data.get("mirror_complete")):
            self.schedule(node)

    def schedule(self, node_id: str, delay: float | None = None) -> None:
        if node_id in self._pending:
            return
        self._pending[node_id] = asyncio.ensure_future(self._later(node_id, self.debounce if delay is None else delay))

    async def _later(self, node_id: str, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        finally:
            self._pending.pop(node_id, None)
        try:
            findings = await self.run_once(node_id)
        except Exception:  # noqa: BLE001 — one node's failure never stops the others (GC-6 spirit)
            log.exception("presence check of node %s failed", node_id)
            return
        if findings is not None and self._recent(node_id):
            self.schedule(node_id, self.grace_ms / 1000 + self.debounce)  # look again once the grace is over

    async def run(self) -> None:
        """GC-10: a sweep at start, then every ``interval``."""
        while True:
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001
                log.exception("presence sweep failed")
            await asyncio.sleep(self.interval)

    def stop(self) -> None:
        for task in list(self._pending.values()):
            task.cancel()

    # --- the checks -----------------------------------------------------------------------------

    def _checkable(self, node_id: str) -> bool:
        n = self.reg.nodes.get(node_id)
        return n is not None and n.mirror_complete and self.reg.health(n) is Health.READY

    async def sweep(self) -> None:
        for node_id in sorted(self.reg.nodes):
            if self._checkable(node_id):
                try:
                    await self.run_once(node_id)
                except Exception:  # noqa: BLE001
                    log.exception("presence check of node %s failed", node_id)
        await asyncio.to_thread(self.fail_lost_artifacts)

    async def run_once(self, node_id: str) -> Findings | None:
        """Check one node now; None when it is not READY with a complete mirror (GC-11)."""
        lock = self._locks.setdefault(node_id, asyncio.Lock())
        async with lock:
            if not self._checkable(node_id):
                return None
            findings = await asyncio.to_thread(self._check, node_id)
            for tpl in findings.unknown:
                await self._task(node_id, "REMOVE_REPLICA", {"template_id": tpl}, tpl)
            for snap in findings.snapshots_unknown:
                await self._task(node_id, "REMOVE_SNAPSHOT", {"snapshot_id": snap}, snap)
            for art in await asyncio.to_thread(self._due_strays, node_id, findings.strays):
                await self._task(node_id, "REMOVE_ARTIFACT", {"artifact_id": art}, art)
            return findings

    def _recent(self, node_id: str) -> bool:
        """Whether a READY replica or snapshot on the node is still inside the grace (checked again later)."""
        cutoff = int(self.clock() * 1000) - self.grace_ms
        with self.engine.connect() as c:
            if c.execute(select(R.c.template_id).where(R.c.node_id == node_id, R.c.status == tr.READY,
                                                       R.c.updated_ms > cutoff).limit(1)).first() is not None:
                return True
            return c.execute(select(SN.c.id).where(SN.c.node_id == node_id, SN.c.status == snaps.READY,
                                                   SN.c.updated_ms > cutoff).limit(1)).first() is not None

    def _check(self, node_id: str) -> Findings:
        now = int(self.clock() * 1000)
        with self.engine.connect() as c:
            replicas = [dict(r) for r in c.execute(select(R).where(R.c.node_id == node_id)).mappings()]
            entries = [{"kind": k, "id": i, "body": b} for k, i, b in
                       c.execute(select(E.c.kind, E.c.entry_id, E.c.body).where(E.c.node_id == node_id))]
            names = {e["id"] for e in entries if e["kind"] == "artifact"}
            names |= {r["artifact_id"] for r in replicas if r["artifact_id"]}
            artifacts = {r["id"]: dict(r) for r in c.execute(select(A).where(A.c.id.in_(sorted(names)))).mappings()}
            placed = set(c.execute(select(P.c.artifact_id).where(P.c.node_id == node_id)).scalars())
            # Read after the entries: a snapshot's row is committed before its files exist
            # (SNAP-3), so an entry seen above always finds the row of a create in flight.
            listed = sorted(e["id"] for e in entries if e["kind"] == "snapshot")
            snap_rows = {r["id"]: dict(r) for r in c.execute(
                select(SN.c.id, SN.c.node_id, SN.c.status, SN.c.updated_ms)
                .where((SN.c.node_id == node_id) | SN.c.id.in_(listed))).mappings()}
        findings = decide(node_id, replicas, entries, artifacts, placed, now_ms=now, grace_ms=self.grace_ms)
        gone, unknown = decide_snapshots(node_id, snap_rows, entries, now_ms=now, grace_ms=self.grace_ms)
        findings.snapshots_missing.extend(gone)
        findings.snapshots_unknown.extend(unknown)
        for snap in gone:
            if snaps.set_status(self.engine, snap, snaps.READY, snaps.FAILED, last_error=MISSING):
                log.warning("node %s: READY snapshot %s is %s; marked FAILED (GC-11)", node_id, snap, MISSING)
        by_tpl = {r["template_id"]: r for r in replicas}
        for tpl in findings.missing:
            self._mark_missing(node_id, by_tpl[tpl], now)
        for art in findings.placements:
            self._place(art, node_id, now)
        # Strays that stopped being strays (placed, removed, claimed again) lose their clock.
        current = set(findings.strays)
        for key in [k for k in self._strays if k[0] == node_id and k[1] not in current]:
            del self._strays[key]
        return findings

    def _mark_missing(self, node_id: str, rep: Mapping[str, Any], now: int) -> None:
        tpl_id = rep["template_id"]
        with self.engine.begin() as s:
            changed = s.execute(update(R).where(R.c.template_id == tpl_id, R.c.node_id == node_id,
                                                R.c.status == tr.READY, R.c.updated_ms == rep["updated_ms"])
                                .values(status=tr.FAILED, phase="FAILED", cleanup_required=True, last_error=MISSING,
                                        last_error_phase="PRESENCE", updated_ms=now)).rowcount
            if not changed:
                return  # someone else changed it meanwhile: their word counts
            log.warning("node %s: READY replica of %s is %s; marked FAILED", node_id, tpl_id, MISSING)
            self._aggregate(s, tpl_id)
        self.reg.events.publish(f"template.{tpl_id}", "replica", {"template": tpl_id, "node": node_id,
                                                                  "status": tr.FAILED, "reason": MISSING})

    @staticmethod
    def _aggregate(s: Any, tpl_id: str) -> None:
        """TPL-14's rule again, unless a job of the template is active (it publishes itself)."""
        active = s.execute(select(J.c.id).where(J.c.resource_id == tpl_id,
                                                J.c.status.in_(tuple(tr.JOB_ACTIVE))).limit(1)).first()
        tpl = s.execute(select(T.c.status).where(T.c.id == tpl_id)).scalar()
        if active is not None or tpl not in (tr.READY, tr.PARTIALLY_READY):
            return
        reps = s.execute(select(R.c.status, R.c.last_error, R.c.node_id).where(R.c.template_id == tpl_id)
                         .order_by(R.c.node_id)).all()
        ready = [r for r in reps if r.status == tr.READY]
        failed = [r for r in reps if r.status != tr.READY]
        first = next((f"{r.node_id}: {r.last_error}" for r in failed if r.last_error), "")
        if not ready:
            status, error = tr.FAILED, first or "template creation failed on all nodes"
        else:
            status, error = (tr.PARTIALLY_READY, first) if failed else (tr.READY, "")
        if status != tpl:
            tr.transition_template(s, tpl_id, tpl, status, last_error=error)

    def _place(self, art_id: str, node_id: str, now: int) -> None:
        try:
            with self.engine.begin() as s:
                s.execute(insert(P).values(artifact_id=art_id, node_id=node_id, verified=True, created_ms=now))
            log.info("node %s: copy of %s recorded as a placement", node_id, art_id)
        except IntegrityError:
            pass  # recorded meanwhile (a task result): nothing to add

    def _due_strays(self, node_id: str, strays: list[str]) -> list[str]:
        """Strays seen for ``stray_grace`` and in no use (GC-12)."""
        now = int(self.clock() * 1000)
        due = []
        for art in strays:
            first = self._strays.setdefault((node_id, art), now)
            if now - first >= self.stray_grace_ms and not self._in_use(node_id, art):
                due.append(art)
        return due

    def _in_use(self, node_id: str, art_id: str) -> bool:
        with self.engine.connect() as c:
            rep = c.execute(select(R.c.template_id).where(
                R.c.node_id == node_id, (R.c.artifact_id == art_id) | (R.c.memstate_artifact_id == art_id))
                .limit(1)).first()
            job = c.execute(select(J.c.id).where(J.c.artifact_id == art_id,
                                                 J.c.status.in_(tuple(tr.JOB_ACTIVE))).limit(1)).first()
        return rep is not None or job is not None

    async def _task(self, node_id: str, op: str, args: dict[str, Any], what: str) -> None:
        # One id per (node, op, object, mirror identity): a re-check of the same state re-uses it.
        n = self.reg.nodes.get(node_id)
        ident = "|".join(map(str, n.mirror)) if n is not None else ""
        task_id = "gc-" + hashlib.sha256(f"{node_id}|{op}|{what}|{ident}".encode()).hexdigest()[:24]
        try:
            await self.dispatcher.run_task(node_id, op, args, task_id)
            log.info("node %s: %s %s done (GC-11/GC-12)", node_id, op, what)
            if op == "REMOVE_ARTIFACT":
                self._strays.pop((node_id, what), None)
        except TCError as exc:
            log.warning("node %s: %s %s failed: %s", node_id, op, what, exc.message)

    # --- across nodes (GC-12) -------------------------------------------------------------------

    def fail_lost_artifacts(self) -> list[str]:
        """READY artifacts none of whose holders lists a verified copy any more → FAILED. Only
        decided when every recorded holder is known, READY and fully mirrored (no node LOST)."""
        now = int(self.clock() * 1000)
        failed = []
        with self.engine.connect() as c:
            rows = c.execute(select(A.c.id, A.c.sha256, A.c.updated_ms).where(A.c.status == tr.READY)).all()
            holders: dict[str, list[str]] = {}
            for art, node in c.execute(select(P.c.artifact_id, P.c.node_id)):
                holders.setdefault(art, []).append(node)
            copies: dict[str, set[str]] = {}
            for node, art, body in c.execute(select(E.c.node_id, E.c.entry_id, E.c.body).where(E.c.kind == "artifact")):
                if (body or {}).get("state") == "verified":
                    copies.setdefault(art, set()).add(node)
        for art, sha, updated in rows:
            nodes = holders.get(art, [])
            if not nodes or now - (updated or 0) < self.grace_ms or copies.get(art):
                continue
            if not all(self._checkable(n) for n in nodes):
                continue  # a holder we cannot see (LOST, SUSPECT, warming up) may still have it
            with self.engine.begin() as s:
                if tr.transition_artifact(s, art, tr.READY, tr.FAILED):
                    failed.append(art)
                    log.warning("artifact %s: no verified copy left on %s; FAILED (GC-12)", art, ", ".join(nodes))
        return failed
