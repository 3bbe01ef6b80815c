"""The catalog delta/snapshot protocol as a property (CAT-2, CAT-4, CAT-5, NODE-3; STYLE 9,
the zguide "Clone" pattern).

The real agent side (``agent.catalog.Catalog`` on a tmp SQLite file and its ``CatalogFeed``)
talks to the real coordinator side (``NodeRegistry`` + ``CatalogMirrors`` +
``coordinator/db/node_store`` on a migrated tmp SQLite coordinator database) through a
simulated network that can drop and reorder messages. Agent restarts lose the journal;
coordinator restarts lose all memory but the persisted mirror. Whatever happens, once the
network behaves again the protocol's own recovery (a snapshot on a gap or mismatch) ends with
the mirror equal to the agent's catalog — and with no faults, deltas alone keep it equal.
"""
from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from agent.catalog import TASK_KIND, Catalog, CatalogFeed
from coordinator.db import node_store
from coordinator.db.engine import ensure_schema, make_engine
from coordinator.events import EventBus
from coordinator.health import Thresholds
from coordinator.mirror import CatalogMirrors
from coordinator.nodes import NodeRegistry
from protocol.canonical import catalog_digest, digest
from protocol.errors import MalformedMessage, SessionUnknown
from protocol.messages import CatalogDelta, CatalogSnapshot, Heartbeat, Hello

H = 2.0          # heartbeat interval, s (simulated clock)
# SQLite fsyncs every commit (synchronous=FULL): on a RAM disk the examples take seconds.
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None
PAGE = 3         # small pages, so snapshots span several messages
VERSIONS = {"agent": "1"}
VDIGEST = digest(VERSIONS)
_nodes = itertools.count()


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    d = tempfile.mkdtemp(prefix="tc-mirror-", dir=SCRATCH)
    e = make_engine(f"sqlite:///{d}/c.db")
    ensure_schema(e, migrate_now=True)
    yield e
    e.dispose()
    shutil.rmtree(d, ignore_errors=True)


class Sim:
    """One agent and one coordinator; ``net`` holds agent → coordinator messages in flight."""

    def __init__(self, engine: Any, state_dir: str) -> None:
        self.engine = engine
        self.dir = state_dir
        self.node = f"n{next(_nodes)}"
        self.now = 1000.0
        self.ids = itertools.count()
        self.cat = Catalog.open(state_dir)
        self.feed = CatalogFeed(self.cat)
        self.net: list[Any] = []
        self.session = ""
        self.snapshots = 0
        self.asked = 0
        self._coordinator()

    def _coordinator(self) -> None:
        self.reg = NodeRegistry(self.engine, Thresholds(interval=H, failover_grace=0), EventBus(None),
                                clock=lambda: self.now)
        self.reg.load()
        self.mirrors = CatalogMirrors(self.reg)

    def mid(self) -> str:
        return f"m-{next(self.ids)}"

    # --- agent side ---------------------------------------------------------------
    async def hello(self) -> None:
        ident = self.cat.identity()
        welcome = await self.reg.hello(Hello(
            msg_id=self.mid(), node_id=self.node, address="127.0.0.1", blob_endpoint="tcp://127.0.0.1:9",
            facts={"host_name": self.node}, versions=VERSIONS, labels={},
            capabilities={"build": False, "sandbox": False}, catalog=ident.to_wire()))
        self.session = welcome.session_id
        if welcome.want_full_catalog:
            self.snapshot()
        else:
            self.feed.start(ident.seq)

    def snapshot(self) -> None:
        snap = self.feed.snapshot()
        pages = list(snap.pages(PAGE))
        for i, entries in enumerate(pages):
            self.net.append(CatalogSnapshot(msg_id=self.mid(), session_id=self.session, epoch=snap.identity.epoch,
                                            seq=snap.identity.seq, page=i, last=i == len(pages) - 1,
                                            entries=entries, digest=snap.identity.digest))
        self.snapshots += 1

    def flush(self) -> None:
        d = self.feed.pending()
        if d is not None:
            self.net.append(CatalogDelta(msg_id=self.mid(), session_id=self.session, epoch=d.epoch,
                                         from_seq=d.from_seq, to_seq=d.to_seq, upserts=d.upserts,
                                         deletes=d.deletes, digest=d.digest))
            self.feed.sent(d)

    def beat(self, between: list[tuple[Any, ...]] = ()) -> None:  # type: ignore[assignment]
        """As the agent's ``_beat``: flush, then the heartbeat, answered inline (it overtakes
        whatever is still in flight, as on the real coordinator). ``between``: changes that
        commit after the flush, before the beat reads the catalog identity."""
        self.flush()
        for op in between:
            self.change(op)
        self.now += H
        ident = self.cat.identity()
        ack = self.reg.heartbeat(self.node, Heartbeat(
            msg_id=self.mid(), session_id=self.session, seq=1, catalog_seq=ident.seq,
            catalog_digest=ident.digest, versions_digest=VDIGEST, refs_digest="",
            storage={"total": 1, "used": 0, "free": 1}, mem_free=1, sandboxes=0))
        if ack is not None and "catalog" in (ack.wants or ()):
            self.asked += 1
            self.snapshot()

    def change(self, op: tuple[Any, ...]) -> None:
        if op[0] == "put":
            self.cat.put(op[1], op[2], {"v": op[3]})
        elif op[0] == "del":
            self.cat.delete(op[1], op[2])
        else:
            self.cat.put(TASK_KIND, op[1], {"status": op[2]})

    async def agent_restart(self) -> None:
        self.cat.close()
        self.cat = Catalog.open(self.dir)
        self.feed = CatalogFeed(self.cat)
        self.net.clear()  # a killed agent's socket takes its queue with it
        await self.hello()

    async def coordinator_restart(self) -> None:
        self._coordinator()
        self.net.clear()
        await self.hello()  # the agent's next message gets SessionUnknown: HELLO again (WIRE-11)

    # --- coordinator side ---------------------------------------------------------
    async def deliver(self, index: int = 0) -> None:
        msg = self.net.pop(index)
        try:
            if isinstance(msg, CatalogDelta):
                await self.mirrors.delta(self.node, msg)
            else:
                await self.mirrors.snapshot_page(self.node, msg)
        except (SessionUnknown, MalformedMessage):
            pass  # an old session's message, or pages out of order: the protocol recovers

    async def deliver_all(self) -> None:
        while self.net:
            await self.deliver()

    # --- checks -------------------------------------------------------------------
    def converged(self) -> bool:
        n = self.reg.nodes[self.node]
        ident = self.cat.identity()
        return n.mirror_complete and n.mirror == (ident.epoch, ident.seq, ident.digest)

    def check_persisted(self) -> None:
        ident = self.cat.identity()
        assert catalog_digest(node_store.mirror_entries(self.engine, self.node)) == ident.digest
        row = next(r for r in node_store.load_nodes(self.engine) if r["id"] == self.node)
        assert (row["catalog_epoch"], row["catalog_seq"], row["catalog_digest"]) == (ident.epoch, ident.seq,
                                                                                     ident.digest)

    def close(self) -> None:
        self.cat.close()


