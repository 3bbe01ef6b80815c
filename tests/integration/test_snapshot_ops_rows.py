"""Snapshot operations on SQLite and PostgreSQL, without agents (SNAP-2, SNAP-6, SNAP-8,
SNAP-11..SNAP-14, SNAP-17, GC-1, GC-9): submissions, refusals, tombstones, the finaliser's
choice, stuck rows and listing. The node lookup is a small fake (health, storage, sandbox
capability); rows and jobs are real. The QEMU end-to-end is tests/integration/test_snapshots_qemu.py."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine

from coordinator.db.models import Job, Node, NodeCatalogEntry, Sandbox, Snapshot
from coordinator.jobs.store import JobStore, job_info
from coordinator.snapshots import refs, rows
from coordinator.snapshots.service import SnapshotOps
from coordinator.templates.rows import Rows
from protocol.errors import TCError

SN, J, SB, E = Snapshot.__table__, Job.__table__, Sandbox.__table__, NodeCatalogEntry.__table__
SBX, OTHER = "sbx-" + "1" * 24, "sbx-" + "2" * 24


@dataclass
class NodeView:
    health: str = "READY"
    sandbox: bool = True
    usage: float = 10.0
    storage_mode: str = "healthy"


class Index:
    """The two things SnapshotOps reads from the resolve index: a node's view."""

    def __init__(self) -> None:
        self.view = NodeView()

    def node(self, node_id: str) -> NodeView | None:
        return self.view if node_id == "node-a" else None


@pytest.fixture
def ops(engine: Engine) -> SnapshotOps:
    now = rows.now_ms()
    with engine.begin() as c:
        c.execute(insert(Node.__table__).values(id="node-a", created_ms=now, updated_ms=now))
        for sid in (SBX, OTHER):
            c.execute(insert(SB).values(
                id=sid, request_id=f"r-{sid}", request_digest="", name="", source_kind="template",
                source_id="tpl-" + "a" * 24, template_id="tpl-" + "a" * 24, node_id="node-a", runtime_config={},
                spec={"artifact_id": "art-" + "b" * 24}, vcpus=1, memory_mib=256, restore="cold", state="RUNNING",
                exit_code=None, last_error="", created_ms=now, updated_ms=now))
    return SnapshotOps(engine, JobStore(engine), Index(), wake=lambda: None, op_timeout=2.0)  # type: ignore[arg-type]


def err(fn: Any, *a: Any, **kw: Any) -> TCError:
    with pytest.raises(TCError) as ei:
        fn(*a, **kw)
    return ei.value


def ready_snapshot(engine: Engine, ops: SnapshotOps, request_id: str, name: str = "") -> str:
    """A CREATE submitted, then made READY as its job would, and listed in the node's catalog."""
    job = ops._submit_create(request_id, SBX, name, {"sandbox": SBX, "name": name})
    sid = job["resource_id"]
    with engine.begin() as c:
        c.execute(update(J).where(J.c.id == job["id"]).values(status="READY"))
        c.execute(update(SN).where(SN.c.id == sid).values(status="READY"))
        c.execute(insert(E).values(node_id="node-a", kind="snapshot", entry_id=sid, body={}))
    return sid


def test_create_checks_and_one_operation_per_sandbox(engine: Engine, ops: SnapshotOps) -> None:
    """SNAP-2, SNAP-3: the row (CREATING, origin sandbox and node, base artifact) and its job in one
    transaction; a second create or a rollback while one is active → TemplateAttemptInProgress;
    SNAP-6: the request id binds operation and payload; SNAP-16: storage reject → NodeStorageBlocked;
    unknown sandbox → SandboxNotFound; SUSPECT node → NodeUnavailable."""
    job = ops._submit_create("req-1", SBX, "one", {"sandbox": SBX, "name": "one"})
    snap = rows.get(engine, job["resource_id"])
    assert (snap["status"], snap["sandbox_id"], snap["node_id"], snap["base_artifact_id"]) == \
        ("CREATING", SBX, "node-a", "art-" + "b" * 24)
    assert (job["operation"], job["status"], job["phase"], job["resource_type"]) == \
        ("SNAPSHOT_CREATE", "PENDING", "SNAPSHOTTING", "snapshot")
    e = err(ops._submit_create, "req-2", SBX, "", {"sandbox": SBX, "name": ""})
    assert e.name == "TemplateAttemptInProgress" and "SNAPSHOT_CREATE" in e.message
    assert ops._existing("req-1", "SNAPSHOT_CREATE", {"sandbox": SBX, "name": "one"})["id"] == job["id"]
    e = err(ops._existing, "req-1", "SNAPSHOT_CREATE", {"sandbox": SBX, "name": "two"})
    assert e.message == "payload does not match existing snapshot job"
    e = err(ops._existing, "req-1", "SNAPSHOT_DELETE", {"snapshot": snap["id"]})
    assert e.message == "request req-1 is already bound to SNAPSHOT_CREATE"
    assert err(ops._submit_create, "req-3", "sbx-" + "9" * 24, "", {}).name == "SandboxNotFound"
    ops.index.view = NodeView(usage=90.0, storage_mode="reject")
    e = err(ops._submit_create, "req-4", OTHER, "", {"sandbox": OTHER, "name": ""})
    assert e.name == "NodeStorageBlocked" and e.message == "snapshot operations are blocked on node node-a (usage=90%)"
    ops.index.view = NodeView(health="SUSPECT")
    assert err(ops._submit_create, "req-5", OTHER, "", {"sandbox": OTHER, "name": ""}).name == "NodeUnavailable"


