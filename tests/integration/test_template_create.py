"""`tcctl template create` end to end (TPL-1 to TPL-17, TPL-29, TPL-33, IMG-4): a real
coordinator process, real agents, images from a local oci-archive or the loopback registry."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import oci
from tests.layers import Dir, File, layer
from tests.support import REPO, Cluster, wait_for


@pytest.fixture
def cluster(sqlite_cluster: Cluster) -> Cluster:
    return sqlite_cluster  # one backend: see the sqlite_cluster fixture


PASSWORD = "tpl-create-Secr3t-never-stored"


def start(cluster: Cluster, nodes: list[str], imports: Path, *extra: str) -> None:
    if cluster.coordinator is None:
        cluster.start_coordinator()
    for n in nodes:
        cluster.start_agent(n, [f'image.local_roots=["{imports}"]', "task.progress_interval=0.1", *extra])
    wait_for(lambda: all(cluster.health().get(n) == "READY" for n in nodes), 30, f"{nodes} READY")


def archive(imports: Path, name: str = "img.tar", marker: bytes = b"hi\n") -> str:
    imports.mkdir(exist_ok=True)
    img = oci.image([layer([Dir("etc"), File("etc/hello", marker)])],
                    config={"Cmd": ["/bin/sh", "-c", "sleep 1"], "Env": ["A=1"], "ExposedPorts": {"80/tcp": {}}})
    oci.write_oci_archive(imports / name, img, tag="v1")
    return f"oci-archive:{imports / name}:v1"


def build_tasks(cluster: Cluster, node: str) -> int:
    """BUILD_ARTIFACT task records in an agent's catalog (WIRE-13: one per task id)."""
    db = cluster.root / "agents" / node / "catalog.db"
    with sqlite3.connect(db) as c:
        return sum(1 for (body,) in c.execute("SELECT body FROM entries WHERE kind='task'")
                   if json.loads(body).get("op") == "BUILD_ARTIFACT")


@pytest.fixture
def imports(tmp_path: Path) -> Path:
    return tmp_path / "import"


def test_create_from_a_local_archive_ready_with_alias_and_views(cluster: Cluster, imports: Path) -> None:
    """TPL-4, TPL-13, TPL-14, TPL-16, TPL-29, TPL-30, TPL-33."""
    ref = archive(imports)
    start(cluster, ["node-a"], imports)
    rc, doc = cluster.tcctl("template", "create", "--image", ref, "--builder", "node-a", "--alias", "hello",
                            "--ports", "22", "--env", "B=2", "--wait", timeout=90)
    assert rc == 0, doc
    job = doc["job"]
    assert (job["status"], job["phase"], job["progress"], job["error"]) == ("READY", "READY", 100, None)
    assert job["builder_node_id"] == "node-a" and job["artifact_id"].startswith("art-")
    rc, shown = cluster.tcctl("template", "show", "hello")
    assert rc == 0, shown
    t = shown["template"]
    assert t["template_id"] == doc["template_id"] and t["status"] == "READY" and t["alias"] == "hello"
    assert [(r["node_id"], r["status"], r["phase"]) for r in t["replicas"]] == [("node-a", "READY", "READY")]
    assert t["replicas"][0]["pins"]["agent"]
    rc_cfg = t["runtime_config"]
    assert rc_cfg["cmd"] == ["/bin/sh", "-c", "sleep 1"] and rc_cfg["env"] == ["A=1", "B=2"]
    assert rc_cfg["ports"] == ["22/tcp", "80/tcp"] and rc_cfg["user"] == "0:0" and rc_cfg["workdir"] == "/"
    rc, listed = cluster.tcctl("template", "list")
    assert rc == 0 and listed["templates"][0]["replicas"] == {"ready": 1, "total": 1}
    rc, jobs = cluster.tcctl("job", "list", "--template", "hello")
    assert rc == 0 and [j["job_id"] for j in jobs["jobs"]] == [job["job_id"]]
    art = cluster.root / "agents" / "node-a" / "store" / "artifacts" / job["artifact_id"] / "rootfs.ext4"
    assert art.exists()
    rc, arts = cluster.tcctl("artifact", "list")
    assert rc == 0 and [a["artifact_id"] for a in arts["artifacts"]] == [job["artifact_id"]]
    rc, shown_art = cluster.tcctl("artifact", "show", job["artifact_id"])
    a = shown_art["artifact"]
    assert a["status"] == "READY" and a["size"] == art.stat().st_size and a["gc_deadline_ms"]
    assert [p["node_id"] for p in a["placements"]] == ["node-a"]
    assert a["references"]["templates"] == [doc["template_id"]] and a["references"]["replicas"] == 1


