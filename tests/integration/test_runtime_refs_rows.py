"""Runtime refs on SQLite and PostgreSQL (SNAP-18 to SNAP-21, NODE-14, GC-10, WIRE-8, WIRE-9): the
rows, a node's complete report, the reconciler's marks and expiry, node removal, and the
coordinator's side of the report (heartbeat ``wants: refs`` and the RUNTIME_REFS handler).
The node registry for the reconciler is a small fake (health only); rows are real."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
import zmq
import zmq.asyncio
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from coordinator.agents import AgentEndpoint
from coordinator.db.models import Node, NodeCatalogEntry, RuntimeRef, Sandbox, Snapshot
from coordinator.db.node_removal import remove_node
from coordinator.events import EventBus
from coordinator.health import Health, Thresholds
from coordinator.nodes import NodeRegistry
from coordinator.snapshots import refs
from coordinator.snapshots.refs_reconcile import reconcile_refs
from protocol import codec
from protocol.canonical import catalog_digest, digest
from protocol.messages import Heartbeat, Hello, RuntimeRefs
from protocol.peers import PeerTable
from tests.support import async_wait_for

RR, SN, SB, N, E = (RuntimeRef.__table__, Snapshot.__table__, Sandbox.__table__, Node.__table__,
                    NodeCatalogEntry.__table__)
NOW = 10_000_000_000
HOUR = 3_600_000


def snap(n: int) -> str:
    return f"snap-{n:024x}"


def sbx(n: int) -> str:
    return f"sbx-{n:024x}"


S1, S2, S3 = snap(1), snap(2), snap(3)
B1, B2, B3 = sbx(1), sbx(2), sbx(3)


def _snapshots(engine: Engine, **status: str) -> None:
    with engine.begin() as c:
        for sid, st in status.items():
            c.execute(insert(SN).values(id=sid, status=st, sandbox_id=B1, node_id="n1"))


def _rows(engine: Engine, **where: Any) -> list[dict[str, Any]]:
    stmt = select(RR).order_by(RR.c.id)
    for k, v in where.items():
        stmt = stmt.where(RR.c[k] == v)
    with engine.connect() as c:
        return [dict(r) for r in c.execute(stmt).mappings()]


def _acquire(engine: Engine, s: str, b: str, node: str = "n1", gen: int = 1, now: int = NOW) -> int:
    with engine.begin() as c:
        return refs.acquire(c, snapshot_id=s, sandbox_id=b, node_id=node, generation=gen, now_ms=now)


def test_acquire_switches_and_one_active_ref_per_sandbox(engine: Engine) -> None:
    """SNAP-18: acquire releases the sandbox's ACTIVE ref ("switched runtime ref") and inserts the
    new one in the caller's transaction; the partial unique index refuses a second ACTIVE ref;
    SNAP-9 active_generation; SNAP-17 ref_summary."""
    first = _acquire(engine, S1, B1, gen=1)
    second = _acquire(engine, S2, B1, gen=2, now=NOW + 5)
    assert second != first
    rows = {r["id"]: r for r in _rows(engine, sandbox_id=B1)}
    assert (rows[first]["status"], rows[first]["release_reason"], rows[first]["released_ms"]) == \
        ("RELEASED", "switched runtime ref", NOW + 5)
    new = rows[second]
    assert (new["status"], new["snapshot_id"], new["node_id"], new["binding"], new["generation"]) == \
        ("ACTIVE", S2, "n1", "memory_backing", 2)
    assert new["attached_ms"] == new["last_seen_ms"] == NOW + 5 and new["last_error"] == ""
    with pytest.raises(IntegrityError):
        with engine.begin() as c:
            c.execute(insert(RR).values(snapshot_id=S3, sandbox_id=B1, node_id="n1", status="ACTIVE"))
    # A failed caller transaction takes its acquire with it.
    with pytest.raises(RuntimeError):
        with engine.begin() as c:
            refs.acquire(c, snapshot_id=S3, sandbox_id=B1, node_id="n1", generation=3, now_ms=NOW + 9)
            raise RuntimeError("caller failed")
    assert [r["snapshot_id"] for r in _rows(engine, sandbox_id=B1, status="ACTIVE")] == [S2]
    assert refs.active_generation(engine, B1) == 2 and refs.active_generation(engine, B2) == 0
    _acquire(engine, S2, B2, gen=0)
    assert refs.ref_summary(engine, [S1, S2]) == {S1: (0, []), S2: (2, [B1, B2])}
    assert [r["sandbox_id"] for r in refs.active_refs(engine, S2)] == [B1, B2]


def test_release_sandbox_returns_the_affected_snapshots(engine: Engine) -> None:
    """SNAP-19: destroy releases every ACTIVE ref of the sandbox ("sandbox destroyed") and names
    the snapshots for the tombstone finaliser; other sandboxes keep theirs."""
    _acquire(engine, S1, B1)
    with engine.begin() as c:
        refs.acquire(c, snapshot_id=S2, sandbox_id=B1, node_id="n1", generation=1, now_ms=NOW, binding="disk")
    _acquire(engine, S1, B2)
    assert refs.release_sandbox(engine, B1, now_ms=NOW + 1) == [S1, S2]
    gone = _rows(engine, sandbox_id=B1)
    assert {(r["status"], r["release_reason"], r["released_ms"]) for r in gone} == \
        {("RELEASED", "sandbox destroyed", NOW + 1)}
    assert refs.release_sandbox(engine, B1) == []  # nothing left: nothing to name
    assert [r["status"] for r in _rows(engine, sandbox_id=B2)] == ["ACTIVE"]


def test_apply_report(engine: Engine) -> None:
    """SNAP-19, SNAP-20: a complete report from n1 — a matching ref is refreshed (node,
    generation, last seen; error cleared), another snapshot is "reconciled runtime ref" plus a
    new ACTIVE ref, a new sandbox is inserted, an absent ref is "runtime ref not observed on
    node"; n2's refs are untouched; bad items are skipped (their sandbox's ref left alone)."""
    kept = _acquire(engine, S1, B1, node="n1", gen=1)
    switched = _acquire(engine, S1, B2, node="n1", gen=1)
    absent = _acquire(engine, S2, B3, node="n1", gen=1)
    other = _acquire(engine, S1, sbx(9), node="n2", gen=1)
    unsure = _acquire(engine, S3, sbx(8), node="n1", gen=4)
    refs.mark_unreachable(engine, "n1", NOW - 1000)
    report = [
        {"snapshot_id": S1, "sandbox_id": B1, "binding": "memory_backing", "generation": 3},
        {"snapshot_id": S2, "sandbox_id": B2, "binding": "memory_backing", "generation": 2},
        {"snapshot_id": S3, "sandbox_id": sbx(4), "binding": "memory_backing", "generation": 0},
        {"snapshot_id": "../../etc", "sandbox_id": sbx(5), "binding": "memory_backing", "generation": 1},
        {"snapshot_id": S3, "sandbox_id": sbx(8), "binding": "memory_backing", "generation": -1},
        {"snapshot_id": S3, "sandbox_id": sbx(6), "binding": "x" * 500, "generation": 1},
        {"snapshot_id": S3, "sandbox_id": sbx(7), "binding": "memory_backing", "generation": True},
        "not a map",
    ]
    released = refs.apply_report(engine, "n1", report, NOW + 100)
    assert released == [S1, S2]
    by_id = {r["id"]: r for r in _rows(engine)}
    k = by_id[kept]
    assert (k["status"], k["generation"], k["last_seen_ms"], k["last_error"]) == ("ACTIVE", 3, NOW + 100, "")
    assert (by_id[switched]["status"], by_id[switched]["release_reason"]) == ("RELEASED", "reconciled runtime ref")
    assert (by_id[absent]["status"], by_id[absent]["release_reason"]) == \
        ("RELEASED", "runtime ref not observed on node")
    assert by_id[other]["status"] == "ACTIVE" and by_id[other]["last_seen_ms"] == NOW  # another node's
    assert by_id[unsure]["status"] == "ACTIVE"  # only a refused item named it: no verdict on it
    active = {(r["sandbox_id"], r["snapshot_id"], r["generation"]) for r in _rows(engine, status="ACTIVE",
                                                                                 node_id="n1")}
    assert active == {(B1, S1, 3), (B2, S2, 2), (sbx(4), S3, 0), (sbx(8), S3, 4)}
    # Same report again: nothing more released; a stale (older generation) ref changes nothing.
    assert refs.apply_report(engine, "n1", report, NOW + 200) == []
    stale = [{"snapshot_id": S1, "sandbox_id": B2, "binding": "memory_backing", "generation": 1}]
    released = refs.apply_report(engine, "n1", stale, NOW + 300)
    assert (B2, S2) in {(r["sandbox_id"], r["snapshot_id"]) for r in _rows(engine, status="ACTIVE")}
    assert released == [S1, S3]  # B1 and sbx(4) not reported any more
    assert refs.apply_report(engine, "n1", "garbage", NOW) == [S2]  # type: ignore[arg-type]
    assert _rows(engine, status="ACTIVE", node_id="n1") == []