def test_rollback_refusals(engine: Engine, ops: SnapshotOps) -> None:
    """SNAP-8: unknown → SnapshotNotFound, FAILED → SnapshotNotReady, CREATING →
    TemplateAttemptInProgress, another origin sandbox → SnapshotSandboxMismatch, a catalog that
    does not list it → SnapshotReplicaMetadataIncomplete; a READY one is accepted."""
    s1 = ready_snapshot(engine, ops, "req-1")
    unknown = "snap-" + "f" * 24
    assert err(ops._submit_rollback, "rb-1", SBX, unknown, {}).name == "SnapshotNotFound"
    e = err(ops._submit_rollback, "rb-2", OTHER, s1, {})
    assert e.name == "SnapshotSandboxMismatch"
    with engine.begin() as c:
        c.execute(E.delete().where(E.c.entry_id == s1))
    assert err(ops._submit_rollback, "rb-3", SBX, s1, {}).name == "SnapshotReplicaMetadataIncomplete"
    with engine.begin() as c:
        c.execute(insert(E).values(node_id="node-a", kind="snapshot", entry_id=s1, body={}))
    rows.set_status(engine, s1, "READY", "FAILED", last_error="boom")
    assert err(ops._submit_rollback, "rb-4", SBX, s1, {}).name == "SnapshotNotReady"
    rows.set_status(engine, s1, "FAILED", "CREATING")
    assert err(ops._submit_rollback, "rb-5", SBX, s1, {}).name == "TemplateAttemptInProgress"
    rows.set_status(engine, s1, "CREATING", "READY")
    job = ops._submit_rollback("rb-6", SBX, s1, {"sandbox": SBX, "snapshot": s1})
    assert (job["operation"], job["phase"], job["resource_id"]) == ("SNAPSHOT_ROLLBACK", "ROLLBACK_PREPARING", s1)
    assert err(ops._submit_create, "req-9", SBX, "", {}).name == "TemplateAttemptInProgress"


def test_delete_tombstone_finaliser_and_gc(engine: Engine, ops: SnapshotOps) -> None:
    """SNAP-11: CREATING → "snapshot is still creating"; SNAP-12: with an ACTIVE ref the row
    becomes DELETED and the job is READY at once with {tombstoned, refs}, hidden from list/show;
    SNAP-14: finalizable only once no ACTIVE ref is left; SNAP-13: without refs, DELETING + a
    PENDING job; then "already deleting". GC-1: a snapshot in any status, DELETED included, is a
    reference to its base artifact."""
    creating = ops._submit_create("req-c", OTHER, "", {"sandbox": OTHER, "name": ""})["resource_id"]
    assert err(ops._submit_delete, "d-0", creating, {"snapshot": creating}).message == "snapshot is still creating"
    s1 = ready_snapshot(engine, ops, "req-1")
    with engine.begin() as c:
        refs.acquire(c, snapshot_id=s1, sandbox_id=OTHER, node_id="node-a", generation=0, now_ms=rows.now_ms())
    job = ops._submit_delete("d-1", s1, {"snapshot": s1})
    assert job["status"] == "READY" and job["step_state"]["result"] == {
        "snapshot_id": s1, "deleted": True, "tombstoned": True, "refs": [OTHER]}
    assert rows.get(engine, s1)["status"] == "DELETED"
    assert job_info(job)["result"]["tombstoned"] is True  # `job show` carries it (SNAP-12)
    assert err(ops.show, s1).name == "SnapshotNotFound"
    assert s1 not in [s["snapshot_id"] for s in ops.list(status="DELETED")["snapshots"]]
    assert rows.finalizable(engine) == []
    base = "art-" + "b" * 24
    with Rows(engine, rows.now_ms).sessions.begin() as s:
        assert Rows(engine, rows.now_ms).references(s, base, exclude_template="tpl-" + "a" * 24) >= 1
    refs.release_sandbox(engine, OTHER)
    assert rows.finalizable(engine) == [s1]
    started = asyncio.run(ops.finalize([s1]))
    assert started == [s1]
    fin = [j for j in ops.jobs.list_jobs(resource_id=s1) if j["status"] == "PENDING"]
    assert len(fin) == 1 and fin[0]["request_id"].startswith("tombstone-finalize:")
    assert rows.finalizable(engine) == []  # its job is active now

    s2 = ready_snapshot(engine, ops, "req-2")
    job = ops._submit_delete("d-2", s2, {"snapshot": s2})
    assert (job["status"], job["phase"]) == ("PENDING", "DELETING") and rows.get(engine, s2)["status"] == "DELETING"
    assert err(ops._submit_delete, "d-3", s2, {"snapshot": s2}).message == "snapshot is already deleting"
    assert s2 in [s["snapshot_id"] for s in ops.list(status="deleting")["snapshots"]]
    assert s2 not in [s["snapshot_id"] for s in ops.list()["snapshots"]]


