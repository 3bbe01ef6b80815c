"""Snapshots of running sandboxes end to end (SNAP-1 to SNAP-19, GC-1): a real coordinator and a
real `qemu`-driver agent under TCG, driven with tcctl.

The guest counts every 100 ms and prints, at each tick, whether ``/pre`` (written at count 2,
before any snapshot) and ``/post`` (written at count POST_AT) are on its disk.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import zmq
from sqlalchemy import create_engine, text

from tests import oci
from protocol.errors import SessionUnknown
from protocol.messages import Error
from tests.fake_coordinator import Coordinator, hello_and_welcome
from tests.integration.test_sandbox_runtime import Driver
from tests.layers import Dir, File, Symlink, layer
from tests.support import HAVE_QEMU, NEEDS_QEMU, PY, REPO, Cluster, qemu_agent_extra, wait_for

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason=NEEDS_QEMU)

POST_AT = 120
SCRIPT = ('i=0; while :; do p=n; q=n; [ -e /pre ] && p=y; [ -e /post ] && q=y; echo "count $i pre=$p post=$q"; '
          '[ $i = 2 ] && touch /pre && sync; '
          f'[ $i = {POST_AT} ] && touch /post && sync; i=$((i+1)); sleep 0.1; done')
LINE = re.compile(r"^count (\d+) pre=([yn]) post=([yn])", re.M)
TOOLS = ("sh", "sleep", "echo", "touch", "sync", "test", "[")


def counter_archive(imports: Path) -> str:
    imports.mkdir(exist_ok=True)
    busybox = Path(shutil.which("busybox") or "/bin/busybox").read_bytes()
    img = oci.image([layer([Dir("bin"), File("bin/busybox", busybox, mode=0o755),
                            *[Symlink(f"bin/{t}", "busybox") for t in TOOLS], Dir("tmp"), Dir("etc"),
                            File("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n"), File("etc/group", b"root:x:0:\n")])],
                    config={"Entrypoint": ["/bin/sh", "-c", SCRIPT], "Env": ["PATH=/bin"]})
    oci.write_oci_archive(imports / "counter.tar", img, tag="v1")
    return f"oci-archive:{imports / 'counter.tar'}:v1"


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    # QEMU under TCG loads the two vCPUs: a late beat must not make the node SUSPECT (which would
    # refuse a step with NodeUnavailable), so SUSPECT takes 4.5 missed beats here, not 2.
    c = Cluster(root=tmp_path, db_url=f"sqlite:///{tmp_path}/coordinator.db", grace="0s", lease_ttl_min="10s",
                coord_extra=["compat.debounce=1h", "reconcile.interval=1s", "heartbeat.suspect_missed=4.5"])
    try:
        yield c
    finally:
        c.stop()


def lines(cluster: Cluster, sid: str) -> list[tuple[int, str, str]]:
    got = cluster.ok("sandbox", "show", sid, "--console", timeout=30)["sandbox"]["console"]
    return [(int(n), p, q) for n, p, q in LINE.findall(got.replace("\r", ""))]


def last(cluster: Cluster, sid: str) -> tuple[int, str, str] | None:
    found = lines(cluster, sid)
    return found[-1] if found else None


@pytest.mark.timeout(600)
def test_snapshot_create_rollback_delete(cluster: Cluster, tmp_path: Path) -> None:
    """SNAP-1..SNAP-6: a snapshot of a running sandbox, idempotent by request id with the SPEC
    messages; SNAP-2/SNAP-7: a rollback while a snapshot job is active on the sandbox is refused;
    SNAP-5: that job, whose caller went away, still ends READY; TPL-31: a coordinator crash
    after the agent's snapshot step resumes the job to READY.
    SNAP-8..SNAP-10, RT-14: rollback → the counter resumes from the snapshot's value, /pre
    (before) is there, /post (after) is gone, generation 1. SNAP-18: a sandbox created from the
    snapshot holds an ACTIVE ref. SNAP-11/SNAP-12: delete with ACTIVE refs → tombstone, hidden
    from list/show, refused as a source. SNAP-15/SNAP-16: storage above reject refuses create and
    rollback with NodeStorageBlocked, delete works. SNAP-19/SNAP-14: destroying the sandboxes
    releases the refs and the finaliser removes the files and the row. GC-1: deleting the
    template keeps the snapshot's base artifact, and the snapshot stays restorable. SNAP-21: an
    unreachable node's refs get last_error, never released, and are refreshed when it is back;
    SNAP-20: a sandbox destroyed while the coordinator was down is released as not observed."""
    imports = tmp_path / "import"
    ref = counter_archive(imports)
    agent_extra = [f'image.local_roots=["{imports}"]', "task.progress_interval=0.1", *qemu_agent_extra()]
    cluster.start_coordinator()
    cluster.start_agent("node-q", agent_extra)
    wait_for(lambda: cluster.health().get("node-q") == "READY", 60, "node-q READY")
    doc = cluster.ok("template", "create", "--image", ref, "--builder", "node-q", "--alias", "counter",
                     "--memory-mib", "256", "--wait", timeout=180)
    assert doc["job"]["status"] == "READY", doc
    tpl = doc["template_id"]
    sa = cluster.ok("sandbox", "create", "--template", "counter", timeout=180)["sandbox"]["sandbox_id"]
    wait_for(lambda: (last(cluster, sa) or (0,))[0] >= 5 or None, 60, "count ≥ 5")

    # SNAP-1..SNAP-6
    before = last(cluster, sa)
    snap = cluster.ok("snapshot", "create", sa, "--name", "five", "--request-id", "snap-req-1", timeout=120)
    s1 = snap["snapshot_id"]
    assert (snap["status"], snap["sandbox_id"], snap["node_id"], snap["template_id"], snap["name"]) == \
        ("READY", sa, "node-q", tpl, "five"), snap
    assert snap["job"]["operation"] == "SNAPSHOT_CREATE" and snap["job"]["status"] == "READY"
    assert snap["pins"]["host_kernel"] and snap["host_facts"]["accelerator"] == "tcg" and snap["base_artifact_id"]
    at_snap = last(cluster, sa)
    assert at_snap is not None and at_snap[0] < POST_AT, at_snap  # before /post
    again = cluster.ok("snapshot", "create", sa, "--name", "five", "--request-id", "snap-req-1", timeout=60)
    assert again["snapshot_id"] == s1 and again["job"]["job_id"] == snap["job"]["job_id"]
    e = cluster.err("snapshot", "create", sa, "--name", "other", "--request-id", "snap-req-1")
    assert (e["name"], e["message"]) == ("TemplateAttemptInProgress", "payload does not match existing snapshot job"), e
    e = cluster.err("snapshot", "rollback", sa, s1, "--request-id", "snap-req-1")
    assert (e["name"], e["message"]) == ("TemplateAttemptInProgress",
                                         "request snap-req-1 is already bound to SNAPSHOT_CREATE"), e
    listed = cluster.ok("snapshot", "list", "--sandbox", sa)
    assert [s["snapshot_id"] for s in listed["snapshots"]] == [s1] and listed["next_token"] == ""

    # The sandbox runs on and writes /post; then the rollback resumes it from the snapshot.
    wait_for(lambda: (last(cluster, sa) or (0, "", "n"))[2] == "y" or None, 60, "/post written")
    rb = cluster.ok("snapshot", "rollback", sa, s1, timeout=120)
    assert (rb["sandbox_id"], rb["snapshot_id"], rb["generation"], rb["state"]) == (sa, s1, 1, "RUNNING"), rb

    def resumed() -> list[tuple[int, str, str]] | None:
        seen = lines(cluster, sa)
        # The restored VM writes a new console log; never count a line from before the rollback.
        cut = max((i for i, x in enumerate(seen) if x[2] == "y"), default=-1)
        after = seen[cut + 1:]
        return after if len(after) >= 3 else None
    after = wait_for(resumed, 60, "the counter after the rollback")
    # The counter goes on from the value it had while paused for the snapshot, with /pre.
    assert before[0] <= after[0][0] <= at_snap[0] + 1 and all((p, q) == ("y", "n") for _, p, q in after), \
        (before, at_snap, after)
    assert cluster.ok("snapshot", "show", s1)["runtime_ref_sandboxes"] == [sa]

    # SNAP-2: a rollback while a snapshot job runs on the sandbox is refused. The sandbox's QEMU
    # is stopped (SIGSTOP) so the snapshot's QMP calls wait; they go on once it continues.
    qemu_pid = int(next((tmp_path / "agents" / "node-q").rglob(f"{sa}/qemu.pid")).read_text().strip())
    os.kill(qemu_pid, signal.SIGSTOP)
    try:
        bg = subprocess.Popen([PY, "-m", "coordinator.cli.main", "snapshot", "create", sa, "--name", "busy", "--json",
                               "--endpoint", cluster.admin, "--timeout", "120"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cluster.env())
        wait_for(lambda: bg.poll() is not None or [
            j for j in cluster.ok("job", "list")["jobs"]
            if j["operation"] == "SNAPSHOT_CREATE" and j["status"] in ("PENDING", "RUNNING")] or None,
            30, "the second snapshot job active")
        assert bg.poll() is None, bg.communicate()
        e = cluster.err("snapshot", "rollback", sa, s1)
        assert e["name"] == "TemplateAttemptInProgress" and "SNAPSHOT_CREATE" in e["message"], e
        bg.kill()  # SNAP-5: the caller goes away; the job runs on to its end
        bg.communicate(timeout=30)
    finally:
        os.kill(qemu_pid, signal.SIGCONT)
    wait_for(lambda: [s for s in cluster.ok("snapshot", "list", "--name", "busy")["snapshots"]
                      if s["status"] == "READY"] or None, 120, "the abandoned snapshot job READY")

    s2 = [s["snapshot_id"] for s in cluster.ok("snapshot", "list", "--name", "busy")["snapshots"]]
    assert len(s2) == 1
    s2 = s2[0]

    # SNAP-18: a sandbox from the snapshot, on its node, holds an ACTIVE ref.
    sb = cluster.ok("sandbox", "create", "--snapshot", s1, timeout=120)["sandbox"]
    assert (sb["state"], sb["node_id"], sb["restore"]) == ("RUNNING", "node-q", "snapshot"), sb
    sbid = sb["sandbox_id"]
    shown = cluster.ok("snapshot", "show", s1)
    assert shown["runtime_ref_count"] == 2 and shown["runtime_ref_sandboxes"] == sorted([sa, sbid]), shown

    # SNAP-11, SNAP-12: delete with ACTIVE refs → tombstone.
    gone = cluster.ok("snapshot", "delete", s1, timeout=60)
    assert gone["tombstoned"] is True and gone["refs"] == sorted([sa, sbid]), gone
    assert gone["job"]["status"] == "READY" and gone["job"]["operation"] == "SNAPSHOT_DELETE"
    assert s1 not in [s["snapshot_id"] for s in cluster.ok("snapshot", "list")["snapshots"]]
    assert cluster.err("snapshot", "show", s1)["name"] == "SnapshotNotFound"
    assert cluster.err("sandbox", "create", "--snapshot", s1)["name"] == "SnapshotNotFound"
    assert cluster.err("snapshot", "rollback", sa, s1)["name"] == "SnapshotNotFound"
    assert cluster.ok("snapshot", "delete", s1, timeout=60)["tombstoned"] is True  # repeats succeed alike
    files = tmp_path / "agents" / "node-q" / "snapshots"
    assert (files / s1).is_dir()

    # SNAP-9, SNAP-18: a rollback to another snapshot is generation 2 and switches sa's ref.
    rb = cluster.ok("snapshot", "rollback", sa, s2, timeout=120)
    assert (rb["generation"], rb["state"]) == (2, "RUNNING"), rb
    assert cluster.ok("snapshot", "show", s2)["runtime_ref_sandboxes"] == [sa]
    db = create_engine(f"sqlite:///{tmp_path}/coordinator.db")

    def refs(snap: str) -> list[dict[str, Any]]:
        with db.connect() as c:
            return [dict(r) for r in c.execute(text("select * from runtime_refs where snapshot_id = :i order by id"),
                                                {"i": snap}).mappings()]
    assert [(r["sandbox_id"], r["status"], r["release_reason"]) for r in refs(s1)] == [
        (sa, "RELEASED", "switched runtime ref"), (sbid, "ACTIVE", "")], refs(s1)

    # SNAP-19, SNAP-14: the tombstone's last ref goes → its files and row go.
    cluster.ok("sandbox", "destroy", sbid, timeout=60)
    wait_for(lambda: not (files / s1).exists() or None, 60, "the tombstone's files removed")

    def row_gone() -> bool:
        with db.connect() as c:
            return c.execute(text("select count(*) from snapshots where id = :i"), {"i": s1}).scalar() == 0
    wait_for(row_gone, 30, "the tombstone row deleted")
    cluster.ok("sandbox", "destroy", sa, timeout=60)
    assert [(r["status"], r["release_reason"]) for r in refs(s2)] == [("RELEASED", "sandbox destroyed")]

    # GC-1: the template goes, the snapshot's base artifact stays and the snapshot restores.
    base = cluster.ok("snapshot", "show", s2)["base_artifact_id"]
    assert cluster.ok("template", "delete", tpl, "--wait", timeout=120)["job"]["status"] == "READY"
    assert cluster.ok("artifact", "show", base)["artifact"]["status"] == "READY"
    sc = cluster.ok("sandbox", "create", "--snapshot", s2, timeout=120)["sandbox"]["sandbox_id"]
    wait_for(lambda: len(lines(cluster, sc)) >= 3 or None, 60, "the restored counter")
    s4 = cluster.ok("snapshot", "create", sc, timeout=120)["snapshot_id"]

    # SNAP-21: the node is unreachable → the ref gets last_error and stays ACTIVE; back → cleared.
    cluster.agents["node-q"].kill()
    wait_for(lambda: refs(s2)[-1]["last_error"].startswith("node unreachable since") or None, 60,
             "the ref marked unreachable")
    assert refs(s2)[-1]["status"] == "ACTIVE"
    cluster.start_agent("node-q", agent_extra)
    wait_for(lambda: refs(s2)[-1]["last_error"] == "" or None, 60, "the ref refreshed by the node's report")
    assert refs(s2)[-1]["status"] == "ACTIVE" and refs(s2)[-1]["sandbox_id"] == sc

    # TPL-31 for snapshot jobs: the coordinator dies right after the snapshot step is persisted;
    # restarted, the job resumes at REGISTER (the re-sent task answers from the agent's record).
    cluster.coordinator.stop()
    saved = list(cluster.coord_extra)
    cluster.coord_extra = [*saved, "job.test_crash_after_step=SNAPSHOT"]
    cluster.start_coordinator()
    wait_for(lambda: cluster.health().get("node-q") == "READY", 60, "node-q back")
    cluster.tcctl("snapshot", "create", sc, "--name", "crash", timeout=3)  # its caller loses the answer
    wait_for(lambda: not cluster.coordinator.alive() or None, 60, "the injected coordinator crash")
    cluster.coord_extra = saved
    cluster.start_coordinator()
    wait_for(lambda: [s for s in cluster.ok("snapshot", "list", "--name", "crash")["snapshots"]
                      if s["status"] == "READY"] or None, 60, "the resumed snapshot READY")

    # SNAP-15, SNAP-16: above reject, snapshot create and rollback are refused; delete works.
    cluster.coordinator.stop()
    cluster.coord_extra = [*saved, "storage.warn=0.5", "storage.reject=1", "storage.delete_only=99"]
    cluster.start_coordinator()
    wait_for(lambda: cluster.ok("storage", "status")["nodes"][0]["mode"] == "reject" or None, 60, "mode reject")
    e = cluster.err("snapshot", "create", sc)
    assert e["name"] == "NodeStorageBlocked" and e["details"]["node"] == "node-q", e
    assert e["message"].startswith("snapshot operations are blocked on node node-q (usage="), e
    assert cluster.err("snapshot", "rollback", sc, s4)["name"] == "NodeStorageBlocked"
    assert cluster.ok("snapshot", "delete", s4, timeout=60)["tombstoned"] is False
    assert not (files / s4).exists()

    # SNAP-20: a sandbox destroyed while the coordinator is down (here by a stand-in coordinator
    # on its endpoint) → after the restart its ref is released as not observed on the node.
    cluster.coordinator.stop()
    cluster.coord_extra = saved
    zctx = zmq.Context()
    fake = Coordinator(zctx, f"tcp://127.0.0.1:{cluster.agent_port}")
    try:
        ident, beat, _ = fake.expect("HEARTBEAT", 15)  # the agent's old session: WIRE-11 makes it HELLO
        fake.send(ident, Error.of(SessionUnknown("no live session"), beat.msg_id))
        ident, _ = hello_and_welcome(fake)
        res = Driver(fake, ident).run("DESTROY_SANDBOX", {"sandbox_id": sc}, 60)
        assert res.ok, res.error
    finally:
        fake.close()
        zctx.term()
    cluster.start_coordinator()
    wait_for(lambda: refs(s2)[-1]["status"] == "RELEASED" or None, 60, "the unobserved ref released")
    assert refs(s2)[-1]["release_reason"] == "runtime ref not observed on node"
