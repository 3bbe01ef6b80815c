"""Sandboxes and resolve against a live cluster without QEMU (RT-2, RT-17, RT-19, RES-1 to
RES-4, DIST-9, TPL-13): a real coordinator and two real `none`-driver agents that build and
serve a template from a local oci-archive but never receive sandboxes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_template_create import archive, start
from tests.support import Cluster, wait_for

BACKSTOP = "2s"


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    c = Cluster(root=tmp_path, db_url=f"sqlite:///{tmp_path}/coordinator.db",
                coord_extra=[f"resolve.backstop_interval={BACKSTOP}"])
    try:
        yield c
    finally:
        c.stop()




def test_none_driver_nodes_build_but_never_get_sandboxes(cluster: Cluster, tmp_path: Path) -> None:
    """RT-2: `none` agents build and hold the template (DIST-9, TPL-13: in memory mode they get
    rootfs-only READY replicas, no memory snapshot); `sandbox create --node` on one →
    SandboxUnsupported "node N has no sandbox runtime (driver none)", with no record written;
    `sandbox create --template` → TemplateHasNoReadyReplica with the per-node reason (RES-3).
    RT-17: an unknown node → NodeNotFound, a cordoned one → NodeNotEligible; snapshot sources →
    SnapshotNotFound. RT-19: list is empty, show/destroy of an unknown sandbox → SandboxNotFound.
    RES-1 to RES-4 live: unknown alias → TemplateNotFound, a snapshot id → SnapshotNotFound,
    per-node reasons that follow a cordon and uncordon at once; a deleted template is forgotten
    by the backstop rebuild (here every 2 s)."""
    imports = tmp_path / "import"
    ref = archive(imports)
    start(cluster, ["node-a", "node-b"], imports)
    doc = cluster.ok("template", "create", "--image", ref, "--builder", "node-a", "--alias", "web",
             "--snapshot-mode", "memory", "--wait", timeout=90)
    assert doc["job"]["status"] == "READY", doc
    reps = cluster.ok("template", "show", "web")["template"]["replicas"]
    assert [(r["node_id"], r["status"], r["phase"], r["has_memory_snapshot"]) for r in reps] == [
        ("node-a", "READY", "READY", False), ("node-b", "READY", "READY", False)]
    tpl = doc["template_id"] if "template_id" in doc else doc["job"]["resource_id"]

    # Resolve (RES-3): the template is READY everywhere, but no node has a sandbox runtime.
    e = cluster.err("resolve", "web")
    assert (e["name"], e["message"]) == ("TemplateHasNoReadyReplica", "template web is not ready on any placeable node")
    assert e["details"] == {"template": tpl, "nodes": [
        {"node": "node-a", "reason": "no sandbox runtime (driver none)"},
        {"node": "node-b", "reason": "no sandbox runtime (driver none)"}]}
    assert cluster.err("resolve", "nope")["name"] == "TemplateNotFound"
    assert cluster.err("resolve", "snap-" + "0" * 24)["name"] == "SnapshotNotFound"
    assert cluster.err("resolve", "tpl-XYZ")["name"] == "InvalidRequest"
    cluster.ok("node", "cordon", "node-b")
    reasons = {d["node"]: d["reason"] for d in cluster.err("resolve", tpl)["details"]["nodes"]}
    assert reasons["node-b"].startswith("not placeable: READY/CORDONED/storage "), reasons

    # Sandbox create (RT-17, RT-2).
    e = cluster.err("sandbox", "create", "--template", "web", "--node", "node-a")
    assert (e["name"], e["message"]) == ("SandboxUnsupported", "node node-a has no sandbox runtime (driver none)")
    e = cluster.err("sandbox", "create", "--template", "web", "--node", "node-b")
    assert e["name"] == "NodeNotEligible" and e["details"]["nodes"][0]["node"] == "node-b", e
    assert cluster.err("sandbox", "create", "--template", "web", "--node", "ghost")["name"] == "NodeNotFound"
    cluster.ok("node", "uncordon", "node-b")
    e = cluster.err("sandbox", "create", "--template", "web")
    assert e["name"] == "TemplateHasNoReadyReplica" and e["details"]["nodes"] == [
        {"node": "node-a", "reason": "no sandbox runtime (driver none)"},
        {"node": "node-b", "reason": "no sandbox runtime (driver none)"}], e
    assert cluster.err("sandbox", "create", "--snapshot", "snap-" + "1" * 24)["name"] == "SnapshotNotFound"
    assert cluster.err("sandbox", "create", "--template", "nope")["name"] == "TemplateNotFound"

    # Records (RT-19): nothing was created, so nothing is listed; unknown ids are not found.
    assert cluster.ok("sandbox", "list")["sandboxes"] == []
    unknown = "sbx-" + "2" * 24
    assert cluster.err("sandbox", "show", unknown)["name"] == "SandboxNotFound"
    assert cluster.err("sandbox", "destroy", unknown)["name"] == "SandboxNotFound"
    # No sandboxes: the template deletes (TPL-26's TemplateInUse does not apply).
    assert cluster.ok("template", "delete", "web", "--wait", timeout=60)["job"]["status"] == "READY"
    # The DELETE job's status change publishes no event yet: the backstop rebuild (RES-4) brings it.
    wait_for(lambda: cluster.tcctl("resolve", tpl)[1]["error"]["name"] == "TemplateNotFound", 10,
             "resolve to forget the deleted template")


class AgentStub:
    """The agents' side of the task port, scripted per node (the coordinator logic is what is
    tested here; the agent contract is the one in coordinator/sandboxes.py)."""

    def __init__(self, world: Any, refuse: set[str]) -> None:
        self.world = world
        self.refuse = refuse
        self.calls: list[tuple[str, str, str, str]] = []   # (node, op, task id, record state at send)

    async def run_task(self, node: str, op: str, args: dict[str, Any], task_id: str, on_progress: Any = None, *,
                       deadline_ms: int = 0) -> dict[str, Any]:
        from coordinator.sandboxes import record
        from protocol.errors import ReplicaIncompatible
        rec = record(self.world.engine, args["sandbox_id"])
        self.calls.append((node, op, task_id, rec["state"] if rec else "-"))
        if op == "CREATE_SANDBOX" and node in self.refuse:
            raise ReplicaIncompatible(f"node {node}: pins differ", {"node": node})
        if op == "CREATE_SANDBOX":
            return {"sandbox_id": args["sandbox_id"], "state": "RUNNING", "restored": args["restore"] == "memory",
                    "boot_ms": 5, "ready_ms": 7, "exit_code": None}
        return {"sandbox_id": args["sandbox_id"], "destroyed": True}


def test_create_records_retries_and_compat7_in_process(tmp_path: Path) -> None:
    """In process, real SQLite and the real index, agents scripted: RT-19 the record is written
    CREATING before CREATE_SANDBOX goes out and is RUNNING after; RT-17 a retry with the same
    request id returns the same sandbox (the same task id re-sent while CREATING), another
    payload → TemplateAttemptInProgress. COMPAT-7: a ReplicaIncompatible refusal marks that
    replica STALE (database and index), schedules a compat scan of the node and retries once
    on the next candidate; an explicit --node is not moved. TPL-26: TemplateInUse while the
    sandbox exists, FAILED ones aside; destroy deletes the record."""
    import asyncio

    from sqlalchemy import select

    from coordinator.db.models import Replica
    from coordinator.sandboxes import Sandboxes, check_not_in_use, record, update_record
    from protocol.errors import ReplicaIncompatible, TemplateAttemptInProgress, TemplateInUse
    from tests.unit.test_resolve_index import TPL, World

    w = World(tmp_path)
    stub = AgentStub(w, refuse={"n1"})
    scans: list[str] = []
    svc = Sandboxes(w.engine, w.reg, w.index, stub, publish=w.bus.publish, schedule_scan=scans.append)

    async def go() -> None:
        await w.index.rebuild()
        sbx = await svc.create(request_id="r-1", template="web", name="demo")
        assert (sbx["state"], sbx["node_id"], sbx["restore"], sbx["name"]) == ("RUNNING", "n2", "cold", "demo")
        assert [(n, op, state) for n, op, _, state in stub.calls] == [
            ("n1", "CREATE_SANDBOX", "CREATING"), ("n2", "CREATE_SANDBOX", "CREATING")]
        assert scans == ["n1"]
        with w.engine.connect() as c:
            r = Replica.__table__
            assert c.execute(select(r.c.compat).where(r.c.template_id == TPL, r.c.node_id == "n1")).scalar() == "STALE"
        assert (await w.index.resolve("web", "n1"))["node"] == "n2"  # the index took it
        rec = record(w.engine, sbx["sandbox_id"])
        assert (rec["state"], rec["node_id"], rec["template_id"]) == ("RUNNING", "n2", TPL)

        again = await svc.create(request_id="r-1", template="web", name="demo")
        assert again["sandbox_id"] == sbx["sandbox_id"] and len(stub.calls) == 2  # RUNNING: answered from the record
        update_record(w.engine, sbx["sandbox_id"], state="CREATING")  # as if the first caller went away
        again = await svc.create(request_id="r-1", template="web", name="demo")
        assert again["sandbox_id"] == sbx["sandbox_id"] and stub.calls[-1][2] == stub.calls[1][2]  # same task id
        try:
            await svc.create(request_id="r-1", template="web", name="other")
            raise AssertionError("a different payload was accepted")
        except TemplateAttemptInProgress as exc:
            assert "already used with a different payload" in exc.message

        try:
            check_not_in_use(w.engine, TPL)
            raise AssertionError("TemplateInUse expected")
        except TemplateInUse as exc:
            assert exc.details["sandboxes"] == [sbx["sandbox_id"]]

        stub.refuse = {"n3"}  # an explicit node that refuses: marked STALE, not moved, FAILED
        try:
            await svc.create(request_id="r-2", template="web", node="n3")
            raise AssertionError("ReplicaIncompatible expected")
        except ReplicaIncompatible:
            pass
        assert scans == ["n1", "n3"] and stub.calls[-1][0] == "n3"
        failed = [s for s in await svc.list() if s["recorded_state"] == "FAILED"]
        assert len(failed) == 1 and failed[0]["node_id"] == "n3" and "ReplicaIncompatible" in failed[0]["last_error"]

        assert (await svc.destroy(sbx["sandbox_id"]))["destroyed"] is True
        assert record(w.engine, sbx["sandbox_id"]) is None
        check_not_in_use(w.engine, TPL)  # only the FAILED one is left
    asyncio.run(go())
