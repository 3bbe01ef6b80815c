"""`tcctl template delete` (TPL-26 to TPL-28, GC-1 to GC-5) with a real coordinator and agents."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import oci
from tests.layers import File, layer
from tests.support import Cluster, wait_for


@pytest.fixture
def cluster(sqlite_cluster: Cluster) -> Cluster:
    return sqlite_cluster  # one backend: see the sqlite_cluster fixture


NODES = ["node-a", "node-b"]


def start(cluster: Cluster, imports: Path, *extra: str) -> None:
    cluster.start_coordinator()
    for n in NODES:
        cluster.start_agent(n, [f'image.local_roots=["{imports}"]', "task.progress_interval=0.1", *extra])
    wait_for(lambda: all(cluster.health().get(n) == "READY" for n in NODES), 30, "nodes READY")


def image(imports: Path, name: str, size: int = 1 << 20) -> str:
    imports.mkdir(exist_ok=True)
    oci.write_oci_archive(imports / name, oci.image([layer([File("data", os.urandom(size))])], compression="none"),
                          tag="v1")
    return f"oci-archive:{imports / name}:v1"


def create(cluster: Cluster, ref: str, *extra: str) -> dict:
    rc, doc = cluster.tcctl("template", "create", "--image", ref, "--builder", "node-a", "--writable-size", "0",
                            *extra, timeout=120)
    assert rc == 0, doc
    return doc


def copies(cluster: Cluster, art: str) -> list[str]:
    return [n for n in NODES if (cluster.root / "agents" / n / "store" / "artifacts" / art).exists()]


def test_delete_removes_rows_and_last_owner_copies_but_keeps_shared_artifacts(cluster: Cluster, tmp_path: Path) -> None:
    """TPL-27, GC-3 to GC-5: the last template using an artifact takes its copies with it; an
    artifact another template still uses stays."""
    imports = tmp_path / "import"
    ref = image(imports, "a.tar")
    start(cluster, imports)
    one = create(cluster, ref, "--alias", "one", "--wait")
    two = create(cluster, ref, "--wait")
    art = one["job"]["artifact_id"]
    assert two["job"]["artifact_id"] == art and copies(cluster, art) == NODES
    rc, doc = cluster.tcctl("template", "delete", "one", "--wait", timeout=90)
    assert rc == 0 and doc["job"]["status"] == "READY", doc
    rc, gone = cluster.tcctl("template", "show", one["template_id"])
    assert rc == 1 and gone["error"]["name"] == "TemplateNotFound"
    assert copies(cluster, art) == NODES  # still used by the second template
    rc, doc = cluster.tcctl("template", "delete", two["template_id"], "--wait", timeout=90)
    assert rc == 0 and doc["job"]["status"] == "READY", doc
    wait_for(lambda: copies(cluster, art) == [], 10, "the copies to go")
    rc, listed = cluster.tcctl("template", "list")
    assert listed["templates"] == []


def test_delete_is_refused_while_a_build_runs_and_force_cancels_it(cluster: Cluster, tmp_path: Path) -> None:
    """TPL-26, TPL-28: a running CREATE blocks deletion; --force ends it (JobCancelled) first."""
    imports = tmp_path / "import"
    ref = image(imports, "big.tar", 64 << 20)
    start(cluster, imports, "transfer.test_chunk_delay=300ms")  # a copy that takes seconds: still running
    doc = create(cluster, ref)
    rc, refused = cluster.tcctl("template", "delete", doc["template_id"])
    assert rc == 1 and refused["error"]["name"] == "TemplateAttemptInProgress"
    assert refused["error"]["message"] == "deletion is blocked while a build job is still active"
    rc, forced = cluster.tcctl("template", "delete", doc["template_id"], "--force", "--wait", timeout=120)
    assert rc == 0 and forced["job"]["status"] == "READY", forced
    rc, create_job = cluster.tcctl("job", "show", doc["job"]["job_id"])
    assert create_job["job"]["status"] == "FAILED" and create_job["job"]["error"]["name"] == "JobCancelled"


def test_delete_with_a_node_down_stays_deleting_and_a_second_delete_completes(cluster: Cluster,
                                                                              tmp_path: Path) -> None:
    """TPL-27: an unreachable node → the job FAILED naming it, the template DELETING; after the
    node returns a new delete finishes."""
    imports = tmp_path / "import"
    ref = image(imports, "a.tar")
    cluster.coord_extra.append("task.accept_timeout=2s")  # a silent node is given up on sooner
    start(cluster, imports)
    doc = create(cluster, ref, "--wait")
    tpl = doc["template_id"]
    cluster.agents["node-b"].stop()
    wait_for(lambda: cluster.health().get("node-b") in ("SUSPECT", "LOST"), 30, "node-b silent")
    rc, first = cluster.tcctl("template", "delete", tpl, "--wait", timeout=120)
    assert rc == 0 and first["job"]["status"] == "FAILED", first
    assert "node-b" in first["job"]["error"]["message"]
    rc, shown = cluster.tcctl("template", "show", tpl)
    assert shown["template"]["status"] == "DELETING"
    cluster.start_agent("node-b", [f'image.local_roots=["{imports}"]'], name="node-b-again")
    wait_for(lambda: cluster.health().get("node-b") == "READY", 30, "node-b back")
    rc, second = cluster.tcctl("template", "delete", tpl, "--wait", timeout=120)
    assert rc == 0 and second["job"]["status"] == "READY", second
