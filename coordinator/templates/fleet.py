"""What jobs need to know about the nodes: placeability, build capability, free space, the
layers and artifact copies their catalogs list (CAT-6), trusted versions for pins.

A thin read-only view over the node registry (memory) and the catalog mirrors (database);
decisions live in ``placement.py``.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.engine import Engine

from ..db.models import NodeCatalogEntry
from ..health import Health, placeable
from ..nodes import NodeRegistry
from ..storage import node_mode
from .placement import Candidate


@dataclass(frozen=True, slots=True)
class StorageLimits:
    warn: float = 70.0
    reject: float = 85.0
    delete_only: float = 95.0


class Fleet:
    def __init__(self, registry: NodeRegistry, engine: Engine, limits: StorageLimits = StorageLimits()) -> None:
        self.registry = registry
        self.engine = engine
        self.limits = limits

    def _mode(self, node_id: str, now: float) -> tuple[Health, str, float]:
        return node_mode(self.registry, self.registry.nodes[node_id], self.limits, now)

    def settling(self) -> bool:
        """True while the coordinator is in its start-up grace (NODE-8) and some known node has
        not reconnected yet: placement decisions made now would wrongly skip that node."""
        reg = self.registry
        if reg.clock() >= reg.grace_until:
            return False
        return any(n.session_id is None or reg.health(n) is not Health.READY for n in reg.nodes.values())

    def health(self, node_id: str) -> Health | None:
        n = self.registry.nodes.get(node_id)
        return None if n is None else self.registry.health(n)

    def candidates(self, layer_digests: Iterable[str] = ()) -> list[Candidate]:
        """Every known node as a placement candidate, with the given layers it caches."""
        now = self.registry.clock()
        wanted = set(layer_digests)
        cached = self._entries("layer", wanted) if wanted else {}
        out = []
        for node_id, n in sorted(self.registry.nodes.items()):
            health, mode, usage = self._mode(node_id, now)
            ok = placeable(health, n.admin_state, mode)
            reason = "" if ok else f"{health}/{n.admin_state}/storage {mode}"
            out.append(Candidate(node_id, ok, reason, bool(n.capabilities.get("build")),
                                 int((n.storage or {}).get("free") or 0), frozenset(cached.get(node_id, ())),
                                 mode, usage))
        return out

    def copies(self, artifact_id: str, sha256: str = "") -> list[str]:
        """Nodes whose catalog lists a verified copy of the artifact (with that sha256 when
        given), LOST nodes left out (DIST-1, DIST-3, TPL-8)."""
        out = []
        for node_id, bodies in self._bodies("artifact", {artifact_id}).items():
            body = bodies.get(artifact_id) or {}
            if body.get("state") != "verified" or (sha256 and body.get("sha256") != sha256):
                continue
            if self.health(node_id) not in (None, Health.LOST):
                out.append(node_id)
        return sorted(out)

    def versions(self, node_id: str) -> dict[str, str]:
        n = self.registry.nodes.get(node_id)
        return {} if n is None else self.registry.trusted_versions(n)

    def blob_endpoint(self, node_id: str) -> str:
        n = self.registry.nodes.get(node_id)
        return "" if n is None else n.blob_endpoint

    # --- catalog mirrors ----------------------------------------------------------------------

    def _bodies(self, kind: str, ids: set[str]) -> dict[str, dict[str, dict]]:
        with self.engine.connect() as c:
            rows = c.execute(select(NodeCatalogEntry.node_id, NodeCatalogEntry.entry_id, NodeCatalogEntry.body)
                             .where(NodeCatalogEntry.kind == kind, NodeCatalogEntry.entry_id.in_(sorted(ids))))
            out: dict[str, dict[str, dict]] = {}
            for node_id, entry_id, body in rows:
                out.setdefault(node_id, {})[entry_id] = body or {}
        return out

    def _entries(self, kind: str, ids: set[str]) -> dict[str, set[str]]:
        return {node: set(bodies) for node, bodies in self._bodies(kind, ids).items()}
