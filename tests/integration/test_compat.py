"""Compat end to end (COMPAT-2 to COMPAT-8, DIST-7, NODE-11, RES-2, RES-3, TPL-20): a real
coordinator (compat.debounce=0.5s) and two real agents whose versions come from
``agent.versions.*``; one tiny image from a local oci-archive, two templates of it."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_template_create import archive
from tests.support import HAVE_QEMU, NEEDS_QEMU, Cluster, qemu_agent_extra, wait_for

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason=NEEDS_QEMU)
DEBOUNCE = 0.5
G1, G2 = "6.1.0+111111111111", "6.1.0+222222222222"


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    c = Cluster(root=tmp_path, db_url=f"sqlite:///{tmp_path}/coordinator.db",
                coord_extra=[f"compat.debounce={int(DEBOUNCE * 1000)}ms"])
    try:
        yield c
    finally:
        c.stop()


def agent(cluster: Cluster, node: str, imports: Path, *versions: str) -> None:
    # node-a can host sandboxes (resolve needs one, RES-2); node-b is build-only (driver none),
    # which also leaves its hypervisor version empty.
    runtime = qemu_agent_extra() if node == "node-a" else []
    cluster.start_agent(node, [f'image.local_roots=["{imports}"]', "task.progress_interval=0.1", *runtime,
                               *(f"agent.versions.{v}" for v in versions)])


def restart(cluster: Cluster, node: str, imports: Path, *versions: str) -> None:
    cluster.agents[node].stop()
    agent(cluster, node, imports, *versions)



def replicas(cluster: Cluster) -> dict[tuple[str, str], tuple[str, int, dict[str, Any]]]:
    """(alias, node) → (compat, compat_checked_ms, pins), read from the coordinator's database."""
    import json
    with sqlite3.connect(cluster.root / "coordinator.db") as c:
        rows = c.execute("SELECT t.alias, r.node_id, r.compat, r.compat_checked_ms, r.pins FROM replicas r "
                         "JOIN templates t ON t.id = r.template_id WHERE r.status = 'READY'").fetchall()
    return {(a, n): (comp, ms or 0, json.loads(pins)) for a, n, comp, ms, pins in rows}


def compat(cluster: Cluster) -> dict[tuple[str, str], str]:
    return {k: v[0] for k, v in replicas(cluster).items()}


def reported(cluster: Cluster, node: str) -> dict[str, str]:
    """The versions the coordinator recorded for a node (written when their digest changes, NODE-9)."""
    with sqlite3.connect(cluster.root / "coordinator.db") as c:
        return dict(c.execute("SELECT component, version FROM node_versions WHERE node_id = ?", (node,)).fetchall())


