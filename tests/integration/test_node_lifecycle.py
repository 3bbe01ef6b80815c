"""Coordinator + agent processes: node health derived from heartbeats (NODE-1..NODE-8, WIRE-6..WIRE-11).

Real processes, real sockets, real databases (SQLite and PostgreSQL via ``db_url``). Every
wait polls with a deadline; measured times are printed (run with -s to see them).
"""
from __future__ import annotations

import signal
import time

from tests.support import Cluster, wait_for

AGENTS = ("n1", "n2", "n3")


def all_health(c: Cluster, want: str, nodes=AGENTS) -> bool:
    h = c.health()
    return all(h.get(n) == want for n in nodes)


def test_three_agents_ready_kill_suspect_lost_restart(cluster: Cluster) -> None:
    """NODE-1, NODE-2, NODE-3: READY; a SIGKILLed agent turns SUSPECT after 2H, LOST after
    max(lease_ttl_min, 5H); restarted, it is READY again under the same node id."""
    cluster.grace = "0s"
    cluster.start_coordinator()
    for n in AGENTS:
        cluster.start_agent(n)
    wait_for(lambda: all_health(cluster, "READY"), 30, "three READY nodes")
    before = cluster.nodes()
    assert set(before) == set(AGENTS)

    h, lost_min = 0.2, 1.5  # heartbeat.interval and heartbeat.lease_ttl_min set by the Cluster
    killed = time.monotonic()
    cluster.agents["n2"].kill(signal.SIGKILL)
    wait_for(lambda: cluster.health()["n2"] == "SUSPECT", 10, "n2 SUSPECT")
    t_suspect = time.monotonic() - killed
    wait_for(lambda: cluster.health()["n2"] == "LOST", 15, "n2 LOST")
    t_lost = time.monotonic() - killed
    print(f"\nmeasured: SUSPECT after {t_suspect:.2f}s (threshold {2 * h:.2f}s), "
          f"LOST after {t_lost:.2f}s (threshold {max(lost_min, 5 * h):.2f}s)")
    # The last heartbeat came at most H before the kill, so the thresholds bound the times.
    assert 2 * h - h <= t_suspect <= 2 * h + 3.0
    assert max(lost_min, 5 * h) - h <= t_lost <= max(lost_min, 5 * h) + 3.0
    others = cluster.health()
    assert others["n1"] == "READY" and others["n3"] == "READY"

    cluster.start_agent("n2")
    wait_for(lambda: cluster.health()["n2"] == "READY", 20, "n2 READY after restart")
    after = cluster.nodes()
    assert set(after) == set(AGENTS), "a restarted agent must keep its node id, not add a node"
    assert after["n2"]["node_id"] == "n2"


def test_coordinator_restart_agents_rehello_no_lost_in_grace(cluster: Cluster) -> None:
    """WIRE-11, NODE-8: after a coordinator SIGKILL and restart, agents re-HELLO and return to
    READY; no node is declared LOST during the failover grace, a dead one shows SUSPECT."""
    cluster.grace = "4s"
    cluster.start_coordinator()
    for n in AGENTS:
        cluster.start_agent(n)
    wait_for(lambda: all_health(cluster, "READY"), 30, "three READY nodes")
    cluster.agents["n3"].kill(signal.SIGKILL)  # n3 stays dead through the failover
    cluster.coordinator.kill(signal.SIGKILL)
    restarted = time.monotonic()
    cluster.start_coordinator(migrate=False)  # schema already at head

    seen: dict[str, set[str]] = {n: set() for n in AGENTS}
    violations: list[str] = []  # recorded, not raised: wait_for would swallow an assertion

    def sample() -> bool:
        h = cluster.health()
        elapsed = time.monotonic() - restarted
        for n, v in h.items():
            seen[n].add(v)
            if elapsed < 3.5 and v == "LOST":  # safely inside the 4 s grace
                violations.append(f"{n} declared LOST {elapsed:.1f}s after restart, inside the grace")
        return h["n1"] == "READY" and h["n2"] == "READY"

    wait_for(sample, 20, "n1 and n2 READY after the coordinator restart")
    t_ready = time.monotonic() - restarted
    assert cluster.health()["n3"] in ("SUSPECT", "LOST")
    wait_for(lambda: sample() and cluster.health()["n3"] == "LOST", 20, "n3 LOST once the grace ended")
    t_lost = time.monotonic() - restarted
    print(f"\nmeasured: agents READY {t_ready:.2f}s after the coordinator restart; "
          f"dead n3 LOST after {t_lost:.2f}s (grace 4s); states seen: {seen}")
    assert not violations, violations
    assert t_lost >= 3.5
    assert "SUSPECT" in seen["n3"]


def test_cordon_uncordon_persist_across_restart(cluster: Cluster) -> None:
    """NODE-4: admin state is persisted, idempotent, independent of health; NODE-5 placeable."""
    cluster.grace = "0s"
    cluster.start_coordinator()
    cluster.start_agent("n1")
    wait_for(lambda: cluster.health().get("n1") == "READY", 30, "n1 READY")
    for _ in range(2):  # idempotent
        rc, doc = cluster.tcctl("node", "cordon", "n1")
        assert rc == 0, doc
        assert doc["node"]["admin_state"] == "CORDONED" and doc["node"]["placeable"] is False
        assert doc["request_id"]  # CLI-2: generated and reported
    rc, doc = cluster.tcctl("node", "list", "--admin", "CORDONED")
    assert [n["node_id"] for n in doc["nodes"]] == ["n1"]
    cluster.coordinator.stop()
    cluster.start_coordinator(migrate=False)
    wait_for(lambda: cluster.health().get("n1") == "READY", 30, "n1 READY after restart")
    assert cluster.nodes()["n1"]["admin_state"] == "CORDONED"
    rc, doc = cluster.tcctl("node", "uncordon", "n1", "--request-id", "uncordon-1")
    assert rc == 0 and doc["node"]["admin_state"] == "ACTIVE"
    wait_for(lambda: cluster.nodes()["n1"]["placeable"], 10, "n1 placeable again")
    rc, doc = cluster.tcctl("node", "show", "n1")
    assert rc == 0
    n = doc["node"]
    assert n["facts"]["host_name"] and n["facts"]["cores"] >= 1
    assert n["versions"]["host_kernel"] and n["capabilities"]["sandbox"] is False
    assert n["catalog"]["complete"] is True and n["session"]["heartbeat_seq"] > 0
    rc, doc = cluster.tcctl("node", "show", "nope")
    assert rc == 1 and doc["error"]["name"] == "NodeNotFound" and doc["error"]["code"] == 4001
