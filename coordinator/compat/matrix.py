"""The compat matrix (COMPAT-6): non-DELETING templates × READY nodes, both by id.

Pure: built from template views (``store.templates``) and the READY nodes' trusted versions
(NODE-11), so cells are re-evaluated now, never read from a stored status that a scan has not
caught up with yet.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .evaluate import PINNED, Compat, evaluate
from .store import TemplateView


@dataclass(frozen=True, slots=True)
class NodeView:
    node_id: str
    address: str
    versions: Mapping[str, Any]  # trusted (the node is READY)


def _versions(v: Mapping[str, Any] | None) -> dict[str, str]:
    v = v or {}
    return {k: str(v.get(k) or "") for k in PINNED}


def row(template: TemplateView, nodes: Sequence[NodeView]) -> dict[str, Any]:
    """One template's row: a cell per READY node (MISSING without a READY replica there); the
    row is STALE if any cell is, else its first UNKNOWN or MISSING cell's status, else OK."""
    cells = []
    for n in sorted(nodes, key=lambda n: n.node_id):
        r = template.replicas.get(n.node_id)
        if r is None:
            status, bound = Compat.MISSING, {}
        else:
            status = evaluate(template.policy, r.pins, n.versions, node_ready=True,
                              has_memory_snapshot=r.has_memory_snapshot)
            bound = r.pins
        cells.append({"node_id": n.node_id, "address": n.address, "compat": str(status),
                      "bound": _versions(bound) if r is not None else {}, "current": _versions(n.versions)})
    statuses = [c["compat"] for c in cells]
    if Compat.STALE in statuses:
        overall = Compat.STALE
    else:
        overall = next((Compat(s) for s in statuses if s in (Compat.UNKNOWN, Compat.MISSING)), Compat.OK)
    return {"template_id": template.template_id, "alias": template.alias, "policy": str(template.policy),
            "overall": str(overall), "nodes": cells}


def build(templates: Sequence[TemplateView], nodes: Sequence[NodeView]) -> dict[str, Any]:
    """``{summary, templates}``; the summary counts stale templates, stale replicas, nodes with
    a stale replica, missing and unknown cells."""
    rows = [row(t, nodes) for t in sorted(templates, key=lambda t: t.template_id)]
    cells = [(r["template_id"], c) for r in rows for c in r["nodes"]]
    summary = {
        "stale_templates": sum(1 for r in rows if r["overall"] == Compat.STALE),
        "stale_replicas": sum(1 for _, c in cells if c["compat"] == Compat.STALE),
        "affected_nodes": len({c["node_id"] for _, c in cells if c["compat"] == Compat.STALE}),
        "missing_replicas": sum(1 for _, c in cells if c["compat"] == Compat.MISSING),
        "unknown_replicas": sum(1 for _, c in cells if c["compat"] == Compat.UNKNOWN),
    }
    return {"summary": summary, "templates": rows, "nodes": [n.node_id for n in sorted(nodes, key=lambda n: n.node_id)]}
