"""Catalog sync end to end (CAT-3, CAT-4, CAT-5, NODE-3, WIRE-6): a real coordinator and a
real agent on SQLite. One cluster goes through task traffic, an unchanged restart, and a
restart with a deleted file and a stray file while the coordinator is down."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from protocol.canonical import catalog_digest
from tests.integration.test_template_create import archive, start
from tests.support import Cluster, wait_for

NODE = "node-a"
REPLACED = f"node {NODE}: catalog mirror replaced"  # the coordinator's line per applied snapshot
SENT = "catalog snapshot sent"                        # the agent's line per snapshot sent


def agent_identity(cluster: Cluster) -> tuple[str, int, str]:
    """(epoch, seq, digest) read from the agent's catalog file (CAT-2: task records excluded)."""
    db = cluster.root / "agents" / NODE / "catalog.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        meta = dict(c.execute("SELECT key, value FROM meta"))
        entries = [{"kind": k, "id": i, "body": json.loads(b)}
                   for k, i, b in c.execute("SELECT kind, id, body FROM entries WHERE kind != 'task'")]
    return meta["epoch"], int(meta["seq"]), catalog_digest(entries)


def mirror(cluster: Cluster) -> dict[str, Any]:
    rc, doc = cluster.tcctl("node", "show", NODE)
    assert rc == 0, doc
    return doc["node"]


def in_sync(cluster: Cluster) -> bool:
    n = mirror(cluster)
    cat = n["catalog"]
    return n["health"] == "READY" and cat["complete"] and \
        (cat["epoch"], cat["seq"], cat["digest"]) == agent_identity(cluster)


def beats_pass(cluster: Cluster, count: int) -> None:
    """Wait for ``count`` more heartbeats: long enough for a mismatch to have asked for a snapshot."""
    start_seq = mirror(cluster)["session"]["heartbeat_seq"]
    wait_for(lambda: mirror(cluster)["session"]["heartbeat_seq"] >= start_seq + count, 20, f"{count} heartbeats")


def mirrored_entries(cluster: Cluster, kind: str) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(cluster.root / "coordinator.db") as c:
        return {i: json.loads(b) for i, b in c.execute(
            "SELECT entry_id, body FROM node_catalog_entries WHERE node_id=? AND kind=?", (NODE, kind))}


def test_deltas_follow_task_traffic_restarts_need_no_snapshot_and_reconcile_converges(
        sqlite_cluster: Cluster, tmp_path: Path) -> None:
    """CAT-4: a template build's task records and artifact/layer entries reach the mirror by
    deltas alone (digest equal, one snapshot: the new node's). CAT-5, NODE-3: an agent
    restarted with nothing changed sends no snapshot and is READY. CAT-3, WIRE-6: with the
    coordinator down, the agent restarts with an artifact file deleted and a stray file in
    store/artifacts: the entry is reported missing, the stray moves to quarantine/ (same
    bytes) as an orphan entry, and once the coordinator is back the mirror converges with no
    manual step and holds the orphans."""
    cluster = sqlite_cluster
    imports = tmp_path / "import"
    ref = archive(imports)
    start(cluster, [NODE], imports)
    agent_log = cluster.agents[NODE]

    # (b) task traffic: deltas only.
    rc, doc = cluster.tcctl("template", "create", "--image", ref, "--builder", NODE, "--writable-size", "0",
                            "--wait", timeout=90)
    assert rc == 0 and doc["job"]["status"] == "READY", doc
    artifact_id = doc["job"]["artifact_id"]
    wait_for(lambda: in_sync(cluster), 20, "the mirror to equal the agent's catalog")
    beats_pass(cluster, 5)
    assert in_sync(cluster)
    assert agent_identity(cluster)[1] > 3  # task records and entries moved seq well past the snapshot
    assert agent_log.output().count(SENT) == 1, agent_log.output()[-3000:]
    assert cluster.coordinator.output().count(REPLACED) == 1
    assert artifact_id in mirrored_entries(cluster, "artifact")

    # (a) restart with nothing changed: READY at once, no snapshot.
    assert agent_log.stop() == 0
    again = cluster.start_agent(NODE, [f'image.local_roots=["{imports}"]'], name=f"{NODE}-again")
    wait_for(lambda: "HELLO sent" in again.output() and in_sync(cluster), 20, "the unchanged agent back in sync")
    beats_pass(cluster, 5)
    assert again.output().count(SENT) == 0, again.output()[-3000:]
    assert cluster.coordinator.output().count(REPLACED) == 1

    # (c) + (d): coordinator down; the agent restarts with a file deleted and a stray file.
    cluster.coordinator.kill()
    assert again.stop() == 0
    store = cluster.root / "agents" / NODE / "store" / "artifacts"
    (store / artifact_id / "config.json").unlink()
    stray = b"not ours\n" * 100
    (store / "stray.bin").write_bytes(stray)
    third = cluster.start_agent(NODE, [f'image.local_roots=["{imports}"]'], name=f"{NODE}-third")
    wait_for(lambda: "blob endpoint bound" in third.output() or not third.alive(), 20, "the agent past its reconcile")
    out = third.output()
    assert f"artifact {artifact_id} removed from the catalog: config.json is missing" in out, out[-3000:]
    assert "reconcile: 1 missing, 2 orphans" in out
    state = cluster.root / "agents" / NODE
    assert (state / "quarantine/store/artifacts/stray.bin").read_bytes() == stray
    assert (state / "quarantine/store/artifacts" / artifact_id / "rootfs.ext4").is_file()
    assert not (store / "stray.bin").exists()
    cluster.start_coordinator(migrate=False)
    wait_for(lambda: in_sync(cluster), 30, "the mirror to converge after the coordinator restart")
    orphans = mirrored_entries(cluster, "orphan")
    assert orphans["store/artifacts/stray.bin"] == {
        "path": "quarantine/store/artifacts/stray.bin", "original": "store/artifacts/stray.bin",
        "size": len(stray), "found_ms": orphans["store/artifacts/stray.bin"]["found_ms"]}
    assert f"store/artifacts/{artifact_id}" in orphans
    assert artifact_id not in mirrored_entries(cluster, "artifact")
    # CAT-6: `artifact list --orphans` lists them from the mirror; the files are still on disk.
    rc, listed = cluster.tcctl("artifact", "list", "--orphans")
    assert rc == 0, listed
    shown = {o["path"]: o for o in listed["orphans"]}
    assert shown["quarantine/store/artifacts/stray.bin"]["node_id"] == NODE
    assert shown["quarantine/store/artifacts/stray.bin"]["size"] == len(stray)
    assert all((state / p).exists() for p in shown)
    rc, node = cluster.tcctl("node", "show", NODE)
    assert {o["path"] for o in node["node"]["orphans"]} == set(shown)
