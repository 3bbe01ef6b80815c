"""Sandboxes in real microVMs, coordinator side end to end (RT-17 to RT-19, RES-1, RES-2, DIST-9,
TPL-13, TPL-26): a real coordinator and a real `qemu`-driver agent under TCG; a busybox image
whose entrypoint prints a counter to the console every 100 ms.

Skipped until the agent's QEMU runtime (``agent/runtime``) lands."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests import oci
from tests.layers import Dir, File, Symlink, layer
from tests.support import HAVE_QEMU, NEEDS_QEMU, Cluster, qemu_agent_extra, wait_for

COUNTER = "i=0; while true; do echo count $i; i=$((i+1)); sleep 0.1; done"


pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason=NEEDS_QEMU)


def busybox_archive(imports: Path) -> str:
    """A one-layer image: a static busybox with an `sh` link, running the counter."""
    imports.mkdir(exist_ok=True)
    busybox = Path(shutil.which("busybox") or "/bin/busybox").read_bytes()
    img = oci.image([layer([Dir("bin"), File("bin/busybox", busybox, mode=0o755), Symlink("bin/sh", "busybox"),
                            Symlink("bin/sleep", "busybox"), Symlink("bin/echo", "busybox"), Dir("tmp"),
                            Dir("etc"), File("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n"),
                            File("etc/group", b"root:x:0:\n")])],
                    config={"Entrypoint": ["/bin/sh", "-c", COUNTER]})
    oci.write_oci_archive(imports / "busybox.tar", img, tag="v1")
    return f"oci-archive:{imports / 'busybox.tar'}:v1"


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    # No debounced compat scan during the test: COMPAT-7's refusal, not a scan, must find the change.
    c = Cluster(root=tmp_path, db_url=f"sqlite:///{tmp_path}/coordinator.db", coord_extra=["compat.debounce=1h"])
    try:
        yield c
    finally:
        c.stop()




def test_sandbox_create_list_console_destroy(cluster: Cluster, tmp_path: Path) -> None:
    """RT-17: create from a template alias via resolve → RUNNING on the qemu node (cold boot);
    the same request id returns the same sandbox. RT-19: the record is listed with the live
    state from the node's catalog; `show --console` carries the counter output; destroy deletes
    the record, a second destroy → SandboxNotFound. TPL-26: template delete → TemplateInUse while
    the sandbox exists (even with --force), allowed after destroy. DIST-9, TPL-13, RES-1: in
    memory mode the replica gets a memory snapshot, resolve answers restore "memory" and the
    sandbox is restored from it. COMPAT-7, COMPAT-5: after the node's guest image changes, the
    agent refuses the restore, the replica turns STALE and resolve says TemplateStaleNeedsRedo."""
    imports = tmp_path / "import"
    ref = busybox_archive(imports)
    cluster.start_coordinator()
    cluster.start_agent("node-q", [f'image.local_roots=["{imports}"]', "task.progress_interval=0.1",
                                   *qemu_agent_extra()])
    wait_for(lambda: cluster.health().get("node-q") == "READY", 60, "node-q READY")
    assert cluster.nodes()["node-q"]["capabilities"].get("sandbox") is True
    doc = cluster.ok("template", "create", "--image", ref, "--builder", "node-q", "--alias", "counter",
             "--memory-mib", "256", "--wait", timeout=180)
    assert doc["job"]["status"] == "READY", doc
    assert cluster.ok("resolve", "counter")["node"] == "node-q"

    created = cluster.ok("sandbox", "create", "--template", "counter", "--name", "demo", "--request-id", "req-1",
                 timeout=180)["sandbox"]
    sid = created["sandbox_id"]
    assert (created["state"], created["node_id"], created["restore"], created["name"]) == \
        ("RUNNING", "node-q", "cold", "demo"), created
    again = cluster.ok("sandbox", "create", "--template", "counter", "--name", "demo", "--request-id", "req-1",
               timeout=60)["sandbox"]
    assert again["sandbox_id"] == sid

    def listed() -> dict[str, Any] | None:
        rows = cluster.ok("sandbox", "list")["sandboxes"]
        return next((r for r in rows if r["sandbox_id"] == sid and r["in_catalog"]), None)
    row = wait_for(listed, 30, "the sandbox in the node's catalog")
    assert row["state"] == "RUNNING" and row["recorded"] and len(cluster.ok("sandbox", "list")["sandboxes"]) == 1
    # WIRE-8: heartbeats count the node's RUNNING sandboxes (RT-18 capacity reads it).
    wait_for(lambda: cluster.nodes()["node-q"]["sandboxes"] == 1, 20, "node list to count the sandbox")

    def console() -> dict[str, Any] | None:
        got = cluster.ok("sandbox", "show", sid, "--console", timeout=30)["sandbox"]
        return got if "count 3" in got.get("console", "") else None
    shown = wait_for(console, 60, "the counter on the console")
    assert shown["runtime_config"]["entrypoint"] == ["/bin/sh", "-c", COUNTER]

    e = cluster.err("template", "delete", "counter", "--force")
    assert e["name"] == "TemplateInUse" and e["details"]["sandboxes"] == [sid], e

    assert cluster.ok("sandbox", "destroy", sid, timeout=60)["destroyed"] is True
    wait_for(lambda: cluster.ok("sandbox", "list")["sandboxes"] == [], 30, "record and catalog entry gone")
    wait_for(lambda: cluster.nodes()["node-q"]["sandboxes"] == 0, 20, "node list to count none")
    assert cluster.err("sandbox", "destroy", sid)["name"] == "SandboxNotFound"
    assert cluster.ok("template", "delete", "counter", "--wait", timeout=60)["job"]["status"] == "READY"

    # Memory mode (DIST-9): the replica carries a memory snapshot and sandboxes restore from it.
    doc = cluster.ok("template", "create", "--image", ref, "--builder", "node-q", "--alias", "warm",
             "--memory-mib", "256", "--snapshot-mode", "memory", "--wait", timeout=300)
    assert doc["job"]["status"] == "READY", doc
    reps = cluster.ok("template", "show", "warm")["template"]["replicas"]
    assert [(r["node_id"], r["status"], r["has_memory_snapshot"]) for r in reps] == [("node-q", "READY", True)]
    assert cluster.ok("resolve", "warm")["restore"] == "memory"
    warm = cluster.ok("sandbox", "create", "--template", "warm", timeout=180)["sandbox"]
    assert (warm["state"], warm["restore"]) == ("RUNNING", "memory"), json.dumps(warm)
    cluster.ok("sandbox", "destroy", warm["sandbox_id"], timeout=60)

    # COMPAT-7: node-q comes back with another guest image. Before any scan looks, a create
    # meets the agent's ReplicaIncompatible: the replica turns STALE, there is no other node to
    # retry on, and resolve then answers TemplateStaleNeedsRedo.
    cluster.agents["node-q"].stop()
    cluster.start_agent("node-q", [f'image.local_roots=["{imports}"]', "task.progress_interval=0.1",
                                   *qemu_agent_extra(), "agent.versions.guest_image=another-guest-1"])
    wait_for(lambda: cluster.health().get("node-q") == "READY", 60, "node-q READY again")
    assert cluster.ok("resolve", "warm")["node"] == "node-q"  # not STALE yet: no scan ran
    e = cluster.err("sandbox", "create", "--template", "warm")
    assert e["name"] in ("TemplateStaleNeedsRedo", "TemplateHasNoReadyReplica"), e
    assert "ReplicaIncompatible" in cluster.agents["node-q"].output()
    reps = cluster.ok("template", "show", "warm")["template"]["replicas"]
    assert [(r["node_id"], r["compat"]) for r in reps] == [("node-q", "STALE")]
    e = cluster.err("resolve", "warm")
    assert e["name"] == "TemplateStaleNeedsRedo" and e["details"]["nodes"] == ["node-q"], e