def test_idempotency_and_a_second_template_adopts_the_build(cluster: Cluster, imports: Path) -> None:
    """TPL-5: the same request id and payload → the same job; another payload →
    TemplateAttemptInProgress; TPL-8/TPL-9: two templates of one image → one build."""
    ref = archive(imports)
    start(cluster, ["node-a"], imports)
    args = ["template", "create", "--image", ref, "--builder", "node-a", "--request-id", "req-1"]
    rc, first = cluster.tcctl(*args, "--wait", timeout=90)
    assert rc == 0 and first["job"]["status"] == "READY", first
    rc, again = cluster.tcctl(*args)
    assert rc == 0 and again["job"]["job_id"] == first["job"]["job_id"] and again["created"] is False
    rc, other = cluster.tcctl(*args, "--vcpus", "2")
    assert rc == 1 and other["error"]["name"] == "TemplateAttemptInProgress"
    assert other["error"]["message"] == "request_id req-1 already used with a different payload"
    rc, second = cluster.tcctl("template", "create", "--image", ref, "--builder", "node-a", "--wait", timeout=90)
    assert rc == 0 and second["job"]["status"] == "READY", second
    assert second["job"]["artifact_id"] == first["job"]["artifact_id"]
    assert second["template_id"] != first["template_id"]
    assert build_tasks(cluster, "node-a") == 1


def test_failed_build_fails_the_job_and_the_template(cluster: Cluster, imports: Path) -> None:
    """CONV-5, TPL-15: an image that is not there → the job FAILED at 100 with the agent's error;
    the template FAILED with the message; nothing claimed stays BUILDING; TPL-18: it cannot
    claim an alias."""
    imports.mkdir()
    start(cluster, ["node-a"], imports)
    rc, doc = cluster.tcctl("template", "create", "--image", f"oci-archive:{imports}/missing.tar:v1",
                            "--builder", "node-a", "--wait", timeout=60)
    assert rc == 0, doc
    job = doc["job"]
    assert job["status"] == "FAILED" and job["progress"] == 100 and job["error"]["name"] == "ImageNotFound"
    rc, shown = cluster.tcctl("template", "show", doc["template_id"])
    assert shown["template"]["status"] == "FAILED" and shown["template"]["last_error"]
    rc, err = cluster.tcctl("template", "alias", "set", doc["template_id"], "broken")
    assert rc == 1 and err["error"]["name"] == "TemplateNotReady", err  # TPL-18: a claim needs READY
    assert "FAILED" in err["error"]["message"]


def test_registry_credentials_stay_in_memory(cluster: Cluster, imports: Path,
                                             registry_factory: Any) -> None:
    """IMG-3, IMG-4: a basic-auth registry; the password goes from tcctl's stdin to the builder and
    appears in no job row, template row, log or task record."""
    reg = registry_factory("basic", users={"puller": PASSWORD})
    reg.push("team/app", "1", oci.image([layer([File("f", b"x")])]), auth=("puller", PASSWORD))
    imports.mkdir()
    start(cluster, ["node-a"], imports, f'image.insecure_registries=["{reg.host}"]')
    r = subprocess.run([sys.executable, "-m", "coordinator.cli.main", "template", "create", "--image",
                        f"{reg.host}/team/app:1", "--username", "puller", "--password-stdin", "--wait", "--json",
                        "--endpoint", cluster.admin, "--timeout", "90"], input=PASSWORD + "\n", capture_output=True,
                       text=True, cwd=REPO, env=cluster.env(), timeout=150)
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["job"]["status"] == "READY", doc
    texts = [r.stdout, r.stderr, cluster.coordinator.output(), cluster.agents["node-a"].output()]
    texts += [p.read_bytes().decode("latin-1") for p in cluster.root.rglob("*.db*") if p.is_file()]
    for text in texts:
        assert PASSWORD not in text
    rc, bad = cluster.tcctl("template", "create", "--image", f"{reg.host}/team/app:1", "--wait", timeout=60)
    assert rc == 0 and bad["job"]["error"]["name"] == "ImageAuthFailed", bad


