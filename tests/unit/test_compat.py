"""Compat as pure logic (COMPAT-1 to COMPAT-8, NODE-11, RES-2, RES-3): the evaluation, the
matrix aggregation, the scanner's triggers and debounce, and the scan / adopt-baseline / resolve
rules against a real NodeRegistry on a throwaway SQLite file (STYLE 12, first tier)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, update

from coordinator.compat import matrix
from coordinator.compat.evaluate import Compat, Policy, evaluate, policy_of, reports_every_compared
from coordinator.compat.scanner import CompatScanner
from coordinator.compat.store import ReplicaView, TemplateView, _write, adopt_baseline
from protocol.messages import Event
from tests.support import Clock

V1 = {"guest_image": "6.1+aaaaaaaaaaaa", "agent": "0.1.0", "hypervisor": "7.2", "host_kernel": "6.1.0"}


def vs(**changes: str) -> dict[str, str]:
    return {**V1, **changes}


# --- the evaluation (COMPAT-2, COMPAT-3) ---------------------------------------------------------

@pytest.mark.parametrize("policy, pins, current, ready, memory, expected", [
    (Policy.STRICT, V1, V1, True, False, Compat.OK),
    (Policy.STRICT, V1, vs(guest_image="6.1+bbbbbbbbbbbb"), True, False, Compat.STALE),
    (Policy.STRICT, V1, vs(agent="0.2.0"), True, False, Compat.STALE),
    (Policy.STRICT, V1, vs(hypervisor="8.0"), True, False, Compat.STALE),
    # the host kernel counts only with a memory snapshot
    (Policy.STRICT, V1, vs(host_kernel="6.2.0"), True, False, Compat.OK),
    (Policy.STRICT, V1, vs(host_kernel="6.2.0"), True, True, Compat.STALE),
    # GUEST_ONLY compares the guest image only
    (Policy.GUEST_ONLY, V1, vs(agent="0.2.0", hypervisor="8.0", host_kernel="6.2.0"), True, True, Compat.OK),
    (Policy.GUEST_ONLY, V1, vs(guest_image="6.1+bbbbbbbbbbbb"), True, False, Compat.STALE),
    # empty or missing on either side → UNKNOWN, even when another value differs
    (Policy.STRICT, vs(hypervisor=""), V1, True, False, Compat.UNKNOWN),
    (Policy.STRICT, V1, vs(hypervisor="", agent="0.2.0"), True, False, Compat.UNKNOWN),
    (Policy.STRICT, {}, V1, True, False, Compat.UNKNOWN),
    (Policy.GUEST_ONLY, V1, vs(hypervisor=""), True, False, Compat.OK),  # not compared
    # a node that is not READY reads UNKNOWN (NODE-11)
    (Policy.STRICT, V1, V1, False, False, Compat.UNKNOWN),
])
def test_evaluate(policy: Policy, pins: dict[str, str], current: dict[str, str], ready: bool, memory: bool,
                  expected: Compat) -> None:
    """COMPAT-2, COMPAT-3: STRICT vs GUEST_ONLY, the host kernel with a memory snapshot only,
    UNKNOWN on an empty value or a node that is not READY, else STALE on a difference."""
    assert evaluate(policy, pins, current, node_ready=ready, has_memory_snapshot=memory) is expected


def test_policy_and_baseline_condition() -> None:
    """COMPAT-2: STRICT by default; COMPAT-8: adopting needs every compared version reported."""
    assert policy_of({"compat_policy": "GUEST_ONLY"}) is Policy.GUEST_ONLY
    assert policy_of({}) is Policy.STRICT and policy_of(None) is Policy.STRICT
    assert policy_of({"compat_policy": "bogus"}) is Policy.STRICT
    assert reports_every_compared(Policy.STRICT, V1)
    assert not reports_every_compared(Policy.STRICT, vs(agent=""))
    assert reports_every_compared(Policy.GUEST_ONLY, vs(agent=""))
    assert not reports_every_compared(Policy.STRICT, vs(host_kernel=""), has_memory_snapshot=True)


# --- the matrix (COMPAT-6) -----------------------------------------------------------------------

def _rep(tpl: str, node: str, pins: dict[str, str], policy: Policy = Policy.STRICT) -> ReplicaView:
    return ReplicaView(tpl, node, policy, pins, "OK", False, 0)


def test_matrix_cells_rows_and_summary() -> None:
    """COMPAT-6: templates × READY nodes by id; MISSING without a READY replica; re-evaluated
    status with bound and current versions; a row is STALE if any cell is, else its first
    UNKNOWN/MISSING, else OK; the summary counts."""
    nodes = [matrix.NodeView("n3", "10.0.0.3", vs(hypervisor="")),
             matrix.NodeView("n1", "10.0.0.1", V1),
             matrix.NodeView("n2", "10.0.0.2", vs(guest_image="g2"))]
    t_ok = TemplateView("tpl-a", "ok", Policy.STRICT, {"n1": _rep("tpl-a", "n1", V1)})
    t_stale = TemplateView("tpl-b", None, Policy.STRICT,
                           {n: _rep("tpl-b", n, V1) for n in ("n1", "n2", "n3")})
    t_guest = TemplateView("tpl-c", None, Policy.GUEST_ONLY,
                           {n: _rep("tpl-c", n, V1, Policy.GUEST_ONLY) for n in ("n1", "n3")})
    m = matrix.build([t_stale, t_guest, t_ok], nodes)
    assert m["nodes"] == ["n1", "n2", "n3"]
    rows = {r["template_id"]: r for r in m["templates"]}
    assert [r["template_id"] for r in m["templates"]] == ["tpl-a", "tpl-b", "tpl-c"]
    assert [c["compat"] for c in rows["tpl-a"]["nodes"]] == ["OK", "MISSING", "MISSING"]
    assert rows["tpl-a"]["overall"] == "MISSING"
    assert [c["compat"] for c in rows["tpl-b"]["nodes"]] == ["OK", "STALE", "UNKNOWN"]
    assert rows["tpl-b"]["overall"] == "STALE"
    # GUEST_ONLY ignores the empty hypervisor on n3 but has no replica on n2
    assert [c["compat"] for c in rows["tpl-c"]["nodes"]] == ["OK", "MISSING", "OK"]
    assert rows["tpl-c"]["overall"] == "MISSING" and rows["tpl-c"]["policy"] == "GUEST_ONLY"
    cell = rows["tpl-b"]["nodes"][1]
    assert (cell["node_id"], cell["address"]) == ("n2", "10.0.0.2")
    assert cell["bound"]["guest_image"] == V1["guest_image"] and cell["current"]["guest_image"] == "g2"
    assert rows["tpl-a"]["nodes"][1]["bound"] == {}
    assert m["summary"] == {"stale_templates": 1, "stale_replicas": 1, "affected_nodes": 1,
                            "missing_replicas": 3, "unknown_replicas": 1}
    # No READY node: rows without cells are OK, nothing counted.
    empty = matrix.build([t_ok], [])
    assert empty["templates"][0]["overall"] == "OK" and set(empty["summary"].values()) == {0}


# --- the scanner's triggers and debounce (COMPAT-4) ----------------------------------------------

def _ev(kind: str, node: str = "n1", **data: Any) -> Event:
    return Event(seq=1, topic=f"node.{node}", ts=0, kind=kind, data=data, epoch="e")


def test_scanner_triggers_and_debounce(tmp_path: Path) -> None:
    """COMPAT-4: a versions event, a session with a complete mirror, a health change to READY and
    a full catalog snapshot schedule a scan after the debounce; the first event fixes the due time
    (later ones fold in); other events schedule nothing; nothing runs before it is due."""
    reg, engine = _registry(tmp_path)
    clock = Clock(100.0)
    s = CompatScanner(reg, engine, debounce=5.0, scan_timeout=30.0, clock=clock)
    for ev in (_ev("session", mirror_complete=False), _ev("catalog", delta=True), _ev("health", new="SUSPECT"),
               _ev("admin_state", new="CORDONED"), Event(seq=1, topic="job.x", ts=0, kind="versions", data={}, epoch="e")):
        s.on_event(ev)
    assert s.pending() == {}
    s.on_event(_ev("versions"))
    clock.t = 103.0
    s.on_event(_ev("versions"))
    s.on_event(_ev("session", node="n2", mirror_complete=True))
    s.on_event(_ev("health", node="n3", new="READY"))
    s.on_event(_ev("catalog", node="n4", entries=3))
    assert s.pending() == {"n1": 105.0, "n2": 108.0, "n3": 108.0, "n4": 108.0}
    assert asyncio.run(s.run_once(104.9)) == {}
    done = asyncio.run(s.run_once(105.0))
    assert list(done) == ["n1"] and done["n1"].error is None and done["n1"].scanned == 2
    assert set(s.pending()) == {"n2", "n3", "n4"}
    reg.nodes["n2"].last_seen = None  # not READY: a triggered scan skips it (its READY transition rescans)
    done = asyncio.run(s.run_once(108.0))
    assert set(done) == {"n2", "n3", "n4"} and all(r.error is None for r in done.values())
    assert s.scans == 2  # n1 before, n3 now; n2 (not READY) and n4 (unknown) skipped
    assert done["n2"].scanned == 0 and _compat(engine)[(STRICT, "n2")] == ("OK", 1)
    assert s.pending() == {}


# --- scans, adopt-baseline and resolve on a real SQLite database ---------------------------------

def _registry(tmp_path: Path) -> tuple[Any, Any]:
    from coordinator.db.engine import make_engine
    from coordinator.db.models import Base, Replica, Template
    from coordinator.db.node_store import upsert_hello
    from coordinator.events import EventBus
    from coordinator.health import Thresholds
    from coordinator.nodes import LiveNode, NodeRegistry

    engine = make_engine(f"sqlite:///{tmp_path}/c.db")
    Base.metadata.create_all(engine)
    t = Thresholds(interval=10.0, max_rate=20_000, suspect_missed=2, lease_missed=5, lease_ttl_min=15,
                   failover_grace=0)
    reg = NodeRegistry(engine, t, EventBus(None))
    now = time.time()
    for i, nid in enumerate(("n1", "n2", "n3")):
        upsert_hello(engine, node_id=nid, now_ms=0, address=f"10.0.0.{i + 1}", blob_endpoint="", labels={},
                     capabilities={}, facts={}, facts_digest="", versions={}, versions_digest="")
        reg.nodes[nid] = LiveNode(node_id=nid, address=f"10.0.0.{i + 1}", versions=dict(V1), session_id="s",
                                  last_seen=now, mirror_complete=True,
                                  storage={"total": 100, "used": 10, "free": 90}, storage_at=now)
    with engine.begin() as c:
        for tpl, policy in (("tpl-" + "a" * 24, "STRICT"), ("tpl-" + "b" * 24, "GUEST_ONLY")):
            c.execute(insert(Template.__table__).values(id=tpl, alias=policy.lower().replace("_", "-"),
                                                        status="READY", spec={"compat_policy": policy}))
            for nid in ("n1", "n2"):
                c.execute(insert(Replica.__table__).values(template_id=tpl, node_id=nid, status="READY",
                                                           phase="READY", cleanup_required=False, pins=dict(V1),
                                                           compat="OK", compat_checked_ms=1, updated_ms=7))
    return reg, engine


STRICT, GUEST = "tpl-" + "a" * 24, "tpl-" + "b" * 24


def _compat(engine: Any) -> dict[tuple[str, str], tuple[str, int]]:
    from coordinator.db.models import Replica
    r = Replica.__table__
    with engine.connect() as c:
        return {(t, n): (v, ms) for t, n, v, ms in c.execute(select(r.c.template_id, r.c.node_id, r.c.compat,
                                                                     r.c.compat_checked_ms))}


def test_scan_writes_only_changes(tmp_path: Path) -> None:
    """COMPAT-3, COMPAT-4: a scan re-evaluates the node's READY replicas and writes status and
    check time only where the status changed; GUEST_ONLY ignores an agent version change;
    scans touch nothing but compat fields (NODE-11: a node that is not READY reads UNKNOWN)."""
    reg, engine = _registry(tmp_path)
    s = CompatScanner(reg, engine, debounce=0.0, scan_timeout=30.0)
    res = asyncio.run(s.scan("n1"))
    assert (res.scanned, res.changes, res.error) == (2, [], None)
    assert _compat(engine)[(STRICT, "n1")] == ("OK", 1)  # unchanged: not rewritten
    reg.nodes["n1"].versions = vs(agent="0.2.0")
    res = asyncio.run(s.scan("n1"))
    assert [(c.template_id, c.old, c.new) for c in res.changes] == [(STRICT, "OK", "STALE")]
    after = _compat(engine)
    assert after[(STRICT, "n1")][0] == "STALE" and after[(STRICT, "n1")][1] > 1
    assert after[(GUEST, "n1")] == ("OK", 1) and after[(STRICT, "n2")] == ("OK", 1)
    reg.nodes["n2"].last_seen = None  # not READY any more
    res = asyncio.run(s.scan("n2"))
    assert sorted(c.new for c in res.changes) == ["UNKNOWN", "UNKNOWN"]
    from coordinator.db.models import Replica
    with engine.connect() as c:
        assert set(c.execute(select(Replica.__table__.c.updated_ms)).scalars()) == {7}


def test_scan_write_loses_to_a_newer_pin(tmp_path: Path) -> None:
    """COMPAT-4 vs DIST-7: a scan's write is a compare-and-set on what it read, so a replica that a
    REDO re-pinned meanwhile keeps the REDO's status."""
    from coordinator.db.models import Replica
    reg, engine = _registry(tmp_path)
    read = ReplicaView(STRICT, "n1", Policy.STRICT, V1, "OK", False, 7)
    with engine.begin() as c:
        c.execute(update(Replica.__table__).where(Replica.__table__.c.template_id == STRICT,
                                                  Replica.__table__.c.node_id == "n1").values(updated_ms=8))
    assert _write(engine, [(read, Compat.STALE)], 99) == []
    assert _compat(engine)[(STRICT, "n1")] == ("OK", 1)


