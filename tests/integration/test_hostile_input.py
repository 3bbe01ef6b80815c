"""Hostile frames on the agent endpoint (WIRE-1, WIRE-2, WIRE-5, SEC-8) and tcctl against a
stopped coordinator (CLI-1)."""
from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys

import msgpack
import zmq

from protocol.codec import Limits
from tests.support import REPO, Cluster, wait_for

N_FRAMES = 10_000


def rogue_dealer(port: int, ident: bytes) -> tuple[zmq.Context, zmq.Socket]:
    """A DEALER that speaks garbage to the agent endpoint under a fixed identity."""
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.ROUTING_ID, ident)
    rogue.setsockopt(zmq.LINGER, 5000)
    rogue.connect(f"tcp://127.0.0.1:{port}")
    return ctx, rogue


def garbage(i: int, rng: random.Random) -> list[bytes]:
    kind = i % 8
    if kind == 0:
        return [rng.randbytes(rng.randint(0, 64))]                               # not a TC frame: dropped
    if kind == 1:
        return [b"TC2", b"HELLO", msgpack.packb({"msg_id": "x"})]               # UnsupportedProtocol
    if kind == 2:
        return [b"TC1", b"hello!", b"\x80"]                                     # bad type frame
    if kind == 3:
        return [b"TC1", b"HEARTBEAT", rng.randbytes(32)]                        # undecodable body
    if kind == 4:
        return [b"TC1", b"NO_SUCH_TYPE", msgpack.packb({"msg_id": "m"})]        # UnsupportedMessage
    if kind == 5:
        return [b"TC1", b"HEARTBEAT", msgpack.packb({"msg_id": "m", "seq": "x"})]  # schema violation
    if kind == 6:  # a header claiming a 2 GiB string: refused before allocation
        return [b"TC1", b"HELLO", b"\x81\xa6msg_id\xdb" + struct.pack(">I", 2**31 - 1)]
    return [b"TC1", b"HEARTBEAT", b"\x92\x01"]                                  # truncated array


def test_garbage_and_oversized_frames_are_counted_and_service_continues(cluster: Cluster) -> None:
    """10,000 garbage frames plus oversized bodies: the coordinator keeps serving node list and
    counts every one (refused, dropped, or ignored while the peer is in its SEC-8 cooldown)."""
    cluster.grace = "0s"
    # Lift the SEC-8 cooldown so every frame reaches the decoder (the cooldown has its own test).
    cluster.coord_extra = ["security.max_bad_msgs=1000000"]
    cluster.start_coordinator()
    cluster.start_agent("n1")
    wait_for(lambda: cluster.health().get("n1") == "READY", 30, "n1 READY")

    ctx, rogue = rogue_dealer(cluster.agent_port, b"rogue-peer")
    rng = random.Random(7)
    oversized = Limits().max_frame + 1
    sent = 0
    try:
        for _ in range(3):  # bodies just over the 16 MiB frame limit (WIRE-2)
            rogue.send_multipart([b"TC1", b"HEARTBEAT", b"\x00" * oversized])
            sent += 1
        for i in range(N_FRAMES):
            rogue.send_multipart(garbage(i, rng))
            sent += 1
            if i % 2000 == 0:  # the coordinator answers the operator throughout
                rc, doc = cluster.tcctl("node", "list", timeout=10)
                assert rc == 0 and [n["node_id"] for n in doc["nodes"]] == ["n1"]

        def counted() -> dict[str, int] | None:
            c = cluster.tcctl("node", "list")[1]["bad_messages"]
            return c if sum(c.values()) >= sent else None

        totals = wait_for(counted, 60, f"all {sent} bad frames counted")
        print(f"\ncounted: {totals} of {sent} sent")
        assert sum(totals.values()) == sent and totals["ignored"] == 0
        assert totals["dropped"] == N_FRAMES // 8  # the non-TC frames get no reply (WIRE-1)
        assert cluster.health()["n1"] == "READY", "a hostile peer must not disturb real agents"
        assert cluster.coordinator.alive()
    finally:
        rogue.close(linger=0)
        ctx.term()


def test_tcctl_against_stopped_coordinator_exits_4_naming_the_endpoint(cluster: Cluster) -> None:
    """CLI-1: exit code 4 and a message naming the endpoint that did not answer — both with no
    socket file and with a stale one left by a killed coordinator."""
    env = dict(os.environ)

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "coordinator.cli.main", "node", "list", "--endpoint",
                               cluster.admin, "--timeout", "1", *extra], capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=60)

    r = run()
    assert r.returncode == 4, r
    assert cluster.admin[len("ipc://"):] in r.stderr and "is the coordinator running" in r.stderr
    cluster.start_coordinator()
    cluster.coordinator.kill(signal.SIGKILL)  # leaves the socket file behind
    r = run()
    assert r.returncode == 4, r
    assert cluster.admin in r.stderr and "within 1s" in r.stderr
    r = run("--json")
    assert r.returncode == 4
    import json
    doc = json.loads(r.stdout)
    assert doc["error"]["name"] == "Timeout" and doc["error"]["details"]["attempts"][0]["endpoint"] == cluster.admin


def test_bad_peer_is_ignored_after_100_bad_messages(cluster: Cluster) -> None:
    """SEC-8: > 100 bad messages a minute → the peer is ignored (and those messages counted as
    ignored) while real agents are served as before."""
    cluster.grace = "0s"
    cluster.start_coordinator()
    cluster.start_agent("n1")
    wait_for(lambda: cluster.health().get("n1") == "READY", 30, "n1 READY")
    ctx, rogue = rogue_dealer(cluster.agent_port, b"rogue-2")
    try:
        for _ in range(300):
            rogue.send_multipart([b"TC1", b"HEARTBEAT", b"\xc1"])
        totals = wait_for(lambda: (lambda c: c if sum(c.values()) >= 300 else None)(
            cluster.tcctl("node", "list")[1]["bad_messages"]), 30, "300 bad frames counted")
        assert totals == {"refused": 101, "dropped": 0, "ignored": 199}
        assert cluster.health()["n1"] == "READY"
    finally:
        rogue.close(linger=0)
        ctx.term()