def test_create_on_three_agents_distributes_agent_to_agent(cluster: Cluster, imports: Path) -> None:
    """TPL-13, DIST-2 to DIST-7, WIRE-16: built once on the builder, fetched by the two other
    agents (a chunk corrupted in flight is asked again); the ext4 has the same sha256 on every
    node; three READY replicas with pins. Then a source that keeps lying is replaced."""
    import hashlib
    import os
    imports.mkdir()
    img = oci.image([layer([Dir("etc"), File("etc/hello", b"hi\n"), File("blob", os.urandom(6 << 20))])])
    oci.write_oci_archive(imports / "img.tar", img, tag="v1")
    nodes = ["node-a", "node-b", "node-c"]
    # The builder flips a byte in the first chunk it serves (test-only fault): re-requested.
    cluster.start_coordinator()
    cluster.start_agent("node-a", [f'image.local_roots=["{imports}"]', "transfer.test_corrupt_chunks=1"])
    start(cluster, nodes[1:], imports)
    rc, doc = cluster.tcctl("template", "create", "--image", f"oci-archive:{imports}/img.tar:v1",
                            "--builder", "node-a", "--writable-size", "64MiB", "--wait", timeout=120)
    assert rc == 0 and doc["job"]["status"] == "READY", doc
    assert any("failed its digest: asking again" in cluster.agents[n].output() for n in nodes[1:])
    assert doc["job"]["nodes"] == {"expected": 3, "ready": 3, "failed": 0, "pending": 0}
    rc, shown = cluster.tcctl("template", "show", doc["template_id"])
    reps = shown["template"]["replicas"]
    assert [(r["node_id"], r["status"], r["phase"]) for r in reps] == [(n, "READY", "READY") for n in nodes]
    assert all(r["pins"]["agent"] for r in reps)
    art = doc["job"]["artifact_id"]
    digests = set()
    for n in nodes:
        path = cluster.root / "agents" / n / "store" / "artifacts" / art / "rootfs.ext4"
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
        assert path.stat().st_blocks * 512 < path.stat().st_size  # still sparse after the copy
    assert len(digests) == 1
    assert build_tasks(cluster, "node-b") == build_tasks(cluster, "node-c") == 0

    # DIST-5, WIRE-16: node-a now lies about every chunk. node-c's copy is damaged, so `redo
    # --nodes node-c` refetches it; node-a is asked first (ties go to the lowest node id), fails
    # its digests, and is replaced by node-b. The copy that lands has the registered sha256.
    cluster.agents["node-a"].stop()
    cluster.start_agent("node-a", [f'image.local_roots=["{imports}"]', "transfer.test_corrupt_chunks=100000"])
    wait_for(lambda: "session " in cluster.agents["node-a"].output(), 30, "node-a back in session")
    wait_for(lambda: cluster.health().get("node-a") == "READY", 30, "node-a READY")
    damaged = cluster.root / "agents" / "node-c" / "store" / "artifacts" / art / "rootfs.ext4"
    with open(damaged, "r+b") as fh:
        fh.write(b"\xff" * 16)
    rc, redo = cluster.tcctl("template", "redo", doc["template_id"], "--nodes", "node-c", "--wait", timeout=120)
    assert rc == 0 and redo["job"]["status"] == "READY", redo
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() in digests
    log = cluster.coordinator.output()
    assert "node-a → node-c failed" in log, log[-3000:]
    assert "failed its digest: asking again" in cluster.agents["node-c"].output()


def test_coordinator_killed_mid_build_resumes_and_builds_once(cluster: Cluster, imports: Path) -> None:
    """TPL-31: SIGKILL the coordinator while the builder works; after a restart the job resumes at
    its persisted step, the re-sent BUILD task is answered from the agent's record (one build),
    the job ends READY with exactly one artifact row."""
    import os
    imports.mkdir()
    img = oci.image([layer([File(f"r{i}", os.urandom(32 << 20)) for i in range(6)])], compression="none")
    oci.write_oci_archive(imports / "big.tar", img, tag="v1")
    start(cluster, ["node-a", "node-b"], imports)
    rc, doc = cluster.tcctl("template", "create", "--image", f"oci-archive:{imports}/big.tar:v1",
                            "--builder", "node-a", "--writable-size", "0")
    assert rc == 0, doc
    job_id = doc["job"]["job_id"]

    def phase() -> str:
        rc, d = cluster.tcctl("job", "show", job_id)
        return d["job"]["phase"] if rc == 0 else ""
    wait_for(lambda: phase() in ("UNPACKING", "BUILDING_EXT4", "GENERATING_JSON") or build_tasks(cluster, "node-a"),
             60, "the build to start")
    cluster.coordinator.kill()
    cluster.start_coordinator(migrate=False)
    rc, done = cluster.tcctl("job", "watch", job_id, "--wait-timeout", "120s", timeout=150)
    assert rc == 0 and done["job"]["status"] == "READY", done
    assert done["job"]["nodes"]["ready"] == 2
    assert build_tasks(cluster, "node-a") == 1
    with sqlite3.connect(cluster.root / "agents" / "node-b" / "catalog.db") as c:
        assert c.execute("SELECT count(*) FROM entries WHERE kind='artifact'").fetchone()[0] == 1


