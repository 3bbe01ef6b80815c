"""Where template work runs: targets, the builder (TPL-10) and transfer sources (DIST-2, DIST-3).

Pure decisions over a snapshot of node facts (``Candidate``), so the rules are unit-tested
without a cluster; the job code builds the candidates from the node registry and the
catalog mirrors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from protocol.errors import InsufficientStorage, NodeNotEligible, NodeStorageBlocked, NoTemplateNodes

from ..storage import WRITABLE, blocked

GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class Candidate:
    node_id: str
    placeable: bool                      # NODE-5: READY, ACTIVE, storage healthy or warn
    reason: str = ""                     # why not placeable (for NodeNotEligible)
    can_build: bool = False              # the `build` capability (IMG-22)
    free: int = 0                        # bytes free in the agent store (latest heartbeat)
    cached_layers: frozenset[str] = field(default_factory=frozenset)  # layer digests in its catalog
    storage_mode: str = "healthy"        # SNAP-15, from the latest figures
    usage: float = 0.0                   # store usage %, SNAP-15


@dataclass(frozen=True, slots=True)
class LayerInfo:
    digest: str
    size: int


def targets(candidates: Sequence[Candidate], scope: Sequence[str] = ()) -> list[Candidate]:
    """The template's target nodes: the named ones (all must be placeable, else NodeNotEligible
    listing every offender, sorted) or every placeable node; none → NoTemplateNodes."""
    by_id = {c.node_id: c for c in candidates}
    if scope:
        bad = sorted(n for n in scope if n not in by_id or not by_id[n].placeable)
        if bad:
            raise NodeNotEligible(
                f"node(s) {', '.join(bad)} cannot take the template",
                {"nodes": [{"node": n, "reason": by_id[n].reason if n in by_id else "unknown node"} for n in bad]})
        chosen = [by_id[n] for n in sorted(set(scope))]
    else:
        chosen = sorted((c for c in candidates if c.placeable), key=lambda c: c.node_id)
    if not chosen:
        raise NoTemplateNodes("no placeable node can take the template", {})
    return chosen


def build_need(c: Candidate, layers: Iterable[LayerInfo], writable: int, space_factor: int = 4) -> int:
    """IMG-22: space_factor × the layers it does not cache + the writable size."""
    return space_factor * sum(l.size for l in layers if l.digest not in c.cached_layers) + writable


def choose_builder(candidates: Sequence[Candidate], layers: Sequence[LayerInfo], writable: int, *,
                   space_factor: int = 4, prefer: str | None = None, exclude: Iterable[str] = ()) -> Candidate:
    """TPL-10: among placeable nodes with `build` and room, the most cached bytes of the image's
    layers, then the most free space, then node id. ``prefer`` (the request's builder) must
    qualify itself. None: InsufficientStorage when space is the only reason (per-node
    figures), else NoTemplateNodes."""
    skip = set(exclude)
    able = [c for c in candidates if c.placeable and c.can_build and c.node_id not in skip]
    if prefer is not None:
        able = [c for c in able if c.node_id == prefer]
    roomy = [c for c in able if c.free >= build_need(c, layers, writable, space_factor)]
    if not roomy:
        if able:
            figures = {c.node_id: {"need": build_need(c, layers, writable, space_factor), "free": c.free}
                       for c in able}
            raise InsufficientStorage("no builder has room for the image (need ≥ 4 × uncached layers + the "
                                      "writable size)", {"nodes": figures})
        what = f"node {prefer} cannot build" if prefer else "no placeable node can build"
        raise NoTemplateNodes(what, {})

    def cached(c: Candidate) -> int:
        return sum(l.size for l in layers if l.digest in c.cached_layers)

    return min(roomy, key=lambda c: (-cached(c), -c.free, c.node_id))


def storage_refusal(c: Candidate | None, action: str) -> NodeStorageBlocked | None:
    """SNAP-16 for template jobs: the refusal when a READY node's store is too full for
    ``action`` ("builds", "incoming transfers"), else None. An ``unknown`` mode means the node
    is not READY; the job's own rules answer for that (TPL-11 replaces a lost builder, a lost
    target fails NodeUnavailable), so it is not turned into a storage refusal here."""
    if c is None or c.storage_mode in WRITABLE or c.storage_mode == "unknown":
        return None
    return blocked(c.node_id, c.usage, c.storage_mode, action)


def target_fits(c: Candidate, size: int, reserve: int = GIB) -> bool:
    """DIST-2: a target needs free ≥ artifact size + 1 GiB."""
    return c.free >= size + reserve


def pick_source(sources: Sequence[str], active: dict[str, int], *, builder: str | None,
                per_source: int = 2) -> str | None:
    """DIST-3: the source with the fewest active transfers (≤ ``per_source``); ties go to the
    builder, then the node id. None when every source is busy."""
    free = [s for s in sources if active.get(s, 0) < per_source]
    if not free:
        return None
    return min(free, key=lambda s: (active.get(s, 0), s != builder, s))
