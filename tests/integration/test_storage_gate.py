"""The storage gate end to end (SNAP-15, SNAP-16, SNAP-22): a real coordinator, two real
agents, node-b's store on a fixed-size tmpfs filled with a plain file."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests import oci
from tests.layers import Dir, File, layer
from tests.support import Cluster, wait_for

STORE_MIB = 256  # room for a minimal ext4 artifact (64 MiB, sparse) at 60 % use


@pytest.fixture
def store_b(tmp_path: Path) -> Iterator[Path]:
    """A fixed-size tmpfs for node-b's agent.state_dir; unmounted after the cluster has stopped
    (``cluster`` below depends on this fixture, so it is torn down first)."""
    mnt = tmp_path / "store-b"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STORE_MIB}m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def cluster(store_b: Path, sqlite_cluster: Cluster) -> Cluster:
    return sqlite_cluster


def archive(imports: Path, name: str) -> str:
    """A tiny image; each name gets its own content, so its own fingerprint (no adoption)."""
    imports.mkdir(exist_ok=True)
    img = oci.image([layer([Dir("etc"), File("etc/name", name.encode())])])
    oci.write_oci_archive(imports / f"{name}.tar", img, tag="v1")
    return f"oci-archive:{imports / name}.tar:v1"


def fill(store: Path, percent: float) -> None:
    """Grow ``store/filler`` until the filesystem's usage is ``percent`` %."""
    u = shutil.disk_usage(store)
    need = int(u.total * percent / 100) - u.used
    assert need > 0, (u, percent)
    chunk = b"\xa5" * (1 << 20)
    with open(store / "filler", "ab") as fh:
        while need > 0:
            fh.write(chunk[:need])
            need -= len(chunk)
        fh.flush()
        os.fsync(fh.fileno())


def tasks_of(store: Path, op: str) -> int:
    """Task records of ``op`` in the agent's catalog: the agent saw the task at all."""
    with sqlite3.connect(store / "catalog.db") as c:
        return sum(1 for (body,) in c.execute("SELECT body FROM entries WHERE kind='task'")
                   if json.loads(body).get("op") == op)


def status(cluster: Cluster, *flags: str) -> dict[str, dict[str, Any]]:
    rc, doc = cluster.tcctl("storage", "status", *flags, timeout=20)
    assert rc == 0, doc
    assert [n["node_id"] for n in doc["nodes"]] == sorted(n["node_id"] for n in doc["nodes"])
    return {n["node_id"]: n for n in doc["nodes"]}


def create(cluster: Cluster, ref: str, builder: str, nodes: str) -> dict[str, Any]:
    rc, doc = cluster.tcctl("template", "create", "--image", ref, "--builder", builder, "--nodes", nodes,
                            "--writable-size", "0", "--wait", timeout=90)
    assert rc == 0, doc
    return doc


