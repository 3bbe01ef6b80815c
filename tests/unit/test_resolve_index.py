"""The resolve index (RES-1 to RES-5, RT-18, COMPAT-5): ranking, every RES-3 error, the
preferred node, capacity, events keeping it current, miss loads, the backstop and copies.

A real SQLite database and a real node registry held in memory (no processes); the index
listens on a real EventBus without a socket."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, insert, update

from protocol.errors import (InvalidRequest, SnapshotNotFound, TemplateHasNoReadyReplica, TemplateNotFound,
                             TemplateStaleNeedsRedo)

MIB = 1 << 20
GIB = 1 << 30
TPL, OTHER = "tpl-" + "a" * 24, "tpl-" + "b" * 24


class World:
    """A database with one template (alias ``web``, 512 MiB) READY on n1..n3, and a registry
    where n1..n3 are READY sandbox nodes with 8 GiB free and n4 a build-only node."""

    def __init__(self, tmp_path: Path) -> None:
        from coordinator.db.engine import make_engine
        from coordinator.db.models import Base
        from coordinator.events import EventBus
        from coordinator.health import Thresholds
        from coordinator.nodes import LiveNode, NodeRegistry
        from coordinator.resolve import RegistryNodes, ResolveIndex
        from coordinator.storage import StorageProbe  # noqa: F401 — the module the limits come from
        from coordinator.config import StorageConfig

        self.engine = make_engine(f"sqlite:///{tmp_path}/c.db")
        Base.metadata.create_all(self.engine)
        t = Thresholds(interval=10.0, max_rate=20_000, suspect_missed=2, lease_missed=5, lease_ttl_min=15,
                       failover_grace=0)
        self.bus = EventBus(None)
        self.reg = NodeRegistry(self.engine, t, self.bus)
        now = time.time()
        for i, nid in enumerate(("n1", "n2", "n3", "n4")):
            self.reg.nodes[nid] = LiveNode(
                node_id=nid, address=f"10.0.0.{i + 1}", session_id="s", last_seen=now, mirror_complete=True,
                storage={"total": 100, "used": 10, "free": 90}, storage_at=now,
                capabilities={"build": True, "sandbox": nid != "n4"}, mem_free=8 * GIB, sandboxes=0)
        self.tpl(TPL, "web", nodes=("n1", "n2", "n3"))
        self.index = ResolveIndex(self.engine, RegistryNodes(self.reg, StorageConfig()), backstop=3600)
        self.bus.listen(self.index.on_event)

    def tpl(self, tid: str, alias: str | None, *, nodes: tuple[str, ...] = (), status: str = "READY",
            memory_mib: int = 512) -> None:
        from coordinator.db.models import Replica, Template
        with self.engine.begin() as c:
            c.execute(insert(Template.__table__).values(id=tid, alias=alias, status=status,
                                                        spec={"memory_mib": memory_mib}))
            for n in nodes:
                c.execute(insert(Replica.__table__).values(template_id=tid, node_id=n, status="READY", phase="READY",
                                                           cleanup_required=False, compat="OK",
                                                           artifact_id="art-" + "1" * 24))

    def replica(self, node: str, **values: Any) -> None:
        """As a job writes it: the row, then the event (what Rows.on_change publishes)."""
        from coordinator.db.models import Replica
        r = Replica.__table__
        with self.engine.begin() as c:
            c.execute(update(r).where(r.c.template_id == TPL, r.c.node_id == node).values(**values))
        self.bus.publish(f"template.{TPL}", "replica", {"template": TPL, "node": node, **values})

    def resolve(self, name: str = "web", node: str | None = None) -> dict[str, Any]:
        return asyncio.run(self.index.resolve(name, node))

    def error(self, exc: type[Exception], name: str = "web") -> Any:
        with pytest.raises(exc) as info:
            self.resolve(name)
        return info.value


@pytest.fixture
def w(tmp_path: Path) -> World:
    world = World(tmp_path)
    asyncio.run(world.index.rebuild())
    return world


def test_ranking_and_preferred_node(w: World) -> None:
    """RES-2: OK before UNKNOWN, memory snapshot before cold boot, fewer running sandboxes, node
    id; a preferred candidate wins, a preference for a non-candidate is ignored. RES-1: the
    answer's shape, restore memory for a memory-snapshot replica."""
    got = w.resolve()
    assert got == {"template_id": TPL, "node": "n1", "address": "10.0.0.1", "restore": "cold",
                   "replica": {"template_id": TPL, "node_id": "n1", "artifact_id": "art-" + "1" * 24,
                               "compat": "OK", "has_memory_snapshot": False}}
    w.reg.nodes["n1"].sandboxes = 3
    w.reg.nodes["n2"].sandboxes = 1
    assert w.resolve()["node"] == "n3"  # fewer running sandboxes
    w.replica("n1", has_memory_snapshot=True)
    got = w.resolve()
    assert (got["node"], got["restore"]) == ("n1", "memory")  # memory before cold, despite 3 sandboxes
    w.replica("n1", compat="UNKNOWN")
    assert w.resolve()["node"] == "n3"  # OK before UNKNOWN, even with a memory snapshot
    assert w.resolve(node="n1")["node"] == "n1"  # a preferred candidate wins
    assert w.resolve(node="n4")["node"] == "n3"  # n4 holds no replica: ignored
    w.replica("n2", compat="STALE")
    assert w.resolve(node="n2")["node"] == "n3"  # never STALE, even preferred