def test_mark_unreachable_and_orphan_expiry(engine: Engine) -> None:
    """SNAP-21: unreachable refs get last_error "node unreachable since T" and stay ACTIVE; an orphan
    ref expires only on a DELETED snapshot, only for an unknown sandbox, only after the TTL; a
    failing lookup keeps it."""
    _snapshots(engine, **{S1: "DELETED", S2: "READY"})
    old = _acquire(engine, S1, B1, now=NOW - 2 * HOUR)
    ready = _acquire(engine, S2, B2, now=NOW - 2 * HOUR)
    known = _acquire(engine, S1, B3, now=NOW - 2 * HOUR)
    young = _acquire(engine, S1, sbx(4), now=NOW - 10)
    flaky = _acquire(engine, S1, sbx(5), now=NOW - 2 * HOUR)
    assert refs.mark_unreachable(engine, "n1", 1_700_000_000_000) == 5
    assert refs.mark_unreachable(engine, "n1", 1_700_000_000_000) == 0  # already says so
    assert {(r["status"], r["last_error"]) for r in _rows(engine)} == \
        {("ACTIVE", "node unreachable since 2023-11-14T22:13:20Z")}

    def sandbox_known(sid: str) -> bool:
        if sid == sbx(5):
            raise OSError("database unreachable")
        return sid == B3
    assert refs.expire_orphans(engine, now_ms=NOW, ttl_ms=HOUR, sandbox_known=sandbox_known) == [S1]
    by_id = {r["id"]: r for r in _rows(engine)}
    assert (by_id[old]["status"], by_id[old]["release_reason"], by_id[old]["released_ms"]) == \
        ("RELEASED", "orphan ref expired", NOW)
    assert all(by_id[i]["status"] == "ACTIVE" for i in (ready, known, young, flaky))
    # A ref seen recently (a report refreshed it) is no orphan, however old its attach.
    refs.apply_report(engine, "n1", [{"snapshot_id": S1, "sandbox_id": sbx(5), "binding": "memory_backing",
                                      "generation": 1}], NOW)
    assert refs.expire_orphans(engine, now_ms=NOW + 10, ttl_ms=HOUR, sandbox_known=lambda s: False) == []


