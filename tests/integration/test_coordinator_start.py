"""Coordinator start-up: configuration errors, the schema gate, admin socket permissions and
node events (CFG-1, CFG-2, HA-1, SEC-1, SEC-5, WIRE-18, GC-13)."""
from __future__ import annotations

import os
import stat
import subprocess

import msgpack
import zmq

from tests.support import PY, REPO, Cluster, wait_for


def run_coordinator(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "coordinator.main", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def test_unknown_key_and_bad_value_stop_with_the_key_named(tmp_path) -> None:
    """CFG-1: an unknown key or invalid value stops the daemon naming the key (exit 2)."""
    r = run_coordinator("--set", "heartbeat.intervall=2s")
    assert r.returncode == 2 and "heartbeat.intervall" in r.stderr
    r = run_coordinator("--set", "heartbeat.interval=soon")
    assert r.returncode == 2 and "heartbeat.interval" in r.stderr
    cfg = tmp_path / "c.toml"
    cfg.write_text('[db]\nurl = "sqlite:///x.db"\nflavour = 1\n')
    r = run_coordinator("--config", str(cfg))
    assert r.returncode == 2 and "db.flavour" in r.stderr
    r = subprocess.run([PY, "-m", "agent.main", "--set", "runtime.drivr=none"], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 2 and "runtime.drivr" in r.stderr


def test_plain_tcp_refused_off_loopback() -> None:
    """SEC-1: plain TCP only on a loopback bind (CURVE itself is tested in test_curve.py)."""
    r = run_coordinator("--set", "security.curve=false", "--set", "coordinator.agent_endpoint=tcp://0.0.0.0:7710")
    assert r.returncode == 2 and "tcp://0.0.0.0:7710" in r.stderr
    r = run_coordinator("--set", "security.curve=false", "--set", "coordinator.agent_endpoint=tcp://127.0.0.1:7710",
                        "--set", "coordinator.events_endpoint=tcp://192.0.2.1:7712")
    assert r.returncode == 2 and "tcp://192.0.2.1:7712" in r.stderr


def test_schema_gate_without_migrate(cluster: Cluster) -> None:
    """HA-1: a schema not at head stops the coordinator with TemplateStoreNotInitialized."""
    r = subprocess.run(cluster.coordinator_argv(migrate=False), capture_output=True, text=True, cwd=REPO,
                       timeout=60)
    assert r.returncode == 1, r.stderr
    assert "TemplateStoreNotInitialized" in r.stderr and "--migrate" in r.stderr


def test_admin_socket_permissions_and_node_events(cluster: Cluster) -> None:
    """SEC-5: socket 0660 after bind, directory 0750. WIRE-18: node.<id> events with a
    per-coordinator seq that increases by one."""
    cluster.grace = "0s"
    cluster.start_coordinator()
    sock_path = cluster.admin[len("ipc://"):]
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(os.path.dirname(sock_path)).st_mode) == 0o750

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"node.")
    sub.connect(f"ipc://{cluster.run_dir}/events.sock")
    events: list[dict] = []
    try:
        wait_for(lambda: cluster.tcctl("node", "list")[0] == 0, 10, "coordinator")
        cluster.start_agent("ev1")

        def drain() -> bool:
            while sub.poll(50):
                topic, proto, kind, body = sub.recv_multipart()
                assert proto == b"TC1" and kind == b"EVENT"
                ev = msgpack.unpackb(body)
                assert ev["topic"] == topic.decode()
                events.append(ev)
            return any(e["kind"] == "health" and e["data"]["new"] == "READY" for e in events)

        wait_for(drain, 30, "a node.ev1 health event to READY")
        kinds = [e["kind"] for e in events]
        assert "created" in kinds and "session" in kinds
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "seq must not have gaps"
        assert all(e["topic"] == "node.ev1" for e in events)
    finally:
        sub.close(linger=0)
        ctx.term()
