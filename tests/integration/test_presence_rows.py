"""The presence checker's database side on SQLite and PostgreSQL (GC-11, GC-12): a missing
replica re-aggregates its template, copies become placements, and a READY artifact with no
copy left turns FAILED only when every holder can be seen. The node registry is a small fake
(health and mirror flags); the rows, the mirror tables and the transitions are real."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine

from coordinator.db.models import Artifact, Node, NodeCatalogEntry, Placement, Replica, Snapshot, Template
from coordinator.events import EventBus
from coordinator.health import Health
from coordinator.presence import MISSING, PresenceChecker

A, N, E, P, R, T = (Artifact.__table__, Node.__table__, NodeCatalogEntry.__table__, Placement.__table__,
                    Replica.__table__, Template.__table__)
SN = Snapshot.__table__
ART = "art-" + "a1" * 12
TPL = "tpl-" + "b2" * 12
NOW = 10_000_000_000


@dataclass
class _Node:
    health: Health = Health.READY
    mirror_complete: bool = True
    mirror: tuple[str, int, str] = ("e", 1, "d")


class _Registry:
    def __init__(self, nodes: list[str]) -> None:
        self.nodes = {n: _Node() for n in nodes}
        self.events = EventBus(None)
        self.published: list[tuple[str, str]] = []
        self.events.listen(lambda ev: self.published.append((ev.topic, ev.kind)))

    def health(self, n: _Node) -> Health:
        return n.health


class _NoTasks:
    async def run_task(self, *a: Any, **kw: Any) -> dict[str, Any]:
        raise AssertionError("no task expected")


@pytest.fixture
def seeded(engine: Engine) -> Engine:
    with engine.begin() as c:
        for n in ("n1", "n2"):
            c.execute(insert(N).values(id=n))
        c.execute(insert(A).values(id=ART, kind="rootfs", fingerprint="f" * 64, status="READY", sha256="s" * 64,
                                   size=10, generation=1, updated_ms=0))
        c.execute(insert(T).values(id=TPL, status="READY", source_kind="image", image_ref="x", spec={},
                                   artifact_id=ART, created_ms=0, updated_ms=0))
        for n in ("n1", "n2"):
            c.execute(insert(P).values(artifact_id=ART, node_id=n, verified=True, created_ms=0))
            c.execute(insert(R).values(template_id=TPL, node_id=n, status="READY", phase="READY",
                                       cleanup_required=False, artifact_id=ART, updated_ms=0))
            c.execute(insert(E).values(node_id=n, kind="artifact", entry_id=ART,
                                       body={"state": "verified", "sha256": "s" * 64, "size": 10}))
    return engine


def _drop_copy(engine: Engine, node: str) -> None:
    with engine.begin() as c:
        c.execute(E.delete().where(E.c.node_id == node, E.c.kind == "artifact"))


def test_missing_copy_fails_the_replica_and_reaggregates(seeded: Engine) -> None:
    """GC-11: n2 lost its copy → its replica FAILED with the reason, the template PARTIALLY_READY;
    then n1 too → the template FAILED."""
    reg = _Registry(["n1", "n2"])
    checker = PresenceChecker(reg, seeded, _NoTasks(), grace=1.0, clock=lambda: NOW / 1000)
    _drop_copy(seeded, "n2")
    found = asyncio.run(checker.run_once("n2"))
    assert found is not None and found.missing == [TPL]
    with seeded.connect() as c:
        rep = c.execute(select(R).where(R.c.node_id == "n2")).mappings().one()
        tpl = c.execute(select(T).where(T.c.id == TPL)).mappings().one()
    assert (rep["status"], rep["last_error"], rep["cleanup_required"]) == ("FAILED", MISSING, True)
    assert tpl["status"] == "PARTIALLY_READY" and MISSING in tpl["last_error"]
    assert (f"template.{TPL}", "replica") in reg.published
    assert asyncio.run(checker.run_once("n2")).missing == []  # already FAILED: nothing more to do

    _drop_copy(seeded, "n1")
    asyncio.run(checker.run_once("n1"))
    with seeded.connect() as c:
        assert c.execute(select(T.c.status).where(T.c.id == TPL)).scalar() == "FAILED"


def test_a_node_that_cannot_be_seen_is_not_checked(seeded: Engine) -> None:
    """GC-11: only READY nodes with a complete mirror."""
    reg = _Registry(["n1", "n2"])
    reg.nodes["n2"].mirror_complete = False
    _drop_copy(seeded, "n2")
    checker = PresenceChecker(reg, seeded, _NoTasks(), grace=1.0, clock=lambda: NOW / 1000)
    assert asyncio.run(checker.run_once("n2")) is None
    with seeded.connect() as c:
        assert c.execute(select(R.c.status).where(R.c.node_id == "n2")).scalar() == "READY"


def test_an_artifact_without_copies_fails_only_when_every_holder_is_seen(seeded: Engine) -> None:
    """GC-12: no verified copy left → FAILED, but not while a holder is LOST."""
    reg = _Registry(["n1", "n2"])
    checker = PresenceChecker(reg, seeded, _NoTasks(), grace=1.0, clock=lambda: NOW / 1000)
    _drop_copy(seeded, "n1")
    _drop_copy(seeded, "n2")
    reg.nodes["n2"].health = Health.LOST
    assert checker.fail_lost_artifacts() == []
    reg.nodes["n2"].health = Health.READY
    assert checker.fail_lost_artifacts() == [ART]
    with seeded.connect() as c:
        assert c.execute(select(A.c.status).where(A.c.id == ART)).scalar() == "FAILED"


def test_a_copy_of_a_ready_artifact_becomes_a_placement(seeded: Engine) -> None:
    """GC-12: a verified copy with the artifact's sha256 on a node without a placement row."""
    with seeded.begin() as c:
        c.execute(insert(N).values(id="n3"))
        c.execute(insert(E).values(node_id="n3", kind="artifact", entry_id=ART,
                                   body={"state": "verified", "sha256": "s" * 64, "size": 10}))
    reg = _Registry(["n1", "n2", "n3"])
    checker = PresenceChecker(reg, seeded, _NoTasks(), grace=1.0, clock=lambda: NOW / 1000)
    assert asyncio.run(checker.run_once("n3")).placements == [ART]
    with seeded.connect() as c:
        assert sorted(c.execute(select(P.c.node_id).where(P.c.artifact_id == ART)).scalars()) == ["n1", "n2", "n3"]


