"""`template create --from-sandbox` — the COMMIT job end to end (TPL-23 to TPL-25, DIST-8, TPL-5).

A real coordinator and real agents. The commit test runs three agents with the `qemu` runtime
under TCG — node-a and node-b alike, node-c reporting another guest image version — and a
build-only `none` agent, node-d: the guest's command writes /committed on its first boot —
without `sync`: the commit asks the guest to sync before it pauses (TPL-24) — or prints what
it finds there when the file already exists, so a cold-booted sandbox from the committed
template shows the committed file on its console, and one resumed from the committed memory
goes on ticking instead. The refusal test runs on `none`-driver agents.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, insert, select

from tests import oci
from tests.layers import Dir, File, Symlink, layer
from tests.support import HAVE_QEMU, NEEDS_QEMU, Cluster, qemu_agent_extra, wait_for

GUEST = ('if [ -e /committed ]; then echo "found $(cat /committed)"; '
         'else echo commit-me > /committed; echo wrote; fi; '
         'i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done')
NODES = ("node-a", "node-b", "node-c", "node-d")
MEMORY_NODES = ("node-a", "node-b")   # DIST-8: node-c's guest image differs, node-d has no sandboxes


def guest_archive(imports: Path) -> str:
    """A one-layer busybox image running GUEST."""
    imports.mkdir(exist_ok=True)
    busybox = Path(shutil.which("busybox") or "/bin/busybox").read_bytes()
    links = [Symlink(f"bin/{name}", "busybox") for name in ("sh", "sleep", "echo", "cat", "sync")]
    img = oci.image([layer([Dir("bin"), File("bin/busybox", busybox, mode=0o755), *links, Dir("tmp"),
                            Dir("etc"), File("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n"),
                            File("etc/group", b"root:x:0:\n")])],
                    config={"Entrypoint": ["/bin/sh", "-c", GUEST]})
    oci.write_oci_archive(imports / "guest.tar", img, tag="v1")
    return f"oci-archive:{imports / 'guest.tar'}:v1"


def mirrored(db_url: str, artifact_id: str) -> dict[str, dict[str, Any]]:
    """The artifact's entries in the nodes' catalogs as the coordinator mirrors them (CAT-6)."""
    from coordinator.db.models import NodeCatalogEntry as C
    engine = create_engine(db_url)
    try:
        with engine.connect() as c:
            rows = c.execute(select(C.node_id, C.body).where(C.kind == "artifact", C.entry_id == artifact_id))
            return {n: dict(b or {}) for n, b in rows}
    finally:
        engine.dispose()


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    # SUSPECT only after 4.5 missed beats: four agents and QEMU under TCG share two vCPUs.
    c = Cluster(root=tmp_path, db_url=f"sqlite:///{tmp_path}/coordinator.db", grace="0s", lease_ttl_min="10s",
                coord_extra=["heartbeat.suspect_missed=4.5"])
    try:
        yield c
    finally:
        c.stop()


@pytest.mark.skipif(not HAVE_QEMU, reason=NEEDS_QEMU)
def test_commit_running_sandbox_to_four_nodes(cluster: Cluster, tmp_path: Path) -> None:
    """TPL-23, TPL-24, TPL-25, DIST-6, DIST-8, COMPAT-1, TPL-5: a sandbox that wrote /committed
    is committed with --nodes on all four nodes → the COMMIT job passes SNAPSHOTTING and ends
    READY 100; the template (source commit, memory mode, the sandbox's runtime config) is READY
    with four READY replicas; DIST-8: the memstate artifact (fingerprint over its files' sha256s)
    goes to node-b, whose versions and facts equal the origin's — placed on node-a and node-b,
    verified in both catalogs — and node-b's replica has the memory snapshot (its row naming the
    memstate, pinned to the origin's versions), from which a sandbox there resumes the committed
    guest (restore memory, ticking, the first lines not run again), as on the origin; node-c
    (another guest image) and node-d (build-only) get rootfs-only replicas, and a sandbox on
    node-c cold-boots with the committed file; the rootfs artifact's id is the fingerprint of
    {kind: flat, sha256}, with the same verified sha256 in all four nodes' catalogs; the source
    sandbox keeps running; the same request id returns the same job. A READY snapshot of the
    sandbox commits onto a node that is not its origin (TPL-23's snapshot source: its runtime
    config inherited)."""
    from protocol.canonical import digest
    from protocol.fingerprints import artifact_id
    imports = tmp_path / "import"
    ref = guest_archive(imports)
    cluster.start_coordinator()
    for node in NODES:
        runtime = {"node-c": [*qemu_agent_extra(), "agent.versions.guest_image=another-guest"],
                   "node-d": []}.get(node, qemu_agent_extra())
        cluster.start_agent(node, [f'image.local_roots=["{imports}"]', "task.progress_interval=0.1", *runtime])
    wait_for(lambda: all(cluster.health().get(n) == "READY" for n in NODES), 60, "four READY nodes")
    doc = cluster.ok("template", "create", "--image", ref, "--builder", "node-a", "--nodes", "node-a",
                     "--alias", "base", "--memory-mib", "128", "--writable-size", "16M", "--wait", timeout=180)
    assert doc["job"]["status"] == "READY", doc
    sbx = cluster.ok("sandbox", "create", "--template", "base", "--node", "node-a", timeout=180)["sandbox"]
    sid = sbx["sandbox_id"]

    def console(sandbox: str, text: str) -> str | None:
        out = cluster.ok("sandbox", "show", sandbox, "--console", timeout=30)["sandbox"]["console"]
        return out if text in out else None
    wait_for(lambda: console(sid, "tick 1"), 60, "the source guest to write /committed")
    assert "wrote" in (console(sid, "wrote") or "")

    args = ("template", "create", "--from-sandbox", sid, "--nodes", ",".join(NODES), "--alias", "committed",
            "--request-id", "commit-1")
    done = cluster.ok(*args, "--wait", timeout=180)
    job = done["job"]
    assert (job["operation"], job["status"], job["phase"], job["progress"]) == ("COMMIT", "READY", "READY", 100), job
    assert job["builder_node_id"] == "node-a"
    again = cluster.ok(*args)  # TPL-5: an equal resubmit returns the existing job
    assert (again["created"], again["job"]["job_id"]) == (False, job["job_id"])

    tpl = cluster.ok("template", "show", "committed")["template"]
    assert tpl["status"] == "READY" and tpl["template_id"] == done["template_id"], tpl
    assert tpl["source"] == "commit" and tpl["spec"]["snapshot_mode"] == "memory", tpl
    assert tpl["runtime_config"]["entrypoint"] == ["/bin/sh", "-c", GUEST]
    reps = sorted((r["node_id"], r["status"], r["phase"], r["has_memory_snapshot"]) for r in tpl["replicas"])
    assert reps == [(n, "READY", "READY", n in MEMORY_NODES) for n in NODES], tpl["replicas"]

    art = cluster.ok("artifact", "show", job["artifact_id"])["artifact"]
    assert art["kind"] == "rootfs" and art["status"] == "READY", art
    assert art["fingerprint"] == digest({"kind": "flat", "sha256": art["sha256"]})
    assert art["artifact_id"] == artifact_id(art["fingerprint"])
    copies = wait_for(lambda: (m := mirrored(cluster.db_url, art["artifact_id"])) and len(m) == 4 and m,
                      30, "the export in four catalogs")
    assert {n: (b.get("state"), b.get("sha256")) for n, b in copies.items()} == \
        {n: ("verified", art["sha256"]) for n in NODES}, copies

    # TPL-24, TPL-25, DIST-8: the memstate artifact, placed on the nodes matching the origin.
    from coordinator.db.models import Replica, Template
    engine = create_engine(cluster.db_url)
    with engine.connect() as conn:
        mid = conn.execute(select(Template.memstate_artifact_id).where(Template.id == tpl["template_id"])).scalar()
        rows = {r.node_id: r for r in conn.execute(select(Replica.__table__)
                                                    .where(Replica.template_id == tpl["template_id"]))}
    engine.dispose()
    assert {n: r.memstate_artifact_id for n, r in rows.items()} == \
        {n: (mid if n in MEMORY_NODES else None) for n in NODES}, rows
    assert rows["node-b"].pins == rows["node-a"].pins and rows["node-b"].compat == "OK", rows["node-b"]
    mem = cluster.ok("artifact", "show", mid)["artifact"]
    assert (mem["kind"], mem["status"], sorted(p["node_id"] for p in mem["placements"])) == \
        ("memstate", "READY", list(MEMORY_NODES)), mem
    assert mem["artifact_id"] == artifact_id(mem["fingerprint"]) and mem["sha256"] == mem["fingerprint"]
    held = wait_for(lambda: (m := mirrored(cluster.db_url, mid)) and len(m) == 2 and m, 30,
                    "the memstate in node-a's and node-b's catalogs")
    for body in held.values():
        assert body["state"] == "verified" and mem["fingerprint"] == digest(
            {"kind": "memstate", "files": [{"name": f["name"], "sha256": f["sha256"]} for f in body["files"]]})

    # A READY snapshot of the same sandbox commits too (its frozen disk), here onto node-c only.
    snap = cluster.ok("snapshot", "create", sid, timeout=120)
    assert snap["status"] == "READY", snap
    from_snap = cluster.ok("template", "create", "--from-snapshot", snap["snapshot_id"], "--nodes", "node-c",
                           "--wait", timeout=120)
    assert from_snap["job"]["status"] == "READY", from_snap
    tpl2 = cluster.ok("template", "show", from_snap["template_id"])["template"]
    assert [(r["node_id"], r["status"]) for r in tpl2["replicas"]] == [("node-c", "READY")], tpl2
    assert tpl2["runtime_config"] == tpl["runtime_config"] and tpl2["source"] == "commit"

    other = cluster.ok("sandbox", "create", "--template", "committed", "--node", "node-c", timeout=180)["sandbox"]
    assert other["node_id"] == "node-c" and other["restore"] == "cold", other  # DIST-8: rootfs only
    wait_for(lambda: console(other["sandbox_id"], "found commit-me"), 60, "the committed file on node-c")

    # Memory mode on the origin and on node-b (DIST-8): a sandbox resumes the committed guest.
    for node in MEMORY_NODES:
        warm = cluster.ok("sandbox", "create", "--template", "committed", "--node", node, timeout=120)["sandbox"]
        assert (warm["node_id"], warm["restore"]) == (node, "memory"), warm
        out = wait_for(lambda: console(warm["sandbox_id"], "tick"), 30, f"the resumed guest ticking on {node}")
        assert "found" not in out and "wrote" not in out, out  # resumed mid-loop: no first lines again

    source = cluster.ok("sandbox", "show", sid)["sandbox"]
    assert source["state"] == "RUNNING", source  # TPL-24: the source runs on
    seen = cluster.ok("sandbox", "show", sid, "--console", timeout=30)["sandbox"]["console"].count("tick")
    wait_for(lambda: cluster.ok("sandbox", "show", sid, "--console", timeout=30)["sandbox"]["console"]
             .count("tick") > seen, 30, "the source guest still ticking")


def _insert(db_url: str, table: Any, **values: Any) -> None:
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(table).values(**values))
    finally:
        engine.dispose()


def _sandbox_record(sandbox_id: str, state: str) -> dict[str, Any]:
    """A sandbox record as the coordinator writes it (RT-19), on node-a."""
    return dict(id=sandbox_id, request_id=f"req-{sandbox_id}", request_digest="", name="", source_kind="template",
                source_id="tpl-" + "2" * 24, template_id="tpl-" + "2" * 24, node_id="node-a", runtime_config={},
                spec={}, vcpus=1, memory_mib=128, restore="cold", state=state, exit_code=None, last_error="",
                created_ms=1, updated_ms=1)


def test_commit_refusals_and_failures(sqlite_cluster: Cluster) -> None:
    """TPL-23: an unknown sandbox → SandboxNotFound; a recorded sandbox that is not RUNNING →
    SandboxNotRunning; a malformed id, --image together with --from-sandbox, or --rootfs-only
    without a source → InvalidRequest; an unknown snapshot → SnapshotNotFound; an unknown target
    → NodeNotEligible; none leaves a template behind. TPL-25: an export the node refuses (a `none` driver) ends the COMMIT job
    FAILED and the template FAILED with the error. TPL-21: a REDO of a commit template whose
    artifact has no surviving copy fails "template has no source image and no copy of art-…
    survives". Sandbox and template rows the coordinator would have written are inserted
    directly: a `none` node cannot run sandboxes."""
    from coordinator.db.models import Sandbox, Template
    c = sqlite_cluster
    c.start_coordinator()
    c.start_agent("node-a")
    wait_for(lambda: c.health().get("node-a") == "READY", 30, "node-a READY")
    unknown, exited, running = ("sbx-" + d * 24 for d in "013")
    e = c.err("template", "create", "--from-sandbox", unknown)
    assert e["name"] == "SandboxNotFound" and unknown in e["message"], e
    _insert(c.db_url, Sandbox.__table__, **_sandbox_record(exited, "EXITED"))
    e = c.err("template", "create", "--from-sandbox", exited, "--rootfs-only")
    assert e["name"] == "SandboxNotRunning" and "EXITED" in e["message"], e
    e = c.err("template", "create", "--from-sandbox", "sbx-nope")
    assert e["name"] == "InvalidRequest" and e["details"]["field"] == "from_sandbox", e
    e = c.err("template", "create", "--from-sandbox", unknown, "--image", "oci:/x")
    assert e["name"] == "InvalidRequest" and e["details"]["field"] == "image", e
    e = c.err("template", "create", "--image", "oci:/x", "--rootfs-only")
    assert e["name"] == "InvalidRequest" and e["details"]["field"] == "rootfs_only", e
    e = c.err("template", "create", "--from-snapshot", "snap-" + "3" * 24)
    assert e["name"] == "SnapshotNotFound", e
    assert c.ok("template", "list")["templates"] == []

    _insert(c.db_url, Sandbox.__table__, **_sandbox_record(running, "RUNNING"))
    e = c.err("template", "create", "--from-sandbox", running, "--nodes", "node-a,node-x")
    assert e["name"] == "NodeNotEligible" and [n["node"] for n in e["details"]["nodes"]] == ["node-x"], e
    job = c.ok("template", "create", "--from-sandbox", running, "--wait", timeout=60)["job"]
    assert (job["operation"], job["status"], job["error"]["name"]) == ("COMMIT", "FAILED", "SandboxUnsupported"), job
    tpl = c.ok("template", "show", job["resource_id"])["template"]
    assert tpl["status"] == "FAILED" and tpl["replicas"] == [] and tpl["last_error"], tpl

    gone = "art-" + "4" * 24
    _insert(c.db_url, Template.__table__, id="tpl-" + "5" * 24, alias="old-commit", requested_alias="old-commit",
            status="READY", source_kind="commit", image_ref="", manifest_digest="",
            spec={"image": "", "nodes": ["node-a"]}, runtime_config={}, artifact_id=gone, memstate_artifact_id=None,
            last_error="", created_ms=1, updated_ms=1)
    job = c.ok("template", "redo", "old-commit", "--wait", timeout=60)["job"]
    assert job["status"] == "FAILED", job
    assert job["error"]["message"] == f"template has no source image and no copy of {gone} survives", job
