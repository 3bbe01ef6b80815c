"""Targets, builder choice (TPL-10, TPL-20, IMG-22) and transfer sources (DIST-2, DIST-3)."""
from __future__ import annotations

import pytest

from coordinator.templates.placement import (GIB, Candidate, LayerInfo, choose_builder, pick_source, target_fits,
                                             targets)
from protocol.errors import InsufficientStorage, NodeNotEligible, NoTemplateNodes

L = [LayerInfo("sha256:" + "a" * 64, 100 << 20), LayerInfo("sha256:" + "b" * 64, 10 << 20)]


def c(node: str, *, placeable: bool = True, build: bool = True, free: int = 100 * GIB,
      cached: tuple[str, ...] = (), reason: str = "") -> Candidate:
    return Candidate(node, placeable, reason, build, free, frozenset(cached))


def test_targets_all_placeable_or_the_named_ones() -> None:
    nodes = [c("n2"), c("n1"), c("n3", placeable=False, reason="LOST")]
    assert [t.node_id for t in targets(nodes)] == ["n1", "n2"]
    assert [t.node_id for t in targets(nodes, ["n2"])] == ["n2"]
    with pytest.raises(NodeNotEligible) as ei:
        targets(nodes, ["n3", "zz", "n1"])
    assert [d["node"] for d in ei.value.details["nodes"]] == ["n3", "zz"]
    assert ei.value.details["nodes"][0]["reason"] == "LOST"
    with pytest.raises(NoTemplateNodes):
        targets([c("n1", placeable=False)])


def test_builder_prefers_cached_bytes_then_free_then_id() -> None:
    """TPL-10."""
    nodes = [c("n1", free=200 * GIB), c("n2", cached=(L[0].digest,)), c("n3", cached=(L[1].digest,), free=300 * GIB)]
    assert choose_builder(nodes, L, GIB).node_id == "n2"  # 100 MiB cached beats 10 MiB
    nodes = [c("n2", free=50 * GIB), c("n1", free=50 * GIB), c("n3", free=60 * GIB)]
    assert choose_builder(nodes, L, GIB).node_id == "n3"
    assert choose_builder([c("n2"), c("n1")], L, GIB).node_id == "n1"
    assert choose_builder(nodes, L, GIB, exclude=["n3"]).node_id == "n1"  # a lost builder is not retried


def test_builder_room_and_capability() -> None:
    """IMG-22: free ≥ 4 × uncached layers + writable; none with room → InsufficientStorage with figures."""
    need = 4 * (110 << 20) + GIB
    tight = [c("n1", free=need - 1), c("n2", free=need - 1, cached=(L[0].digest,))]
    assert choose_builder(tight, L, GIB).node_id == "n2"  # its cached layer lowers its need
    with pytest.raises(InsufficientStorage) as ei:
        choose_builder([c("n1", free=need - 1)], L, GIB)
    assert ei.value.details["nodes"]["n1"] == {"need": need, "free": need - 1}
    with pytest.raises(NoTemplateNodes):
        choose_builder([c("n1", build=False), c("n2", placeable=False)], L, GIB)
    with pytest.raises(NoTemplateNodes):
        choose_builder([c("n1")], L, GIB, prefer="n9")


def test_target_room_and_sources() -> None:
    """DIST-2: size + 1 GiB free; DIST-3: fewest active transfers ≤ 2, ties builder then id."""
    assert target_fits(c("n1", free=2 * GIB), GIB) and not target_fits(c("n1", free=2 * GIB - 1), GIB)
    assert pick_source(["n1", "n2", "b"], {}, builder="b") == "b"
    assert pick_source(["n1", "n2", "b"], {"b": 1}, builder="b") == "n1"
    assert pick_source(["n1", "b"], {"b": 2, "n1": 2}, builder="b") is None
