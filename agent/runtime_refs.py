"""The agent's runtime-ref report (SPEC WIRE-8, WIRE-9, SNAP-19, SNAP-20).

A sandbox runs from a snapshot when its catalog entry (``sandbox``/<id>) names one in
``snapshot_id`` — written by ROLLBACK_SANDBOX and by CREATE_SANDBOX from a snapshot, with the
``generation`` the coordinator chose (SNAP-9). The report is every such entry, sorted by sandbox
id; it is complete, so the coordinator releases refs the node no longer holds. An entry exists
for every sandbox not destroyed (DESTROY_SANDBOX deletes it), whatever its state: a FAILED or
EXITED sandbox still holds its files until it is destroyed.

The digest is the canonical digest of the list, and "" for an empty one (a node without refs
reports nothing, the same value heartbeats carried before snapshots existed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol import canonical

from .catalog import SANDBOX_KIND

BINDING = "memory_backing"
_GONE_STATES = frozenset({"DESTROYED"})  # a state meaning the sandbox no longer exists


class _Catalog(Protocol):
    def identity(self) -> Any: ...

    def entries(self, kind: str | None = None) -> list[dict[str, Any]]: ...


def refs_from_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The refs of sandbox catalog entries: {snapshot_id, sandbox_id, binding, generation},
    sorted by sandbox id. Entries without a ``snapshot_id`` (booted from a template) hold none."""
    refs = []
    for e in entries:
        body = e.get("body") or {}
        snap = body.get("snapshot_id")
        if e.get("kind", SANDBOX_KIND) != SANDBOX_KIND or not isinstance(snap, str) or not snap:
            continue
        if body.get("state") in _GONE_STATES:
            continue
        try:
            gen = max(0, int(body.get("generation") or 0))
        except (TypeError, ValueError):
            gen = 0  # the coordinator keeps the higher generation it knows (SNAP-9)
        refs.append({"snapshot_id": snap, "sandbox_id": str(e["id"]), "binding": BINDING, "generation": gen})
    refs.sort(key=lambda r: r["sandbox_id"])
    return refs


def refs_digest(refs: list[dict[str, Any]]) -> str:
    """WIRE-8: the heartbeat's ``refs_digest``; "" when there are no refs."""
    return canonical.digest(refs) if refs else ""


@dataclass
class RefsReport:
    """The current report, recomputed only when the catalog moved (it is read every beat)."""
    catalog: _Catalog
    _at: tuple[str, int] | None = None
    _refs: list[dict[str, Any]] = field(default_factory=list)
    _digest: str = ""

    def current(self) -> tuple[list[dict[str, Any]], str]:
        ident = self.catalog.identity()
        at = (ident.epoch, ident.seq)
        if at != self._at:
            self._refs = refs_from_entries(self.catalog.entries(SANDBOX_KIND))
            self._digest = refs_digest(self._refs)
            self._at = at
        return self._refs, self._digest