def test_capacity_rt18(w: World) -> None:
    """RT-18: free memory ≥ sandbox memory + 256 MiB and fewer than 64 sandboxes; creates in
    flight count as running."""
    need = 512 * MIB + 256 * MIB
    for n in ("n2", "n3"):
        w.reg.nodes[n].mem_free = 0
    w.reg.nodes["n1"].mem_free = need
    assert w.resolve()["node"] == "n1"  # exactly enough
    w.reg.nodes["n1"].mem_free = need - 1
    err = w.error(TemplateHasNoReadyReplica)
    assert {d["node"]: d["reason"] for d in err.details["nodes"]}["n1"] == \
        "not enough free memory (need 768 MiB with the reserve, free 767 MiB)"
    w.reg.nodes["n1"].mem_free = 8 * GIB
    w.reg.nodes["n1"].sandboxes = 63
    assert w.resolve()["node"] == "n1"
    with w.index.placing("n1"):  # the 64th is on its way
        err = w.error(TemplateHasNoReadyReplica)
        assert {d["node"]: d["reason"] for d in err.details["nodes"]}["n1"] == "runs 64 sandboxes (limit 64)"
    assert w.resolve()["node"] == "n1" and w.index.nodes.inflight == {}
    w.reg.nodes["n1"].mem_free = None
    err = w.error(TemplateHasNoReadyReplica)
    assert "no free-memory figures" in {d["node"]: d["reason"] for d in err.details["nodes"]}["n1"]


def test_every_res3_error(w: World) -> None:
    """RES-3, COMPAT-5, CONV-2: unknown name or id → TemplateNotFound; DELETING →
    TemplateNotFound; a snapshot id → SnapshotNotFound, a malformed id → InvalidRequest; only
    STALE replicas on otherwise usable nodes → TemplateStaleNeedsRedo {template, nodes} sorted;
    otherwise TemplateHasNoReadyReplica with a reason per node (replica not READY, not
    placeable, no sandbox runtime, unknown node)."""
    w.error(TemplateNotFound, "nope")
    w.error(TemplateNotFound, "tpl-" + "f" * 24)
    w.error(SnapshotNotFound, "snap-" + "0" * 24)
    w.error(InvalidRequest, "tpl-XYZ")
    w.error(InvalidRequest, "snap-1")
    w.replica("n3", compat="STALE")
    w.replica("n2", compat="STALE")
    w.replica("n1", status="FAILED", phase="FAILED")
    err = w.error(TemplateStaleNeedsRedo)
    assert err.details == {"template": TPL, "nodes": ["n2", "n3"]}
    from coordinator.health import AdminState
    w.reg.nodes["n3"].admin_state = AdminState.CORDONED  # a STALE replica on an unusable node does not count
    assert w.error(TemplateStaleNeedsRedo).details["nodes"] == ["n2"]
    w.reg.nodes["n2"].capabilities = {"build": True, "sandbox": False}
    err = w.error(TemplateHasNoReadyReplica)
    assert err.message == "template web is not ready on any placeable node"
    assert err.details == {"template": TPL, "nodes": [
        {"node": "n1", "reason": "replica FAILED (phase FAILED)"},
        {"node": "n2", "reason": "no sandbox runtime (driver none)"},
        {"node": "n3", "reason": "not placeable: READY/CORDONED/storage healthy"}]}
    del w.reg.nodes["n2"]
    assert {"node": "n2", "reason": "unknown node"} in w.error(TemplateHasNoReadyReplica).details["nodes"]
    from coordinator.db.models import Template
    with w.engine.begin() as c:  # as the DELETE job's transition does: DELETING releases the alias
        c.execute(update(Template.__table__).where(Template.__table__.c.id == TPL).values(status="DELETING",
                                                                                          alias=None))
    w.bus.publish(f"template.{TPL}", "status", {"template": TPL, "status": "DELETING", "alias": None})
    w.error(TemplateNotFound, TPL)
    w.error(TemplateNotFound, "web")


