"""Key acceptance rules against a real database, in-process (SEC-3, SEC-4, NODE-1)."""
from __future__ import annotations

import asyncio

import pytest
import zmq

from coordinator.db.engine import ensure_schema, make_engine
from coordinator.keys import KeyRegistry
from protocol.errors import InvalidRequest, NodeKeyPending, NodeNotFound, Unauthorized


def new_key() -> str:
    return zmq.curve_keypair()[0].decode()


@pytest.fixture
def keys(db_url: str):
    engine = make_engine(db_url)
    ensure_schema(engine, migrate_now=True)
    now = [1_000.0]
    reg = KeyRegistry(engine, max_pending=3, clock=lambda: now[0])
    reg.now = now  # type: ignore[attr-defined]
    yield reg
    engine.dispose()


def test_pending_bound_and_evicted(keys: KeyRegistry) -> None:
    """SEC-3: unknown → pending (NodeKeyPending); at most max_pending wait, the oldest evicted;
    the table survives a reload. SEC-4/NODE-1: accept binds; another key for the id → Unauthorized."""
    async def run() -> None:
        ks = [new_key() for _ in range(5)]
        for i, k in enumerate(ks):
            keys.now[0] += 1
            with pytest.raises(NodeKeyPending):
                await keys.on_hello(k, f"n{i}")
        pending = sorted(r.node_id for r in keys.keys.values() if r.state == "pending")
        assert pending == ["n2", "n3", "n4"], "the two oldest pending keys are evicted"
        await keys.accept("n3")
        await keys.on_hello(ks[3], "n3")  # accepted: no exception
        with pytest.raises(Unauthorized):
            await keys.on_hello(ks[3], "n4")  # bound to n3
        with pytest.raises(Unauthorized):
            await keys.on_hello(new_key(), "n3")  # n3 is bound to another key
        await keys.reject(keys.keys[ks[4]].fingerprint)
        assert not keys.allow_handshake(ks[4]) and keys.allow_handshake(ks[2])
        with pytest.raises(NodeNotFound):
            keys.find("nope")
        fresh = KeyRegistry(keys.engine)
        fresh.load()
        assert {r.node_id: r.state for r in fresh.keys.values()} == {"n2": "pending", "n3": "accepted",
                                                                    "n4": "rejected"}
        # Two pending keys claiming one id: accepting by node id is ambiguous, by fingerprint is not.
        a, b = new_key(), new_key()
        for k in (a, b):
            with pytest.raises(NodeKeyPending):
                await fresh.on_hello(k, "twin")
        with pytest.raises(InvalidRequest):
            await fresh.accept("twin")
        rec = await fresh.accept(fresh.keys[a].fingerprint)
        assert rec.node_id == "twin" and rec.state == "accepted"
        with pytest.raises(Unauthorized):
            await fresh.accept(fresh.keys[b].fingerprint)
    asyncio.run(run())