def test_stuck_rows_and_listing(engine: Engine, ops: SnapshotOps) -> None:
    """GC-9: a CREATING row older than the limit with no active job → FAILED "remained in
    CREATING beyond 15m"; one with an active job stays. SNAP-17: newest first, filters, page size,
    next_token paging, an invalid token → InvalidRequest "invalid next_token", ref counts."""
    ops.stuck_after = 900.0
    old = rows.now_ms() - 901_000
    busy = ops._submit_create("req-b", SBX, "", {"sandbox": SBX, "name": ""})["resource_id"]
    lonely = "snap-" + "c" * 24
    with engine.begin() as c:
        rows.insert_row(c, {"id": lonely, "sandbox_id": OTHER, "node_id": "node-a"})
        c.execute(update(SN).values(updated_ms=old, created_ms=old))
    assert ops.fail_stuck() == [lonely]
    assert rows.get(engine, lonely)["last_error"] == "remained in CREATING beyond 15m"
    assert rows.get(engine, busy)["status"] == "CREATING"

    with engine.begin() as c:
        c.execute(update(J).values(status="READY"))
        for n in range(5):
            rows.insert_row(c, {"id": f"snap-{n:024x}", "sandbox_id": OTHER, "node_id": "node-a", "status": "READY",
                                "name": "even" if n % 2 == 0 else "odd", "created_ms": old + 1000 * (n + 1)})
    page = ops.list(sandbox=OTHER, limit=2)
    assert [s["snapshot_id"] for s in page["snapshots"]] == [f"snap-{4:024x}", f"snap-{3:024x}"]
    assert page["next_token"] == "2"
    nxt = ops.list(sandbox=OTHER, limit=2, next_token="2")
    assert [s["snapshot_id"] for s in nxt["snapshots"]] == [f"snap-{2:024x}", f"snap-{1:024x}"]
    last = ops.list(sandbox=OTHER, limit=2, next_token="4")
    assert [s["snapshot_id"] for s in last["snapshots"]] == [f"snap-{0:024x}", lonely] and last["next_token"] == ""
    assert {s["name"] for s in ops.list(name="even")["snapshots"]} == {"even"}
    assert [s["status"] for s in ops.list(status="failed")["snapshots"]] == ["FAILED"]
    e = err(ops.list, next_token="x1")
    assert (e.name, e.message) == ("InvalidRequest", "invalid next_token")
    with engine.begin() as c:
        refs.acquire(c, snapshot_id=f"snap-{4:024x}", sandbox_id=SBX, node_id="node-a", generation=1,
                     now_ms=rows.now_ms())
    top = ops.list(sandbox=OTHER, limit=1)["snapshots"][0]
    assert (top["runtime_ref_count"], top["runtime_ref_sandboxes"]) == (1, [SBX])
    with engine.connect() as c:
        assert c.execute(select(SN.c.id).where(SN.c.status == "DELETED")).first() is None


def test_caller_cap_is_timeout_with_the_job_id(engine: Engine, ops: SnapshotOps) -> None:
    """SNAP-5: a job still not terminal at the caller's cap → Timeout naming the job id; the
    job itself is untouched (it runs on in the runner); READY → the job's result; FAILED → the
    job's own error by name."""
    ops.op_timeout = 0.3
    job = ops._submit_create("req-t", SBX, "", {"sandbox": SBX, "name": ""})
    e = err(lambda: asyncio.run(ops._follow(job["id"])))
    assert e.name == "Timeout" and e.details["job_id"] == job["id"] and job["id"] in e.message
    assert ops.jobs.get_job(job["id"])["status"] == "PENDING"
    with engine.begin() as c:
        c.execute(update(J).where(J.c.id == job["id"]).values(
            status="FAILED", error={"name": "SandboxNotRunning", "message": "sandbox stopped"}))
    e = err(lambda: asyncio.run(ops._follow(job["id"])))
    assert (e.name, e.message, e.details["job_id"]) == ("SandboxNotRunning", "sandbox stopped", job["id"])
    with engine.begin() as c:
        c.execute(update(J).where(J.c.id == job["id"]).values(status="READY", error=None,
                                                              step_state={"result": {"snapshot_id": "x"}}))
    got = asyncio.run(ops._follow(job["id"]))
    assert got["snapshot_id"] == "x" and got["job"]["status"] == "READY"