def test_target_killed_while_distributing_then_redo_failed_only_resumes(tmp_path: Path) -> None:
    """DIST-5, TPL-14, TPL-19 to TPL-22, WIRE-17: a target dies mid-transfer → PARTIALLY_READY;
    after it returns, `redo --failed-only --wait` makes the template READY, and the target's fetch
    resumes from its partial file (fewer bytes fetched than the file holds)."""
    import os
    # One backend is enough here: the database paths are the same as in the tests above.
    # No failover grace: the coordinator does not restart here, and a grace would hold the
    # killed target's LOST back for 30 s.
    cluster = Cluster(tmp_path, f"sqlite:///{tmp_path}/c.db", coord_extra=["task.accept_timeout=2s"], grace="0s")
    try:
        imports = tmp_path / "import"
        imports.mkdir()
        img = oci.image([layer([File(f"r{i}", os.urandom(8 << 20)) for i in range(6)])], compression="none")
        oci.write_oci_archive(imports / "img.tar", img, tag="v1")
        cluster.start_coordinator()
        cluster.start_agent("node-a", [f'image.local_roots=["{imports}"]', "transfer.test_chunk_delay=100ms"])
        cluster.start_agent("node-b", [f'image.local_roots=["{imports}"]'])
        wait_for(lambda: all(cluster.health().get(n) == "READY" for n in ("node-a", "node-b")), 30, "READY")
        rc, doc = cluster.tcctl("template", "create", "--image", f"oci-archive:{imports}/img.tar:v1",
                                "--builder", "node-a", "--writable-size", "0")
        assert rc == 0, doc
        partial = cluster.root / "agents" / "node-b" / "store" / "artifacts"

        def fetching() -> bool:  # some bytes verified and recorded for resuming (WIRE-17)
            for rec in partial.glob("*.partial/.progress.json"):
                try:
                    files = json.loads(rec.read_text())["files"]
                except (OSError, ValueError, KeyError):
                    continue
                if any(f["verified"] > 0 for f in files.values()):
                    return True
            return False
        wait_for(fetching, 60, "node-b to record fetched bytes")
        cluster.agents["node-b"].kill()
        rc, done = cluster.tcctl("job", "watch", doc["job"]["job_id"], "--wait-timeout", "120s", timeout=150)
        assert rc == 0 and done["job"]["status"] == "READY", done
        rc, shown = cluster.tcctl("template", "show", doc["template_id"])
        assert shown["template"]["status"] == "PARTIALLY_READY", shown
        cluster.start_agent("node-b", [f'image.local_roots=["{imports}"]'], name="node-b-again")
        wait_for(lambda: cluster.health().get("node-b") == "READY", 30, "node-b back")
        rc, redo = cluster.tcctl("template", "redo", doc["template_id"], "--failed-only", "--wait", timeout=150)
        assert rc == 0 and redo["job"]["status"] == "READY", redo
        assert redo["job"]["redo_mode"] == "FAILED_ONLY" and redo["job"]["scope"] == ["node-b"]
        rc, shown = cluster.tcctl("template", "show", doc["template_id"])
        assert shown["template"]["status"] == "READY"
        with sqlite3.connect(cluster.root / "agents" / "node-b" / "catalog.db") as c:
            fetches = [json.loads(b) for (b,) in c.execute("SELECT body FROM entries WHERE kind='task'")]
        ok = [f["result"] for f in fetches if f.get("op") == "FETCH_ARTIFACT" and f.get("ok")]
        assert ok and ok[-1]["fetched_bytes"] < ok[-1]["size"], ok
    finally:
        cluster.stop()


