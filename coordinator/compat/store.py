"""Compat's short transactions on replica rows (COMPAT-3, COMPAT-4, COMPAT-6, COMPAT-8).

Scans change only ``compat`` and ``compat_checked_ms``, and only when the value changes. Each
write is a compare-and-set on the (compat, updated_ms) the scan read: a REDO that re-pinned the
replica meanwhile (DIST-7 writes ``updated_ms``) wins over a scan of the old pins. Scans leave
``updated_ms`` alone, so they never fence a job's write.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from ..db.models import Replica, Template
from .evaluate import Compat, Policy, evaluate, policy_of, reports_every_compared

R, T = Replica.__table__, Template.__table__
READY = "READY"


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """A READY replica with what its evaluation needs."""
    template_id: str
    node_id: str
    policy: Policy
    pins: Mapping[str, Any]
    compat: str
    has_memory_snapshot: bool
    updated_ms: int


@dataclass(slots=True)
class TemplateView:
    """A non-DELETING template and its READY replicas by node (the matrix's rows)."""
    template_id: str
    alias: str | None
    policy: Policy
    replicas: dict[str, ReplicaView] = field(default_factory=dict)


def _view(row: Mapping[str, Any]) -> ReplicaView:
    return ReplicaView(row["template_id"], row["node_id"], policy_of(row["spec"]), row["pins"] or {},
                       row["compat"], bool(row["has_memory_snapshot"]), row["updated_ms"])


_REPLICA_COLS = (R.c.template_id, R.c.node_id, R.c.pins, R.c.compat, R.c.has_memory_snapshot, R.c.updated_ms,
                 T.c.spec)


def node_replicas(engine: Engine, node_id: str) -> list[ReplicaView]:
    """The node's READY replicas of non-DELETING templates, by template id."""
    stmt = (select(*_REPLICA_COLS).join(T, T.c.id == R.c.template_id)
            .where(R.c.node_id == node_id, R.c.status == READY, T.c.status != "DELETING")
            .order_by(R.c.template_id))
    with engine.connect() as c:
        return [_view(r) for r in c.execute(stmt).mappings()]


def templates(engine: Engine, template_id: str | None = None) -> list[TemplateView]:
    """Non-DELETING templates (one, or all by id) with their READY replicas (COMPAT-6)."""
    tq = select(T.c.id, T.c.alias, T.c.spec).where(T.c.status != "DELETING").order_by(T.c.id)
    rq = (select(*_REPLICA_COLS).join(T, T.c.id == R.c.template_id)
          .where(R.c.status == READY, T.c.status != "DELETING"))
    if template_id is not None:
        tq, rq = tq.where(T.c.id == template_id), rq.where(R.c.template_id == template_id)
    with engine.connect() as c:
        out = {r["id"]: TemplateView(r["id"], r["alias"], policy_of(r["spec"])) for r in c.execute(tq).mappings()}
        for r in c.execute(rq).mappings():
            if r["template_id"] in out:
                out[r["template_id"]].replicas[r["node_id"]] = _view(r)
    return list(out.values())


@dataclass(frozen=True, slots=True)
class Change:
    template_id: str
    node_id: str
    old: str
    new: str

    def to_dict(self) -> dict[str, str]:
        return {"template_id": self.template_id, "node_id": self.node_id, "old": self.old, "new": self.new}


def scan_node(engine: Engine, node_id: str, current: Mapping[str, Any], node_ready: bool,
              now_ms: int) -> tuple[int, list[Change]]:
    """Re-evaluate the node's READY replicas against ``current`` (its trusted versions) and
    write the ones that changed. Returns (replicas evaluated, changes applied)."""
    reps = node_replicas(engine, node_id)
    wanted = []
    for r in reps:
        new = evaluate(r.policy, r.pins, current, node_ready=node_ready, has_memory_snapshot=r.has_memory_snapshot)
        if new != r.compat:
            wanted.append((r, new))
    return len(reps), _write(engine, wanted, now_ms)


def _write(engine: Engine, wanted: Iterable[tuple[ReplicaView, Compat]], now_ms: int,
           pins: Mapping[str, Mapping[str, Any]] | None = None) -> list[Change]:
    applied = []
    with engine.begin() as c:
        for r, new in wanted:
            values: dict[str, Any] = {"compat": str(new), "compat_checked_ms": now_ms}
            if pins is not None:
                values["pins"] = dict(pins[r.node_id])
            n = c.execute(update(R).where(R.c.template_id == r.template_id, R.c.node_id == r.node_id,
                                          R.c.status == READY, R.c.compat == r.compat,
                                          R.c.updated_ms == r.updated_ms).values(**values)).rowcount
            if n:
                applied.append(Change(r.template_id, r.node_id, r.compat, str(new)))
    return applied


def adopt_baseline(engine: Engine, template_id: str, ready_versions: Mapping[str, Mapping[str, Any]],
                   now_ms: int) -> list[Change]:
    """COMPAT-8: the template's READY replicas that are UNKNOWN, on READY nodes (the keys of
    ``ready_versions``, their trusted versions) reporting every compared version, are re-pinned
    to those versions and set OK. Returns what changed."""
    wanted = []
    for tv in templates(engine, template_id):
        for node_id, r in sorted(tv.replicas.items()):
            current = ready_versions.get(node_id)
            if r.compat != Compat.UNKNOWN or current is None:
                continue
            if reports_every_compared(r.policy, current, r.has_memory_snapshot):
                wanted.append((r, Compat.OK))
    return _write(engine, wanted, now_ms, pins=ready_versions)
