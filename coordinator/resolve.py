"""Resolve: which node can start a sandbox from this template now (RES-1 to RES-3, COMPAT-5).

Minimal for now: read from the database and the node registry at each call. Issue 7 adds the
in-memory index (RES-1, RES-4), sandbox capability and capacity (RT-18) and memory snapshots;
the interface stays ``resolve(template_or_alias, preferred_node=None)``.

Candidates are READY replicas on placeable nodes (NODE-5) whose compat is not STALE, ranked
OK before UNKNOWN, then by node id; a preferred node that is a candidate wins, otherwise the
preference is ignored. Without a candidate: TemplateNotFound for an unknown or DELETING
template; TemplateStaleNeedsRedo ``{template, nodes}`` (sorted) when every READY replica on a
placeable node is STALE; else TemplateHasNoReadyReplica with a reason per node.
"""
from __future__ import annotations

from typing import Any, Mapping

from sqlalchemy import select
from sqlalchemy.engine import Engine

from protocol import ids
from protocol.errors import (InvalidRequest, SnapshotNotFound, TemplateHasNoReadyReplica, TemplateNotFound,
                             TemplateStaleNeedsRedo)

from .compat.evaluate import Compat
from .db.models import Replica, Template
from .templates.fleet import Fleet

R, T = Replica.__table__, Template.__table__
RANK = {Compat.OK: 0, Compat.UNKNOWN: 1}


class Resolver:
    def __init__(self, fleet: Fleet, engine: Engine) -> None:
        self.fleet = fleet
        self.engine = engine

    def _template(self, name: str) -> Mapping[str, Any]:
        """CONV-2: ``tpl-…`` is an id, anything else an alias among non-DELETING templates."""
        if name.startswith("snap-"):
            # Snapshots arrive with issue 8; until then no snapshot id names anything.
            if not ids.valid("snapshot", name):
                raise InvalidRequest(f"snapshot id {name!r} is malformed", {"field": "template", "reason": "format"})
            raise SnapshotNotFound(f"snapshot {name} not found", {"snapshot": name})
        if name.startswith("tpl-"):
            if not ids.valid("template", name):
                raise InvalidRequest(f"template id {name!r} is malformed", {"field": "template", "reason": "format"})
            stmt = select(T.c.id, T.c.status).where(T.c.id == name)
        else:
            stmt = select(T.c.id, T.c.status).where(T.c.alias == name, T.c.status != "DELETING")
        with self.engine.connect() as c:
            row = c.execute(stmt).mappings().first()
        if row is None or row["status"] == "DELETING":
            raise TemplateNotFound(f"template {name} not found", {"template": name})
        return row

    def resolve(self, template: str, preferred_node: str | None = None) -> dict[str, Any]:
        """``{template_id, node, address, replica, restore}``; see the module docstring for the
        rules and errors. Blocking (database): call it from a worker thread."""
        tpl = self._template(template)
        with self.engine.connect() as c:
            replicas = [dict(r) for r in c.execute(
                select(R.c.node_id, R.c.status, R.c.phase, R.c.compat, R.c.artifact_id, R.c.has_memory_snapshot)
                .where(R.c.template_id == tpl["id"]).order_by(R.c.node_id)).mappings()]
        nodes = {c.node_id: c for c in self.fleet.candidates()}
        usable, stale, reasons = [], [], []
        for r in replicas:
            cand = nodes.get(r["node_id"])
            if r["status"] != "READY":
                reasons.append({"node": r["node_id"], "reason": f"replica {r['status']} (phase {r['phase']})"})
            elif cand is None:
                reasons.append({"node": r["node_id"], "reason": "unknown node"})
            elif not cand.placeable:
                reasons.append({"node": r["node_id"], "reason": f"not placeable: {cand.reason}"})
            elif r["compat"] == Compat.STALE:
                stale.append(r["node_id"])
                reasons.append({"node": r["node_id"], "reason": "replica STALE: needs redo"})
            else:
                usable.append(r)
        if not usable:
            if stale:
                raise TemplateStaleNeedsRedo(
                    f"template {tpl['id']} is stale on every placeable node holding it ({', '.join(sorted(stale))}); "
                    f"run tcctl template redo {tpl['id']} --failed-only",
                    {"template": tpl["id"], "nodes": sorted(stale)})
            raise TemplateHasNoReadyReplica(f"template {template} is not ready on any placeable node",
                                            {"template": tpl["id"], "nodes": reasons})
        usable.sort(key=lambda r: (RANK.get(r["compat"], 1), r["node_id"]))
        chosen = next((r for r in usable if r["node_id"] == preferred_node), usable[0])
        node = self.fleet.registry.nodes.get(chosen["node_id"])
        return {"template_id": tpl["id"], "node": chosen["node_id"], "address": node.address if node else "",
                "replica": {"template_id": tpl["id"], "node_id": chosen["node_id"],
                            "artifact_id": chosen["artifact_id"], "compat": chosen["compat"]},
                "restore": "cold"}