def test_full_store_refuses_builds_and_transfers(cluster: Cluster, store_b: Path, tmp_path: Path) -> None:
    """SNAP-15, SNAP-16, SNAP-22, DIST-2, TPL-14, TPL-19 to TPL-22, NODE-5.

    1. node-b's own gate (agent storage.reject = 50 %, the coordinator's still 85 %): at 60 %
       the coordinator sees healthy, so it is node-b itself that refuses a BUILD and the
       FETCHes → the job fails NodeStorageBlocked; a create over both nodes ends PARTIALLY_READY.
    2. The coordinator's gate at 90 %: `storage status [--refresh]` shows reject; a create with
       node-b as builder fails NodeStorageBlocked before any task reaches node-b; node-b is no
       REDO target (NODE-5).
    3. The filler gone: `storage status --refresh` → healthy; `redo --failed-only` → READY."""
    imports = tmp_path / "import"
    cluster.coord_extra.append("dist.space_reserve=0")  # a small store never has 1 GiB to spare
    cluster.start_coordinator()
    common = [f'image.local_roots=["{imports}"]', "task.progress_interval=0.1"]
    cluster.start_agent("node-a", common)
    cluster.start_agent("node-b", [*common, f"agent.state_dir={store_b}", "storage.reject=50%"])
    wait_for(lambda: cluster.health() == {"node-a": "READY", "node-b": "READY"}, 30, "both nodes READY")
    before = status(cluster)
    assert {n: (r["mode"], r["address"], r["last_error"]) for n, r in before.items()} == {
        "node-a": ("healthy", "127.0.0.1", ""), "node-b": ("healthy", "127.0.0.1", "")}
    assert before["node-b"]["usage"] < 50 and before["node-b"]["total"] == STORE_MIB << 20
    assert before["node-b"]["last_update"]

    # 1. The agent's own gate.
    fill(store_b, 60)
    wait_for(lambda: status(cluster)["node-b"]["usage"] >= 55, 10, "node-b's heartbeat figures at 60 %")
    assert status(cluster)["node-b"]["mode"] == "healthy"  # the coordinator would let it write
    doc = create(cluster, archive(imports, "one"), "node-b", "node-a")
    err = doc["job"]["error"]
    assert doc["job"]["status"] == "FAILED" and err["name"] == "NodeStorageBlocked", doc
    assert err["message"].startswith("builds are blocked on node node-b (usage=6"), err
    assert tasks_of(store_b, "BUILD_ARTIFACT") == 1  # node-b saw the task and refused it itself
    doc = create(cluster, archive(imports, "two"), "node-a", "node-a,node-b")
    assert doc["job"]["status"] == "READY", doc
    tpl = doc["template_id"]
    rc, shown = cluster.tcctl("template", "show", tpl)
    t = shown["template"]
    reps = {r["node_id"]: r for r in t["replicas"]}
    assert t["status"] == "PARTIALLY_READY" and reps["node-a"]["status"] == "READY", t
    assert reps["node-b"]["status"] == "FAILED" and reps["node-b"]["last_error_phase"] == "DISTRIBUTING"
    assert reps["node-b"]["last_error"].startswith("incoming transfers are blocked on node node-b (usage="), reps
    assert tasks_of(store_b, "FETCH_ARTIFACT") >= 1

    # 2. The coordinator's gate.
    fill(store_b, 90)
    wait_for(lambda: status(cluster)["node-b"]["mode"] == "reject", 10, "node-b in reject mode")
    asked = int(time.time() * 1000)
    fresh = status(cluster, "--refresh")
    assert {n: (r["mode"], r["last_error"]) for n, r in fresh.items()} == {
        "node-a": ("healthy", ""), "node-b": ("reject", "")}
    assert fresh["node-b"]["usage"] >= 85 and all(r["last_update"] >= asked - 1000 for r in fresh.values())
    assert tasks_of(store_b, "PROBE_STORAGE") >= 1
    doc = create(cluster, archive(imports, "three"), "node-b", "node-a")
    err = doc["job"]["error"]
    assert doc["job"]["status"] == "FAILED" and err["name"] == "NodeStorageBlocked", doc
    assert err["message"].startswith("builds are blocked on node node-b (usage=9"), err
    assert tasks_of(store_b, "BUILD_ARTIFACT") == 1  # refused by the coordinator: no new task
    rc, redo = cluster.tcctl("template", "redo", tpl, "--nodes", "node-b")
    assert rc == 1 and redo["error"]["name"] == "NodeNotEligible", redo
    assert "storage reject" in redo["error"]["details"]["nodes"][0]["reason"]

    # 3. Room again.
    (store_b / "filler").unlink()
    after = status(cluster, "--refresh")
    assert after["node-b"]["mode"] == "healthy" and after["node-b"]["usage"] < 50
    rc, redo = cluster.tcctl("template", "redo", tpl, "--failed-only", "--wait", timeout=90)
    assert rc == 0 and redo["job"]["status"] == "READY", redo
    rc, shown = cluster.tcctl("template", "show", tpl)
    assert shown["template"]["status"] == "READY"
    assert [(r["node_id"], r["status"]) for r in shown["template"]["replicas"]] == [
        ("node-a", "READY"), ("node-b", "READY")]
    # The human table renders too.
    r = subprocess.run([*cluster.coordinator_argv()[:1], "-m", "coordinator.cli.main", "storage", "status",
                        "--endpoint", cluster.admin], capture_output=True, text=True, env=cluster.env(), timeout=30)
    assert r.returncode == 0 and "node-b" in r.stdout and "MODE" in r.stdout, r.stdout + r.stderr
