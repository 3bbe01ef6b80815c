"""The presence decision of one node (GC-11, GC-12): pure logic over replica and snapshot rows, mirrored
catalog entries and artifact rows."""
from __future__ import annotations

from typing import Any

from coordinator.presence import decide, decide_snapshots

NOW = 1_000_000
GRACE = 10_000


def art(i: int) -> str:
    return f"art-{i:024x}"


def tpl(i: int) -> str:
    return f"tpl-{i:024x}"


def copy(i: int, sha: str = "s1", state: str = "verified") -> dict[str, Any]:
    return {"kind": "artifact", "id": art(i), "body": {"state": state, "sha256": sha, "size": 10}}


def replica(t: int, a: int, status: str = "READY", updated: int = 0, **kw: Any) -> dict[str, Any]:
    return {"template_id": tpl(t), "artifact_id": art(a), "status": status, "updated_ms": updated, **kw}


def row(a: int, status: str = "READY", sha: str = "s1") -> dict[str, Any]:
    return {"id": art(a), "status": status, "sha256": sha}


def test_a_ready_replica_without_its_copy_is_missing() -> None:
    """GC-11: READY replica, no verified copy in the catalog → missing; a partial copy is no copy."""
    f = decide("n1", [replica(1, 1), replica(2, 2)], [copy(2), copy(1, state="partial")],
               {art(1): row(1), art(2): row(2)}, {art(1), art(2)}, now_ms=NOW, grace_ms=GRACE)
    assert f.missing == [tpl(1)]


def test_fresh_and_not_ready_replicas_are_left_alone() -> None:
    """GC-11: only READY replicas are checked, and not inside the grace (a delta may be on its way)."""
    f = decide("n1", [replica(1, 1, updated=NOW - 5), replica(2, 2, status="FAILED")], [],
               {art(1): row(1), art(2): row(2)}, set(), now_ms=NOW, grace_ms=GRACE)
    assert f.missing == []


def test_memory_replicas_need_their_replica_entry() -> None:
    f = decide("n1", [replica(1, 1, has_memory_snapshot=True)], [copy(1)], {art(1): row(1)}, {art(1)},
               now_ms=NOW, grace_ms=GRACE)
    assert f.missing == [tpl(1)]


def test_unknown_catalog_replicas_are_listed_for_removal() -> None:
    """GC-11: a catalog replica entry without a replica row → removal."""
    entries = [copy(1), {"kind": "replica", "id": tpl(1), "body": {}}, {"kind": "replica", "id": tpl(9), "body": {}}]
    f = decide("n1", [replica(1, 1)], entries, {art(1): row(1)}, {art(1)}, now_ms=NOW, grace_ms=GRACE)
    assert f.unknown == [tpl(9)]


def test_copies_become_placements_or_strays() -> None:
    """GC-12: a copy matching a READY artifact's sha256 is a placement (once); unknown artifacts,
    other sha256s and FAILED/ORPHANED artifacts are strays; builds in progress and artifacts
    awaiting cleanup are neither."""
    entries = [copy(1), copy(2), copy(3, sha="other"), copy(4), copy(5), copy(6), copy(7), copy(8)]
    rows = {art(1): row(1), art(2): row(2), art(3): row(3), art(5): row(5, "FAILED"),
            art(6): row(6, "BUILDING"), art(7): row(7, "CLEANUP_PENDING"), art(8): row(8, "ORPHANED")}
    f = decide("n1", [], entries, rows, {art(2)}, now_ms=NOW, grace_ms=GRACE)
    assert f.placements == [art(1)]
    assert f.strays == [art(3), art(4), art(5), art(8)]


def snap(i: int) -> str:
    return f"snap-{i:024x}"


def snapshot(i: int, status: str = "READY", node: str = "n1", updated: int = 0) -> dict[str, Any]:
    return {"id": snap(i), "node_id": node, "status": status, "updated_ms": updated}


def snap_entry(i: int) -> dict[str, Any]:
    return {"kind": "snapshot", "id": snap(i), "body": {"state": "ready"}}


def test_a_ready_snapshot_missing_from_its_origin_catalog_is_missing() -> None:
    """GC-11: a READY snapshot of this node that its catalog does not list → missing; one it
    lists, one on another node, one inside the grace and FAILED/DELETING/DELETED rows are not."""
    rows = {s["id"]: s for s in (snapshot(1), snapshot(2), snapshot(3, node="n2"), snapshot(4, updated=NOW - 5),
                                 snapshot(5, "FAILED"), snapshot(6, "DELETING"), snapshot(7, "DELETED"),
                                 snapshot(8, "CREATING"))}
    missing, unknown = decide_snapshots("n1", rows, [snap_entry(2), copy(1)], now_ms=NOW, grace_ms=GRACE)
    assert missing == [snap(1)]
    assert unknown == []


def test_the_grace_ends_for_snapshots_too() -> None:
    """GC-11: once the grace is over a fresh READY snapshot still not listed is missing."""
    rows = {snap(4): snapshot(4, updated=NOW - GRACE)}
    assert decide_snapshots("n1", rows, [], now_ms=NOW, grace_ms=GRACE) == ([snap(4)], [])


def test_catalog_snapshots_without_a_row_are_listed_for_removal() -> None:
    """GC-11: a catalog snapshot entry with no row in any status → removal; a CREATING row (a
    create in flight), a DELETED tombstone, a FAILED row or another node's row keep theirs."""
    rows = {s["id"]: s for s in (snapshot(1, "CREATING"), snapshot(2, "DELETED"), snapshot(3, "FAILED"),
                                 snapshot(4, node="n2"))}
    entries = [snap_entry(i) for i in (1, 2, 3, 4, 9, 8)] + [{"kind": "replica", "id": snap(7), "body": {}}]
    missing, unknown = decide_snapshots("n1", rows, entries, now_ms=NOW, grace_ms=GRACE)
    assert (missing, unknown) == ([], [snap(8), snap(9)])