def test_adopt_baseline_repins_unknown_replicas(tmp_path: Path) -> None:
    """COMPAT-8: READY UNKNOWN replicas on READY nodes that report every compared version are
    re-pinned to those versions and set OK, and counted; OK/STALE replicas and nodes that do not
    report a compared version are left alone."""
    from coordinator.db.models import Replica
    reg, engine = _registry(tmp_path)
    r = Replica.__table__
    with engine.begin() as c:
        c.execute(update(r).where(r.c.template_id == STRICT).values(compat="UNKNOWN", pins=vs(hypervisor="")))
    changes = adopt_baseline(engine, STRICT, {"n1": vs(guest_image="g9"), "n2": vs(agent="")}, 1234)
    assert [(c.node_id, c.old, c.new) for c in changes] == [("n1", "UNKNOWN", "OK")]
    with engine.connect() as c:
        rows = {n: (comp, pins) for n, comp, pins in
                c.execute(select(r.c.node_id, r.c.compat, r.c.pins).where(r.c.template_id == STRICT))}
    assert rows["n1"] == ("OK", vs(guest_image="g9")) and rows["n2"][0] == "UNKNOWN"
    assert adopt_baseline(engine, STRICT, {"n1": vs(guest_image="g9")}, 1235) == []  # nothing left