@pytest.mark.parametrize("step", ["RESOLVE_IMAGE", "CLAIM_ARTIFACT", "BUILD", "REGISTER", "DISTRIBUTE"])
def test_coordinator_crash_at_each_step_boundary_finishes_once(tmp_path: Path, step: str) -> None:
    """TPL-31: the coordinator dies right after a CREATE step is persisted (test-only fault
    injection ``job.test_crash_after_step``); restarted without it, the job finishes READY with
    exactly one artifact row, one build and no stray files on any agent."""
    import os
    url = f"sqlite:///{tmp_path}/c.db"
    cluster = Cluster(tmp_path, url, coord_extra=[f"job.test_crash_after_step={step}"])
    try:
        imports = tmp_path / "import"
        ref = archive(imports)
        start(cluster, ["node-a", "node-b"], imports)
        rc, doc = cluster.tcctl("template", "create", "--image", ref, "--builder", "node-a", "--writable-size", "0")
        assert rc == 0, doc
        wait_for(lambda: not cluster.coordinator.alive(), 60, f"the crash after {step}")
        assert "test fault injection" in cluster.coordinator.output()
        cluster.coord_extra = []
        cluster.start_coordinator(migrate=False)
        rc, done = cluster.tcctl("job", "watch", doc["job"]["job_id"], "--wait-timeout", "90s", timeout=120)
        assert rc == 0 and done["job"]["status"] == "READY", (done["job"]["error"], cluster.coordinator.output()[-3000:])
        assert done["job"]["nodes"]["ready"] == 2
        with sqlite3.connect(tmp_path / "c.db") as c:
            assert c.execute("SELECT count(*) FROM artifacts").fetchone()[0] == 1
            assert c.execute("SELECT count(*) FROM placements").fetchone()[0] == 2
        assert build_tasks(cluster, "node-a") == 1
        for node in ("node-a", "node-b"):
            store = cluster.root / "agents" / node / "store"
            assert sorted(os.listdir(store / "artifacts")) == [done["job"]["artifact_id"]]
            assert os.listdir(store / "work") == []
    finally:
        cluster.stop()


def test_alias_conflict_goes_to_the_newer_job(cluster: Cluster, imports: Path) -> None:
    """TPL-16: two templates ask for one alias; the one with the newer CREATE job holds it, the
    other publishes without it. TPL-18: `alias set` moves it only with --transfer, clears with ""."""
    ref_one = archive(imports, "one.tar", b"one\n")
    ref_two = archive(imports, "two.tar", b"two\n")
    start(cluster, ["node-a"], imports)
    rc, one = cluster.tcctl("template", "create", "--image", ref_one, "--builder", "node-a", "--alias", "web",
                            "--wait", timeout=90)
    assert rc == 0 and one["job"]["status"] == "READY", one
    rc, two = cluster.tcctl("template", "create", "--image", ref_two, "--builder", "node-a", "--alias", "web",
                            "--wait", timeout=90)
    assert rc == 0 and two["job"]["status"] == "READY", two
    rc, holder = cluster.tcctl("template", "show", "web")
    assert holder["template"]["template_id"] == two["template_id"]
    rc, loser = cluster.tcctl("template", "show", one["template_id"])
    assert loser["template"]["alias"] is None and loser["template"]["status"] == "READY"

    # TPL-18: a held alias needs --transfer; the move is one transaction; "" clears.
    first = one["template_id"]
    rc, err = cluster.tcctl("template", "alias", "set", first, "web")
    assert rc == 1 and err["error"]["name"] == "DuplicateTemplate", err
    assert two["template_id"] in err["error"]["message"] and "--transfer" in err["error"]["message"]
    rc, moved = cluster.tcctl("template", "alias", "set", first, "web", "--transfer")
    assert rc == 0 and (moved["alias"], moved["released_from"]) == ("web", two["template_id"]), moved
    rc, holder = cluster.tcctl("template", "show", "web")
    assert holder["template"]["template_id"] == first
    rc, again = cluster.tcctl("template", "alias", "set", "web", "web")
    assert rc == 0 and again["changed"] is False
    rc, bad = cluster.tcctl("template", "alias", "set", first, "tpl-nope")
    assert rc == 1 and bad["error"]["name"] == "InvalidAlias", bad
    rc, snap = cluster.tcctl("template", "alias", "set", "snap-0123456789abcdef", "x")
    assert rc == 1 and snap["error"]["name"] == "AliasNotApplicableToSnapshot", snap
    rc, cleared = cluster.tcctl("template", "alias", "set", "web", "")
    assert rc == 0 and (cleared["alias"], cleared["previous"]) == (None, "web"), cleared
    rc, gone = cluster.tcctl("template", "show", "web")
    assert rc == 1 and gone["error"]["name"] == "TemplateNotFound"
    rc, noop = cluster.tcctl("template", "alias", "set", first, "")
    assert rc == 0 and noop["changed"] is False
