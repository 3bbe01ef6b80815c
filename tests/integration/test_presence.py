"""Catalog presence end to end (CAT-3, GC-10, GC-11): a copy deleted behind an agent's back is
reported by its startup reconcile, the coordinator's presence check turns the READY replica
FAILED with the reason, `template show` says why, and `redo --failed-only` repairs it."""
from __future__ import annotations

from pathlib import Path

from tests import oci
from tests.layers import Dir, File, layer
from tests.support import Cluster, wait_for


def test_a_copy_deleted_behind_the_agents_back_fails_the_replica_until_redo(tmp_path: Path) -> None:
    """CAT-3, GC-11, TPL-14, TPL-19: missing from node catalog → FAILED, PARTIALLY_READY, repaired."""
    cluster = Cluster(tmp_path, f"sqlite:///{tmp_path}/c.db", coord_extra=["reconcile.presence_grace=1s"])
    try:
        imports = tmp_path / "import"
        imports.mkdir()
        oci.write_oci_archive(imports / "img.tar", oci.image([layer([Dir("etc"), File("etc/hi", b"hi\n")])]),
                              tag="v1")
        extra = [f'image.local_roots=["{imports}"]']
        cluster.start_coordinator()
        for n in ("node-a", "node-b"):
            cluster.start_agent(n, extra)
        wait_for(lambda: all(cluster.health().get(n) == "READY" for n in ("node-a", "node-b")), 30, "READY")
        rc, doc = cluster.tcctl("template", "create", "--image", f"oci-archive:{imports}/img.tar:v1",
                                "--builder", "node-a", "--writable-size", "0", "--wait", timeout=90)
        assert rc == 0 and doc["job"]["status"] == "READY", doc
        tpl, art = doc["template_id"], doc["job"]["artifact_id"]

        cluster.agents["node-b"].stop()
        (cluster.root / "agents" / "node-b" / "store" / "artifacts" / art / "rootfs.ext4").unlink()
        cluster.start_agent("node-b", extra)

        def replica_b() -> dict:
            rc, shown = cluster.tcctl("template", "show", tpl)
            return next(r for r in shown["template"]["replicas"] if r["node_id"] == "node-b")
        wait_for(lambda: replica_b()["status"] == "FAILED", 30, "node-b's replica to turn FAILED")
        rep = replica_b()
        assert rep["last_error"] == "missing from node catalog", rep
        rc, shown = cluster.tcctl("template", "show", tpl)
        assert shown["template"]["status"] == "PARTIALLY_READY"
        assert "missing from node catalog" in shown["template"]["last_error"]
        rc, node = cluster.tcctl("node", "show", "node-b")
        assert [(r["template_id"], r["status"]) for r in node["node"]["replicas"]] == [(tpl, "FAILED")]

        rc, redo = cluster.tcctl("template", "redo", tpl, "--failed-only", "--wait", timeout=90)
        assert rc == 0 and redo["job"]["status"] == "READY", redo
        rc, shown = cluster.tcctl("template", "show", tpl)
        assert shown["template"]["status"] == "READY"
        assert [r["status"] for r in shown["template"]["replicas"]] == ["READY", "READY"]
        assert (cluster.root / "agents" / "node-b" / "store" / "artifacts" / art / "rootfs.ext4").exists()
    finally:
        cluster.stop()