def test_version_changes_stale_matrix_resolve_redo_and_adopt(cluster: Cluster, tmp_path: Path) -> None:
    """DIST-7: compat evaluated at READY (an empty hypervisor → UNKNOWN). COMPAT-4: restarting
    agents with a new guest image → their READY STRICT and GUEST_ONLY replicas turn STALE within
    one heartbeat interval plus the debounce of the new session; COMPAT-2: GUEST_ONLY ignores an
    agent and hypervisor change. COMPAT-6: the matrix with bound/current versions and the summary.
    COMPAT-5, RES-2, RES-3: resolve answers TemplateStaleNeedsRedo listing the node when only STALE
    replicas are left on usable nodes, and the node again after the redo. COMPAT-8:
    adopt-baseline re-pins the UNKNOWN replica (count 1); rescan reports per node. TPL-20: redo --failed-only picks the STALE replica and brings OK back."""
    imports = tmp_path / "import"
    ref = archive(imports)
    cluster.start_coordinator()
    agent(cluster, "node-a", imports, f"guest_image={G1}")
    agent(cluster, "node-b", imports, f"guest_image={G1}", "hypervisor=")
    wait_for(lambda: cluster.health() == {"node-a": "READY", "node-b": "READY"}, 30, "both nodes READY")
    for alias, policy in (("strict", "STRICT"), ("guest", "GUEST_ONLY")):
        doc = cluster.ok("template", "create", "--image", ref, "--builder", "node-a", "--alias", alias,
                 "--compat-policy", policy, "--wait", timeout=90)
        assert doc["job"]["status"] == "READY", doc
    # DIST-7: evaluated at once; node-b reports no hypervisor, which only STRICT compares.
    assert compat(cluster) == {("strict", "node-a"): "OK", ("strict", "node-b"): "UNKNOWN",
                               ("guest", "node-a"): "OK", ("guest", "node-b"): "OK"}

    # node-a: a new guest image; node-b: a new agent and a hypervisor version, same guest image.
    restarted_ms = time.time() * 1000
    restart(cluster, "node-a", imports, f"guest_image={G2}")
    restart(cluster, "node-b", imports, f"guest_image={G1}", "agent=9.9.9", "hypervisor=kvm-1")
    wait_for(lambda: compat(cluster)[("strict", "node-a")] == compat(cluster)[("guest", "node-a")] == "STALE",
             30, "node-a's replicas STALE")
    started = cluster.ok("node", "show", "node-a")["node"]["session"]["started"]
    assert started >= restarted_ms
    h = 0.2  # the Cluster's heartbeat.interval
    for alias in ("strict", "guest"):
        checked = replicas(cluster)[(alias, "node-a")][1]
        assert 0 <= checked - started <= (h + DEBOUNCE + 0.5) * 1000, (alias, checked, started)
    wait_for(lambda: reported(cluster, "node-b").get("agent") == "9.9.9", 30, "node-b's new versions")
    wait_for(lambda: cluster.health() == {"node-a": "READY", "node-b": "READY"}, 30, "both nodes READY again")
    # node-b was scanned too (now, explicitly): GUEST_ONLY stays OK; STRICT stays UNKNOWN (its pin is empty).
    scanned = cluster.ok("compat", "rescan", "node-b")["nodes"]
    assert [(s["node_id"], s["scanned"], s["changes"], s["error"]) for s in scanned] == [("node-b", 2, [], None)]
    assert compat(cluster) == {("strict", "node-a"): "STALE", ("strict", "node-b"): "UNKNOWN",
                               ("guest", "node-a"): "STALE", ("guest", "node-b"): "OK"}

    m = cluster.ok("compat", "matrix")
    assert m["nodes"] == ["node-a", "node-b"]
    assert m["summary"] == {"stale_templates": 2, "stale_replicas": 2, "affected_nodes": 1,
                            "missing_replicas": 0, "unknown_replicas": 1}
    rows = {r["alias"]: r for r in m["templates"]}
    assert rows["strict"]["overall"] == "STALE" and rows["guest"]["policy"] == "GUEST_ONLY"
    cell = {c["node_id"]: c for c in rows["strict"]["nodes"]}
    assert (cell["node-a"]["compat"], cell["node-a"]["bound"]["guest_image"],
            cell["node-a"]["current"]["guest_image"]) == ("STALE", G1, G2)
    gb = {c["node_id"]: c for c in rows["guest"]["nodes"]}["node-b"]
    assert gb["compat"] == "OK" and gb["bound"]["agent"] != gb["current"]["agent"] == "9.9.9"

    # Resolve: node-b has no sandbox runtime, so the only usable replica is node-a's STALE one
    # (the UNKNOWN-over-STALE ranking is covered by tests/unit/test_resolve_index.py).
    rc, err = cluster.tcctl("resolve", "strict", "--node", "node-a")
    assert rc == 1 and err["error"]["name"] == "TemplateStaleNeedsRedo", err
    assert err["error"]["details"]["nodes"] == ["node-a"]

    # adopt-baseline: node-b now reports every version STRICT compares.
    adopted = cluster.ok("compat", "adopt-baseline", "strict")
    assert (adopted["adopted"], adopted["nodes"]) == (1, ["node-b"])
    comp, _, pins = replicas(cluster)[("strict", "node-b")]
    assert comp == "OK" and (pins["hypervisor"], pins["agent"]) == ("kvm-1", "9.9.9")

    redo = cluster.ok("template", "redo", "strict", "--failed-only", "--wait", timeout=90)
    assert redo["job"]["status"] == "READY" and redo["job"]["nodes"]["expected"] == 1, redo
    comp, _, pins = replicas(cluster)[("strict", "node-a")]
    assert comp == "OK" and pins["guest_image"] == G2
    assert cluster.ok("resolve", "strict")["node"] == "node-a"
    only = cluster.ok("compat", "matrix", "--template", "strict")
    assert [r["alias"] for r in only["templates"]] == ["strict"] and only["templates"][0]["overall"] == "OK"