def test_node_removal_releases_its_refs(engine: Engine) -> None:
    """NODE-14: removing a node releases its ACTIVE refs ("node removed") in the same transaction;
    other nodes' refs stay."""
    with engine.begin() as c:
        c.execute(insert(N).values(id="n1"))
        c.execute(insert(N).values(id="n2"))
    mine = _acquire(engine, S1, B1, node="n1")
    theirs = _acquire(engine, S1, B2, node="n2")
    assert remove_node(engine, "n1") == [S1]  # the snapshots for the tombstone finaliser (SNAP-14)
    assert remove_node(engine, "n1") is None  # gone already
    by_id = {r["id"]: r for r in _rows(engine)}
    assert (by_id[mine]["status"], by_id[mine]["release_reason"]) == ("RELEASED", "node removed")
    assert by_id[theirs]["status"] == "ACTIVE"


@dataclass
class _Node:
    health: Health
    last_seen: float | None = NOW / 1000 - 60
    created_ms: int = 0
    refs_digest: str | None = "d" * 64


class _Registry:
    def __init__(self, nodes: dict[str, Health]) -> None:
        self.nodes = {k: _Node(h) for k, h in nodes.items()}

    def health(self, n: _Node) -> Health:
        return n.health


def test_reconcile_pass(engine: Engine) -> None:
    """GC-10, SNAP-21: SUSPECT and LOST nodes' refs are marked unreachable since their last contact
    (READY nodes' are not, and READY nodes are asked for a full report again); orphan refs of
    sandboxes with no record and no catalog entry expire and reach the finaliser; a record or a
    catalog entry keeps one."""
    with engine.begin() as c:
        c.execute(insert(N).values(id="n1"))
        c.execute(insert(SB).values(id=B2, request_id="r2", source_id=S1, node_id="n1"))
        c.execute(insert(E).values(node_id="n1", kind="sandbox", entry_id=B3, body={"state": "RUNNING"}))
    _snapshots(engine, **{S1: "DELETED"})
    for b, node in ((B1, "n1"), (B2, "n2"), (B3, "n3")):
        _acquire(engine, S1, b, node=node, now=NOW - 2 * HOUR)
    reg = _Registry({"n1": Health.READY, "n2": Health.SUSPECT, "n3": Health.LOST})
    got: list[list[str]] = []

    async def on_released(ids: list[str]) -> None:
        got.append(ids)
    expired = asyncio.run(reconcile_refs(engine, reg, now_ms=NOW, ttl_ms=HOUR, on_released=on_released))
    assert expired == [S1] and got == [[S1]]
    rows = {r["sandbox_id"]: r for r in _rows(engine)}
    assert (rows[B1]["status"], rows[B1]["release_reason"]) == ("RELEASED", "orphan ref expired")
    since = refs.unreachable_message(NOW - 60_000)
    assert (rows[B2]["status"], rows[B2]["last_error"]) == ("ACTIVE", since)  # a record: known
    assert (rows[B3]["status"], rows[B3]["last_error"]) == ("ACTIVE", since)  # a catalog entry: known
    assert reg.nodes["n1"].refs_digest is None and reg.nodes["n2"].refs_digest == "d" * 64


