"""The node registry against a real database, in-process (NODE-1, NODE-7, NODE-9, CAT-5).

Statements are counted with a SQLAlchemy ``before_cursor_execute`` listener: heartbeats must
cost no database write until the batched flush, and versions/facts are rewritten only when
their digest changes.
"""
from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from sqlalchemy import event

from coordinator.db.engine import ensure_schema, make_engine
from coordinator.events import EventBus
from coordinator.health import Health, Thresholds
from coordinator.mirror import CatalogMirrors
from protocol.canonical import catalog_digest, digest
from protocol.errors import MalformedMessage, SessionUnknown
from protocol.messages import CatalogSnapshot, Heartbeat, Hello, Versions
from coordinator.nodes import NodeRegistry

WRITE = re.compile(r"\s*(INSERT INTO|UPDATE|DELETE FROM)\s+\"?(\w+)", re.I)
VERSIONS = {"agent": "0.1.0", "guest_image": "", "host_kernel": "6.1", "hypervisor": "none"}


def hello(node: str, versions: dict[str, str] = VERSIONS, facts: dict[str, Any] | None = None,
          catalog: dict[str, Any] | None = None) -> Hello:
    return Hello(msg_id=f"h-{node}", node_id=node, address="127.0.0.1", blob_endpoint="tcp://127.0.0.1:9",
                 facts=facts or {"host_name": node, "cores": 2}, versions=versions, labels={},
                 capabilities={"build": True, "sandbox": False},
                 catalog=catalog or {"epoch": "ab" * 16, "seq": 0, "digest": catalog_digest([])})


def beat(sid: str, seq: int, vdigest: str = digest(VERSIONS)) -> Heartbeat:
    return Heartbeat(msg_id=f"b{seq}", session_id=sid, seq=seq, catalog_seq=0, catalog_digest=catalog_digest([]),
                     versions_digest=vdigest, refs_digest="", storage={"total": 100, "used": 10, "free": 90},
                     mem_free=1 << 30, sandboxes=0)


@pytest.fixture
def registry(db_url: str):
    engine = make_engine(db_url)
    ensure_schema(engine, migrate_now=True)
    writes: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def count(conn, cursor, statement, params, context, executemany):  # noqa: ANN001
        m = WRITE.match(statement)
        if m:
            writes.append(f"{m.group(1).split()[0].upper()} {m.group(2)}")
    reg = NodeRegistry(engine, Thresholds(interval=2.0, failover_grace=0), EventBus(None))
    reg.writes = writes  # type: ignore[attr-defined]
    yield reg
    engine.dispose()


def test_heartbeats_are_batched_and_versions_written_on_change(registry: NodeRegistry) -> None:
    """NODE-9: 500 heartbeats, zero writes; one flush, one batched UPDATE; versions only on change."""
    async def run() -> None:
        w = await registry.hello(hello("n1"))
        assert w.want_full_catalog is True  # a new node has no mirror yet (NODE-3)
        n = registry.nodes["n1"]
        assert registry.health(n) is Health.WARMING
        registry.writes.clear()
        for i in range(1, 501):
            ack = registry.heartbeat("n1", beat(w.session_id, i))
            # None = the plain ACK: no new interval, and nothing wanted — in particular WELCOME
            # already asked for the catalog, so heartbeats do not ask again meanwhile (CAT-5).
            assert ack is None
        assert registry.writes == [], "heartbeats must not write the database one by one"
        assert await registry.flush() == 1
        assert registry.writes == ["UPDATE nodes"]
        registry.writes.clear()
        await registry.versions("n1", Versions(msg_id="v1", session_id=w.session_id, versions=VERSIONS,
                                               digest=digest(VERSIONS)))
        assert registry.writes == [], "unchanged versions digest: nothing written"
        newer = {**VERSIONS, "agent": "0.2.0"}
        ack = registry.heartbeat("n1", beat(w.session_id, 501, digest(newer)))
        assert ack.wants and "versions" in ack.wants
        await registry.versions("n1", Versions(msg_id="v2", session_id=w.session_id, versions=newer,
                                               digest=digest(newer)))
        assert "DELETE node_versions" in registry.writes and "INSERT node_versions" in registry.writes
        with pytest.raises(MalformedMessage):
            await registry.versions("n1", Versions(msg_id="v3", session_id=w.session_id, versions=newer,
                                                   digest=digest(VERSIONS)))
        with pytest.raises(SessionUnknown):
            registry.heartbeat("n1", beat("0" * 32, 1))
        # NODE-11: a WARMING (not READY) node's versions read unknown.
        assert registry.trusted_versions(n) == {k: "" for k in newer}
        n.mirror_complete = True
        assert registry.trusted_versions(n) == newer
    asyncio.run(run())


def test_rehello_rewrites_facts_only_on_change_and_snapshot_completes_mirror(registry: NodeRegistry) -> None:
    """NODE-9, NODE-3, CAT-5: unchanged facts/versions are not rewritten; a snapshot whose digest
    matches makes the node READY; a second HELLO with the same catalog is READY at once."""
    async def run() -> None:
        w = await registry.hello(hello("n1"))
        mirrors = CatalogMirrors(registry)
        entries = [{"kind": "artifact", "id": "art-" + "0" * 24, "body": {"size": 5}}]
        bad = CatalogSnapshot(msg_id="c0", session_id=w.session_id, epoch="ab" * 16, seq=3, page=0, last=True,
                              entries=entries, digest=catalog_digest([]))
        with pytest.raises(MalformedMessage):
            await mirrors.snapshot_page("n1", bad)
        assert registry.health(registry.nodes["n1"]) is Health.WARMING
        good = CatalogSnapshot(msg_id="c1", session_id=w.session_id, epoch="ab" * 16, seq=3, page=0, last=True,
                               entries=entries, digest=catalog_digest(entries))
        await mirrors.snapshot_page("n1", good)
        assert registry.health(registry.nodes["n1"]) is Health.READY
        registry.writes.clear()
        cat = {"epoch": "ab" * 16, "seq": 3, "digest": catalog_digest(entries)}
        w2 = await registry.hello(hello("n1", catalog=cat))
        assert w2.want_full_catalog is False and w2.session_id != w.session_id
        assert registry.health(registry.nodes["n1"]) is Health.READY
        assert registry.writes == ["UPDATE nodes"], registry.writes
        # The reloaded registry (a coordinator restart) knows the mirror: no snapshot needed.
        fresh = NodeRegistry(registry.engine, registry.t, EventBus(None))
        fresh.load()
        w3 = await fresh.hello(hello("n1", catalog=cat))
        assert w3.want_full_catalog is False
    asyncio.run(run())


def test_interval_stretches_with_node_count(registry: NodeRegistry) -> None:
    """NODE-7: H = max(interval, nodes ÷ max_rate); the new H goes out in HEARTBEAT_ACK."""
    async def run() -> None:
        registry.t = Thresholds(interval=0.5, max_rate=4, failover_grace=0)
        w = await registry.hello(hello("n1"))
        assert w.heartbeat_interval == 500
        for i in range(2, 5):
            await registry.hello(hello(f"n{i}"))
        ack = registry.heartbeat("n1", beat(w.session_id, 1))
        assert ack is not None and ack.interval == 1000 and ack.parent_id == "b1"
        await registry.hello(hello("n5"))
        await registry.hello(hello("n6"))
        ack = registry.heartbeat("n1", beat(w.session_id, 2))
        assert ack.interval == 1500  # 6 nodes ÷ 4 per second
        assert registry.heartbeat("n1", beat(w.session_id, 3)) is None  # sent once
    asyncio.run(run())