KINDS = st.sampled_from(["artifact", "layer", "replica", "orphan"])
IDS = st.sampled_from(["a", "b", "c", "d", "e"])
CHANGES = st.one_of(
    st.tuples(st.just("put"), KINDS, IDS, st.integers(0, 3)),
    st.tuples(st.just("del"), KINDS, IDS),
    st.tuples(st.just("task"), st.sampled_from(["t1", "t2", "t3"]), st.sampled_from(["running", "done"])),
)
FAULTY = st.one_of(
    CHANGES, CHANGES,
    st.tuples(st.just("flush")), st.tuples(st.just("beat")),
    st.tuples(st.just("deliver"), st.integers(0, 20)), st.tuples(st.just("deliver"), st.integers(0, 20)),
    st.tuples(st.just("drop"), st.integers(0, 20)),
    st.tuples(st.just("agent_restart")), st.tuples(st.just("coordinator_restart")),
)


def run(engine: Any, body: Any) -> None:
    d = tempfile.mkdtemp(prefix="tc-cat-", dir=SCRATCH)
    sim = Sim(engine, d)
    try:
        asyncio.run(body(sim))
    finally:
        sim.close()
        shutil.rmtree(d, ignore_errors=True)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(FAULTY, max_size=40))
def test_mirror_converges_after_drops_reorders_and_restarts(engine: Any, steps: list[tuple[Any, ...]]) -> None:
    """CAT-4, CAT-5, NODE-3: any interleaving of changes (task records included), dropped and
    reordered deltas and snapshot pages, agent restarts (journal lost) and coordinator
    restarts (persisted mirror kept) ends — once messages flow in order again and the
    heartbeats go on — with mirror (epoch, seq, digest) equal to the agent's, in memory and
    in the database."""
    async def body(sim: Sim) -> None:
        await sim.hello()
        for step in steps:
            kind = step[0]
            if kind in ("put", "del", "task"):
                sim.change(step)
            elif kind == "flush":
                sim.flush()
            elif kind == "beat":
                sim.beat()
            elif kind in ("deliver", "drop") and sim.net:
                i = step[1] % len(sim.net)
                if kind == "deliver":
                    await sim.deliver(i)
                else:
                    sim.net.pop(i)
            elif kind == "agent_restart":
                await sim.agent_restart()
            elif kind == "coordinator_restart":
                await sim.coordinator_restart()
        # Recovery: the network behaves; the agent keeps flushing and beating.
        for _ in range(20):
            await sim.deliver_all()
            if sim.converged():
                break
            sim.beat()
        await sim.deliver_all()
        assert sim.converged(), (sim.reg.nodes[sim.node].mirror, sim.cat.identity())
        sim.check_persisted()
    run(engine, body)


BEATS = st.tuples(st.just("beat"), st.lists(CHANGES, max_size=2), st.booleans())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.one_of(CHANGES, CHANGES, st.tuples(st.just("flush")), BEATS), max_size=60))
def test_without_faults_deltas_alone_keep_the_mirror_equal(engine: Any, steps: list[tuple[Any, ...]]) -> None:
    """CAT-4: with messages delivered in order before the next beat (the pump sends a delta
    within 0.5 s, a beat comes every H), no heartbeat ever asks for a snapshot — even when
    every beat reads a catalog one task record ahead of the mirror (steady task traffic) —
    and the mirror ends equal to the catalog. A restart of both sides with nothing changed
    needs no snapshot either (CAT-5, NODE-3)."""
    async def body(sim: Sim) -> None:
        await sim.hello()
        await sim.deliver_all()
        assert sim.snapshots == 1  # the new node's first snapshot
        for n, step in enumerate(steps):
            if step[0] == "flush":
                sim.flush()
            elif step[0] == "beat":
                sim.flush()              # the session's pump sends within 0.5 s of a change …
                await sim.deliver_all()  # … and a delta arrives long before the next beat
                between = list(step[1])
                if step[2]:              # a task record written after the flush, before the beat
                    between.append(("task", "tsk", f"progress {n}"))
                sim.beat(between=between)
            else:
                sim.change(step)
        sim.flush()
        await sim.deliver_all()
        assert sim.asked == 0 and sim.snapshots == 1
        assert sim.converged()
        sim.check_persisted()
        await sim.coordinator_restart()
        await sim.agent_restart()
        assert sim.snapshots == 1 and sim.converged()
    run(engine, body)