def _report(items: list[dict[str, Any]]) -> str:
    return digest(items) if items else ""


def test_heartbeat_wants_refs_and_the_handler_applies_reports(engine: Engine) -> None:
    """WIRE-8, WIRE-9, SNAP-19, SNAP-20: a READY node's heartbeat is asked for refs until a report
    with its digest is applied; RUNTIME_REFS through the agent endpoint updates the rows in a
    worker thread and hands released snapshots to the finaliser; a digest that does not match
    is refused and applies nothing."""
    async def run() -> None:
        reg = NodeRegistry(engine, Thresholds(interval=2.0, failover_grace=0), EventBus(None))
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.bind("inproc://refs-test")
        try:
            ep = AgentEndpoint(sock, reg, codec.Limits(), PeerTable(10, 1.0))
            finalised: list[list[str]] = []

            async def fin(ids: list[str]) -> None:
                finalised.append(ids)
            ep.on_refs_released = fin
            w = await reg.hello(Hello(msg_id="h1", node_id="n1", address="127.0.0.1",
                                      blob_endpoint="tcp://127.0.0.1:9", facts={}, versions={"agent": "1"},
                                      labels={}, capabilities={}, catalog={"epoch": "ab" * 16, "seq": 0,
                                                                           "digest": catalog_digest([])}))
            n = reg.nodes["n1"]
            gone = _acquire(engine, S2, B2, node="n1")
            items = [{"snapshot_id": S1, "sandbox_id": B1, "binding": "memory_backing", "generation": 2}]

            def beat(seq: int, refs_digest: str) -> Any:
                return reg.heartbeat("n1", Heartbeat(
                    msg_id=f"b{seq}", session_id=w.session_id, seq=seq, catalog_seq=0,
                    catalog_digest=catalog_digest([]), versions_digest=digest({"agent": "1"}),
                    refs_digest=refs_digest, storage={"total": 100, "used": 1, "free": 99}, mem_free=1,
                    sandboxes=1))
            assert beat(1, _report(items)) is None  # WARMING (no mirror yet): not asked
            n.mirror, n.mirror_complete = ("ab" * 16, 0, catalog_digest([])), True
            assert reg.health(n) is Health.READY
            assert beat(2, "").wants == ["refs"]  # nothing applied yet in this process: ask once
            bad = RuntimeRefs(msg_id="r0", session_id=w.session_id, refs=items, digest="0" * 64)
            ep.handle(bad.to_frames(b"n1"))
            good = RuntimeRefs(msg_id="r1", session_id=w.session_id, refs=items, digest=_report(items))
            ep.handle(good.to_frames(b"n1"))
            assert beat(3, _report(items)) is None  # that report is on its way: not asked again
            await async_wait_for(lambda: finalised, 10, "the finaliser called with the released snapshot")
            assert finalised == [[S2]] and n.refs_digest == _report(items)
            assert beat(4, _report(items)) is None
            assert beat(5, "").wants == ["refs"]  # the node's refs changed: ask
            by_id = {r["id"]: r for r in _rows(engine)}
            assert by_id[gone]["release_reason"] == "runtime ref not observed on node"
            assert [(r["sandbox_id"], r["generation"]) for r in _rows(engine, status="ACTIVE")] == [(B1, 2)]
        finally:
            sock.close(linger=0)
            ctx.term()
    asyncio.run(run())