def test_events_keep_the_index_current_without_database_reads(w: World) -> None:
    """RES-4: a warm index answers from memory — database changes without events are not seen
    (no query), events are: replica rows written through Rows (its change notice), compat
    scans, template status and alias moves, node removal."""
    from coordinator.db.models import Replica
    from coordinator.templates.rows import Rows
    r = Replica.__table__
    with w.engine.begin() as c:  # behind the index's back
        c.execute(delete(r).where(r.c.node_id == "n1"))
    assert w.resolve()["node"] == "n1" and w.index.loads == 0
    rows = Rows(w.engine, lambda: 1)
    rows.on_change = w.bus.publish
    rows.replica(TPL, "n1", status="FAILED", phase="DISTRIBUTING", cleanup_required=True)
    assert w.resolve()["node"] == "n2"
    w.bus.publish(f"template.{TPL}", "compat", {"template_id": TPL, "node_id": "n2", "old": "OK", "new": "STALE"})
    assert w.resolve()["node"] == "n3"
    w.bus.publish("node.n3", "removed", {"node": "n3", "address": ""})
    err = w.error(TemplateStaleNeedsRedo)
    assert err.details["nodes"] == ["n2"]
    rows.replica(TPL, "n4", status="READY", phase="READY", compat="OK")  # a new replica row
    w.reg.nodes["n4"].capabilities = {"sandbox": True}
    assert w.resolve()["node"] == "n4"
    # An alias moving to a new template (publish): the old holder loses it.
    w.tpl(OTHER, None, nodes=("n4",))
    assert w.resolve(OTHER)["node"] == "n4" and w.index.loads == 1  # a miss loads it
    w.bus.publish(f"template.{OTHER}", "alias", {"template": OTHER, "alias": "web"})
    assert w.resolve("web")["template_id"] == OTHER
    assert asyncio.run(w.index.entry(TPL)).alias is None
    assert w.index.loads == 1


def test_a_miss_loads_once_for_concurrent_callers(w: World) -> None:
    """RES-4: an id the index does not hold is loaded once; concurrent callers share the load;
    an unknown name stays TemplateNotFound (and is asked again next time)."""
    w.tpl(OTHER, "api", nodes=("n2",))

    async def many() -> list[Any]:
        return await asyncio.gather(*(w.index.resolve("api") for _ in range(5)))
    got = asyncio.run(many())
    assert {g["node"] for g in got} == {"n2"} and w.index.loads == 1
    assert w.resolve(OTHER)["node"] == "n2" and w.index.loads == 1  # now warm by id too
    w.error(TemplateNotFound, "ghost")
    w.error(TemplateNotFound, "ghost")
    assert w.index.loads == 3


def test_backstop_rebuild_repairs_missed_changes_but_not_newer_events(w: World) -> None:
    """RES-4: the backstop rebuild picks up what no event announced; a change that arrived by
    event while the rebuild read the database is not overwritten by the older read."""
    from coordinator.db.models import Replica
    r = Replica.__table__
    with w.engine.begin() as c:
        c.execute(update(r).where(r.c.node_id == "n1").values(status="FAILED", phase="FAILED"))
    assert w.resolve()["node"] == "n1"  # missed
    asyncio.run(w.index.rebuild())
    assert w.resolve()["node"] == "n2"  # repaired

    async def race() -> None:
        # The event lands after the rebuild started reading (it reads in a worker thread).
        job = asyncio.ensure_future(w.index.rebuild())
        await asyncio.sleep(0)
        w.bus.publish(f"template.{TPL}", "replica", {"template": TPL, "node": "n2", "compat": "STALE"})
        await job
    asyncio.run(race())
    assert w.resolve()["node"] == "n3"


def test_copies_are_handed_out(w: World) -> None:
    """RES-5: what callers get never changes under them and cannot change the index."""
    e = asyncio.run(w.index.entry("web"))
    e.replicas.clear()  # type: ignore[attr-defined]
    got = w.resolve()
    got["replica"]["compat"] = "STALE"
    got["node"] = "zz"
    assert w.resolve()["node"] == "n1" and w.resolve()["replica"]["compat"] == "OK"
    held = asyncio.run(w.index.entry("web"))
    w.replica("n1", status="FAILED")
    assert held.replicas["n1"].status == "READY"  # the copy held is unchanged
    assert asyncio.run(w.index.entry("web")).replicas["n1"].status == "FAILED"


def test_start_builds_before_serving(tmp_path: Path) -> None:
    """RES-4, GC-13: ``start`` does the full build first (no miss load afterwards)."""
    world = World(tmp_path)

    async def go() -> dict[str, Any]:
        await world.index.start()
        try:
            assert world.index.ready and world.index.rebuilds == 1
            return await world.index.resolve("web")
        finally:
            world.index.stop()
    assert asyncio.run(go())["node"] == "n1" and world.index.loads == 0