class _Tasks:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, Any], str]] = []

    async def run_task(self, node: str, op: str, args: dict[str, Any], task_id: str) -> dict[str, Any]:
        self.sent.append((node, op, args, task_id))
        return {}


def test_snapshot_presence(seeded: Engine) -> None:
    """GC-11 for snapshots: a READY snapshot its origin no longer lists turns FAILED "missing from
    node catalog" once outside the grace; a DELETED tombstone without files stays DELETED; a
    catalog snapshot with no row gets REMOVE_SNAPSHOT (one id per state), a CREATING one does not."""
    def sid(i: int) -> str:
        return f"snap-{i:024x}"
    with seeded.begin() as c:
        for i, status, updated in ((1, "READY", 0), (2, "DELETED", 0), (3, "CREATING", 0), (4, "READY", NOW),
                                   (5, "READY", 0)):
            c.execute(insert(SN).values(id=sid(i), status=status, sandbox_id="sbx-" + "c3" * 12, node_id="n1",
                                        created_ms=0, updated_ms=updated))
        for i in (3, 5, 9):  # 3: a create in flight; 5: listed, stays READY; 9: nobody knows it
            c.execute(insert(E).values(node_id="n1", kind="snapshot", entry_id=sid(i), body={}))
    reg, tasks = _Registry(["n1", "n2"]), _Tasks()
    checker = PresenceChecker(reg, seeded, tasks, grace=1.0, clock=lambda: NOW / 1000)
    found = asyncio.run(checker.run_once("n1"))
    assert found is not None and found.snapshots_missing == [sid(1)]  # 4 is inside the grace
    assert found.snapshots_unknown == [sid(9)]
    with seeded.connect() as c:
        got = {r.id: (r.status, r.last_error) for r in c.execute(select(SN.c.id, SN.c.status, SN.c.last_error))}
    assert got[sid(1)] == ("FAILED", MISSING)
    assert got[sid(2)] == ("DELETED", "") and got[sid(3)][0] == "CREATING"
    assert got[sid(4)] == ("READY", "") and got[sid(5)] == ("READY", "")
    assert [(n, op, a) for n, op, a, _ in tasks.sent] == [("n1", "REMOVE_SNAPSHOT", {"snapshot_id": sid(9)})]
    assert checker._recent("n1")  # the fresh READY snapshot brings a second look after the grace

    asyncio.run(checker.run_once("n1"))  # the same state again: the same task id (deterministic)
    assert len(tasks.sent) == 2 and tasks.sent[0] == tasks.sent[1]
    later = PresenceChecker(reg, seeded, tasks, grace=1.0, clock=lambda: NOW / 1000 + 2)
    assert asyncio.run(later.run_once("n1")).snapshots_missing == [sid(4)]  # the grace is over
