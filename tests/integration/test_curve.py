"""CURVE and key acceptance on the agent endpoint (SEC-1..SEC-4, NODE-1).

Real coordinator and agent processes with security.curve = true on loopback.
"""
from __future__ import annotations

import os
import shutil
import stat

import pytest

from protocol import keys as curve
from tests.support import Cluster, wait_for


@pytest.fixture
def cluster(sqlite_cluster: Cluster) -> Cluster:
    """SQLite only: the key store these tests drive is tested on both backends in
    test_key_registry.py, and each run here takes seconds (the suite's time budget)."""
    return sqlite_cluster


def keys_by_node(c: Cluster) -> dict[str, dict]:
    rc, doc = c.tcctl("node", "keys")
    assert rc == 0, doc
    return {k["node_id"]: k for k in doc["keys"]}


def test_pending_key_accept_then_ready_and_second_key_unauthorized(cluster: Cluster) -> None:
    """SEC-3: an unknown key is pending and its node never READY; `node accept` → READY; SEC-4:
    a second key claiming an accepted node id gets Unauthorized and is never served."""
    cluster.curve = True
    cluster.grace = "0s"
    cluster.start_coordinator()
    secret = cluster.root / "coord" / "keys" / "coordinator.key_secret"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600  # SEC-2
    a = cluster.start_agent("k1")
    wait_for(lambda: keys_by_node(cluster).get("k1", {}).get("state") == "pending", 20, "k1 key pending")
    k = keys_by_node(cluster)["k1"]
    assert k["fingerprint"] == curve.fingerprint(cluster.agent_key("k1"))
    assert "k1" not in cluster.nodes(), "a pending key's node must not exist, let alone be READY"
    wait_for(lambda: "awaits `tcctl node accept k1`" in a.output(), 20, "the agent to log its pending key")
    assert k["fingerprint"] in a.output()

    rc, doc = cluster.tcctl("node", "accept", "k1")
    assert rc == 0 and doc["key"]["state"] == "accepted", doc
    wait_for(lambda: cluster.health().get("k1") == "READY", 30, "k1 READY after accept")

    # An impostor: another agent (its own key) claiming node id k1, while k1 runs: the route
    # stays k1's (no handover), so the impostor gets nowhere and k1 stays READY.
    imp = cluster.start_agent("k1", extra=[f"agent.state_dir={cluster.root}/agents/impostor"], name="impostor")
    wait_for(lambda: imp.output().count("HELLO sent") >= 2 or "no connection" in imp.output(), 30,
             "the impostor to try twice")
    assert cluster.health()["k1"] == "READY"
    # With k1 gone the impostor reaches HELLO and is refused: the id is bound to k1's key (NODE-1).
    a.kill()
    wait_for(lambda: "bound to another key" in imp.output(), 40, "the impostor to be refused")
    imp.stop()
    rc, doc = cluster.tcctl("node", "keys", "--state", "pending")
    assert [x["node_id"] for x in doc["keys"]] == [], "the impostor's key is not pending: k1 is bound"


def test_rejected_key_is_never_served(cluster: Cluster) -> None:
    """SEC-4: `node reject` makes the key fail the CURVE handshake; the agent says so in its log."""
    cluster.curve = True
    cluster.grace = "0s"
    cluster.start_coordinator()
    a = cluster.start_agent("r1")
    wait_for(lambda: keys_by_node(cluster).get("r1", {}).get("state") == "pending", 20, "r1 key pending")
    rc, doc = cluster.tcctl("node", "reject", "r1")
    assert rc == 0 and doc["key"]["state"] == "rejected"
    wait_for(lambda: "refused this node's key" in a.output(), 40, "the agent to log the refused handshake")
    assert "r1" not in cluster.nodes()


def test_wrong_coordinator_key_does_not_connect_and_says_why(cluster: Cluster) -> None:
    """SEC-2: an agent pinned to the wrong coordinator key never connects and logs why."""
    cluster.curve = True
    cluster.start_coordinator()
    wrong = curve.load_or_create(cluster.root / "other", "coordinator").public
    a = cluster.start_agent("w1", extra=[f"agent.coordinator_keys={wrong}"])
    wait_for(lambda: "does not match the coordinator's public key" in a.output(), 40,
             "the agent to explain the failed handshake")
    assert keys_by_node(cluster) == {}


def test_preaccepted_keys_dir(cluster: Cluster) -> None:
    """SEC-4: a pre-accepted keys dir seeds bindings, so a provisioned agent is READY at once."""
    cluster.curve = True
    cluster.grace = "0s"
    pre = cluster.root / "accepted"
    pre.mkdir()
    pair = curve.load_or_create(cluster.root / "agents" / "p1" / "keys", "agent")
    shutil.copy(cluster.root / "agents" / "p1" / "keys" / "agent.key", pre / "p1.key")
    cluster.coord_extra = [f"coordinator.accepted_keys_dir={pre}"]
    cluster.start_coordinator()
    cluster.start_agent("p1")
    wait_for(lambda: cluster.health().get("p1") == "READY", 30, "p1 READY without an accept")
    assert keys_by_node(cluster)["p1"]["state"] == "accepted"
    assert keys_by_node(cluster)["p1"]["public_key"] == pair.public


def test_no_secret_key_in_logs_or_json(cluster: Cluster) -> None:
    """SEC-8: secret keys never appear in logs or `--json` output (grep over the whole run)."""
    import json

    import zmq.auth
    cluster.curve = True
    cluster.grace = "0s"
    cluster.start_coordinator()
    cluster.start_agent("s1")
    wait_for(lambda: keys_by_node(cluster).get("s1", {}).get("state") == "pending", 20, "s1 pending")
    outputs = [json.dumps(cluster.tcctl("node", "accept", "s1")[1])]
    wait_for(lambda: cluster.health().get("s1") == "READY", 30, "s1 READY")
    for args in (("node", "keys"), ("node", "list"), ("node", "show", "s1")):
        rc, doc = cluster.tcctl(*args)
        assert rc == 0
        outputs.append(json.dumps(doc))
    cluster.stop()
    secrets = []
    for path in cluster.root.rglob("*.key_secret"):
        _, secret = zmq.auth.load_certificate(str(path))
        secrets.append(secret.decode())
    assert len(secrets) == 2  # the coordinator's and s1's
    texts = outputs + [p.read_text(errors="replace") for p in cluster.root.glob("*.log")]
    for secret in secrets:
        assert not any(secret in t for t in texts), "a secret key leaked into a log or --json output"