def test_rescan_command_in_process(tmp_path: Path) -> None:
    """COMPAT-8: `compat rescan` with no node scans every READY node and reports per node;
    named nodes that are unknown → NodeNotFound listing them (sorted), nothing scanned; the
    CLI takes the nodes as a positional list."""
    from coordinator.admin.command import REGISTRY
    from coordinator.admin.context import AdminContext
    from coordinator.cli.main import build_parser
    from coordinator.config import load_config
    from protocol.errors import NodeNotFound
    from protocol.peers import PeerTable
    reg, engine = _registry(tmp_path)
    reg.nodes["n3"].last_seen = None  # not READY: left out of "all"
    scanner = CompatScanner(reg, engine, debounce=0.0, scan_timeout=30.0)
    ctx = AdminContext(config=load_config(None, []), engine=engine, nodes=reg, events=reg.events,
                       peers=PeerTable(), compat=scanner)
    cls = REGISTRY["compat rescan"]

    def run(**args: Any) -> Any:
        async def go() -> Any:
            return await cls().execute(ctx, cls.validate(args))
        return asyncio.run(go())

    reg.nodes["n2"].versions = vs(guest_image="g2")
    got = run()["nodes"]
    assert [(n["node_id"], n["scanned"], n["error"]) for n in got] == [("n1", 2, None), ("n2", 2, None)]
    assert [(c["template_id"], c["new"]) for c in got[1]["changes"]] == [(STRICT, "STALE"), (GUEST, "STALE")]
    with pytest.raises(NodeNotFound) as exc:
        run(nodes=["zz", "n1", "aa"])
    assert exc.value.details == {"nodes": ["aa", "zz"]}
    assert scanner.scans == 2
    assert build_parser().parse_args(["compat", "rescan", "n1", "n2"]).nodes == ["n1", "n2"]
    assert build_parser().parse_args(["compat", "rescan"]).nodes == []
