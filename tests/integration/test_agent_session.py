"""A real ``tc-agent`` process against a test ROUTER speaking TC1 with the protocol classes
(SPEC WIRE-6 to WIRE-11, WIRE-16, WIRE-20, CAT-5, GC-14, SEC-1, SEC-9, CFG-1, CFG-2).

The ROUTER here plays the coordinator by hand, so each test can answer, stay silent or send
garbage exactly when it wants. Every wait polls a socket or a predicate with a deadline.
"""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from protocol import canonical
from protocol.envelope import parse
from protocol.errors import NotLeader, SessionUnknown
from protocol.message import decode_message
from protocol.messages import Error, HeartbeatAck, Task, TaskAccepted, TaskResult, Welcome
from tests.support import REPO, Proc, free_port, wait_for

from tests.fake_coordinator import (NODE, SESSION, Coordinator, Notify, agent_argv,
                                     hello_and_welcome, start_agent)


# --- start-up and configuration --------------------------------------------------------

@pytest.mark.parametrize("setting,needle", [
    ("agent.bogus=1", "agent.bogus"),
    ("agent.hello_timeout=soon", "agent.hello_timeout"),
    ("security.curve=true", "agent.coordinator_keys"),  # SEC-2: CURVE needs the pinned coordinator key
    ("agent.blob_endpoint=tcp://0.0.0.0:7713", "tcp://0.0.0.0:7713"),
])
def test_config_errors_exit_2_naming_the_key(tmp_path: Path, setting: str, needle: str) -> None:
    """CFG-1, SEC-1: a bad key or value, or a forbidden endpoint, stops tc-agent with exit 2."""
    argv = agent_argv(tmp_path, ["tcp://127.0.0.1:1"], setting)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("tc-agent: config error: ") and needle in r.stderr, r.stderr
    assert not (tmp_path / "state").exists(), "nothing may start before the configuration is accepted"


def test_non_loopback_coordinator_is_refused(tmp_path: Path) -> None:
    """SEC-1: with security.curve = false every tcp:// endpoint must be loopback."""
    r = subprocess.run(agent_argv(tmp_path, ["tcp://127.0.0.1:1", "tcp://192.0.2.10:7710"]),
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2 and "tcp://192.0.2.10:7710" in r.stderr, r.stderr


# --- the session -------------------------------------------------------------------------

def test_ready_hello_snapshot_heartbeats_wants_task_and_sigterm(tmp_path: Path, coord: Coordinator,
                                                                notify: Notify, agents: list[Proc]) -> None:
    """GC-14 READY=1 before HELLO; WIRE-6 HELLO; CAT-5 snapshot; WIRE-8 beats < 1 KiB at the
    WELCOME cadence; WIRE-9 wants; WIRE-12 task shape; SEC-9 watchdog and STOPPING=1 on SIGTERM."""
    agent = start_agent(agents, tmp_path, [coord.endpoint], notify=notify, env={"WATCHDOG_USEC": "200000"})
    ident, hello, _ = coord.expect("HELLO", 15)
    # READY=1 was sent before HELLO; the reader thread may just not have picked it up yet.
    wait_for(lambda: notify.got, 2, "READY=1")
    assert notify.got[0].startswith("READY=1"), notify.got
    assert ident == NODE.encode() and hello.node_id == NODE and hello.address == "127.0.0.1"
    assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", hello.blob_endpoint)
    assert hello.capabilities["sandbox"] is False and set(hello.capabilities) == {"build", "sandbox"}
    assert hello.versions["guest_image"] == "test-guest-1" and hello.versions["hypervisor"] == "none"
    assert re.fullmatch(r"[0-9a-f]{32}", hello.catalog["epoch"]) and hello.catalog["seq"] == 0
    assert hello.catalog["digest"] == canonical.catalog_digest([])
    assert hello.reconcile == {"missing": [], "orphans": []} and hello.boot_ms > 0
    assert oct((tmp_path / "state").stat().st_mode & 0o777) == "0o700"
    assert (tmp_path / "state" / "catalog.db").exists()

    coord.welcome(ident, hello, 200, full=True)
    _, page, _ = coord.expect("CATALOG_SNAPSHOT", 5)
    assert (page.session_id, page.epoch, page.seq, page.page, page.last, page.entries) == \
        (SESSION, hello.catalog["epoch"], 0, 0, True, [])
    assert page.digest == hello.catalog["digest"]

    beats = []
    for _ in range(6):
        _, beat, size = coord.expect("HEARTBEAT", 5)
        beats.append((time.monotonic(), beat))
        assert size < 1024
    assert [b.seq for _, b in beats] == list(range(1, 7)) and {b.session_id for _, b in beats} == {SESSION}
    gaps = [b[0] - a[0] for a, b in zip(beats, beats[1:], strict=False)]
    assert 0.1 < sum(gaps) / len(gaps) < 0.4, gaps
    last = beats[-1][1]
    assert last.catalog_seq == 0 and last.catalog_digest == hello.catalog["digest"] and last.refs_digest == ""
    assert last.versions_digest == canonical.digest(hello.versions) and last.sandboxes == 0
    assert last.storage["total"] > 0 and last.mem_free > 0

    coord.send(ident, HeartbeatAck(parent_id=last.msg_id, wants=["versions", "refs", "catalog"]))
    _, versions, _ = coord.expect("VERSIONS", 5)
    assert versions.versions == hello.versions and versions.digest == last.versions_digest
    _, refs, _ = coord.expect("RUNTIME_REFS", 5)
    assert (refs.refs, refs.digest) == ([], "")
    _, again, _ = coord.expect("CATALOG_SNAPSHOT", 5)
    assert again.last and again.page == 0

    coord.send(ident, HeartbeatAck(parent_id=last.msg_id, interval=80))  # a new H from the ACK (NODE-7)
    coord.expect("HEARTBEAT", 5)  # may still be on the old cadence
    coord.expect("HEARTBEAT", 5)
    t0 = time.monotonic()
    for _ in range(4):
        coord.expect("HEARTBEAT", 5)
    assert (time.monotonic() - t0) / 4 < 0.17  # 80 ms now, against 200 ms before

    coord.send(ident, Task(msg_id="t-1", task_id="tsk-" + "a" * 24, op="NO_SUCH_OP", args={}, deadline=0))
    _, accepted, _ = coord.expect("TASK_ACCEPTED", 5)
    _, result, _ = coord.expect("TASK_RESULT", 5)
    assert isinstance(accepted, TaskAccepted) and isinstance(result, TaskResult)
    assert accepted.parent_id == result.parent_id == "t-1" and result.ok is False and result.error is not None
    assert result.error["name"] == "UnsupportedMessage" and "NO_SUCH_OP" in result.error["message"]

    wait_for(lambda: notify.got.count("WATCHDOG=1") >= 2, 5, "two WATCHDOG=1 pings")
    assert agent.stop() == 0, agent.output()[-3000:]
    wait_for(lambda: "STOPPING=1" in notify.got, 5, "STOPPING=1")


def test_session_unknown_makes_the_agent_hello_again_at_once(tmp_path: Path, coord: Coordinator,
                                                             agents: list[Proc]) -> None:
    """WIRE-11: ERROR SessionUnknown to a heartbeat → a new HELLO promptly, no backoff; the new
    session's beats restart at seq 1."""
    start_agent(agents, tmp_path, [coord.endpoint], "agent.backoff_initial=5s", "agent.backoff_max=10s")
    ident, hello = hello_and_welcome(coord)
    _, beat, _ = coord.expect("HEARTBEAT", 5)
    sent = time.monotonic()
    coord.send(ident, Error.of(SessionUnknown("no live session"), beat.msg_id))
    _, hello2, _ = coord.expect("HELLO", 5)
    assert time.monotonic() - sent < 1.5  # backoff is ≥ 5 s here, so this HELLO did not back off
    assert hello2.msg_id != hello.msg_id
    coord.welcome(ident, hello2, 200, session="ab" * 8)
    _, beat2, _ = coord.expect("HEARTBEAT", 5)
    assert (beat2.session_id, beat2.seq) == ("ab" * 8, 1)


def test_silence_reconnects_within_liveness_plus_backoff(tmp_path: Path, coord: Coordinator,
                                                         agents: list[Proc]) -> None:
    """WIRE-10: nothing heard for agent.liveness → close, back off (full jitter), HELLO again."""
    start_agent(agents, tmp_path, [coord.endpoint], "agent.liveness=1s", "agent.backoff_initial=100ms",
                "agent.backoff_max=200ms")
    coord.answer_beats = False
    hello_and_welcome(coord)
    welcomed = time.monotonic()
    coord.expect("HELLO", 1.0 + 0.2 + 3.0)
    waited = time.monotonic() - welcomed
    assert 0.9 <= waited <= 1.0 + 0.2 + 3.0, waited
    assert any(m.TYPE == "HEARTBEAT" for _, m in coord.seen), "beats kept going while the link was silent"


def test_garbage_and_foreign_frames_do_not_stop_the_session(tmp_path: Path, coord: Coordinator,
                                                            agents: list[Proc]) -> None:
    """WIRE-1, WIRE-5: TC2, non-TC, undecodable, unknown and unexpected messages are logged and
    counted; the agent keeps its session."""
    agent = start_agent(agents, tmp_path, [coord.endpoint])
    ident, hello = hello_and_welcome(coord)
    _, first, _ = coord.expect("HEARTBEAT", 5)
    for frames in ([b"TC2", b"HEARTBEAT_ACK", msgpack.packb({"parent_id": "x"})],
                   [b"garbage"], [b"TC1", b"HEARTBEAT_ACK", b"\xc1\xc1"], [b"TC1", b"NO_SUCH", b"\x80"],
                   [b"TC1", b"lower", b"\x80"], [b"TC1", b"WELCOME", msgpack.packb({"session_id": 5})],
                   [b"TC1"], [b"TC1", b"HELLO", b"\x80", b"extra"]):
        coord.sock.send_multipart([ident, *frames])
    coord.send(ident, Welcome(parent_id="stale", session_id="cd" * 8, heartbeat_interval=10, lease_ttl=10,
                              want_full_catalog=True))  # unexpected mid-session: ignored
    coord.send(ident, Error.of(SessionUnknown("old"), "someone-else-1"))  # stale: not ours
    for _ in range(3):
        _, beat, _ = coord.expect("HEARTBEAT", 5)
        assert beat.session_id == SESSION
    assert beat.seq >= first.seq + 3 and agent.alive()
    assert not any(m.TYPE == "HELLO" for _, m in coord.seen[1:]), "the session must survive"
    log = agent.output()
    assert "dropped a frame" in log and "bad message" in log and "unexpected WELCOME" in log


def test_silent_or_down_first_endpoint_moves_on_to_the_next(tmp_path: Path, ctx: zmq.Context[Any],
                                                            coord: Coordinator, agents: list[Proc]) -> None:
    """WIRE-7, WIRE-10, HA-4: an unanswered HELLO (or no connection) after hello_timeout → next endpoint."""
    silent = Coordinator(ctx)
    try:
        down = f"tcp://127.0.0.1:{free_port()}"
        start_agent(agents, tmp_path, [silent.endpoint, down, coord.endpoint], "agent.hello_timeout=500ms",
                    "agent.backoff_initial=50ms", "agent.backoff_max=100ms")
        silent.expect("HELLO", 15)
        t0 = time.monotonic()
        ident, hello, _ = coord.expect("HELLO", 0.5 + 0.5 + 0.2 + 3.0)  # silent, then down, then here
        assert time.monotonic() - t0 >= 0.9  # two hello_timeouts passed on the way
        coord.welcome(ident, hello)
        coord.expect("HEARTBEAT", 5)
    finally:
        silent.close()


def test_not_leader_goes_to_the_hinted_endpoint(tmp_path: Path, ctx: zmq.Context[Any], coord: Coordinator,
                                                agents: list[Proc]) -> None:
    """HA-4: ERROR NotLeader with details.leader among the configured endpoints → HELLO there next."""
    standby, skipped = Coordinator(ctx), Coordinator(ctx)
    try:
        start_agent(agents, tmp_path, [standby.endpoint, skipped.endpoint, coord.endpoint],
                    "agent.backoff_initial=50ms", "agent.backoff_max=100ms")
        ident, hello, _ = standby.expect("HELLO", 15)
        standby.send(ident, Error.of(NotLeader("standby", {"leader": coord.endpoint}), hello.msg_id))
        coord.expect("HELLO", 3)  # well inside the 5 s hello_timeout the skipped endpoint would cost
        assert not skipped.sock.poll(0), "the hinted leader is tried before the next endpoint"
    finally:
        standby.close()
        skipped.close()


def test_blob_endpoint_answers_with_errors_and_drops_garbage(tmp_path: Path, ctx: zmq.Context[Any],
                                                             coord: Coordinator, agents: list[Proc]) -> None:
    """WIRE-1, WIRE-16, GC-14: the blob ROUTER is bound before HELLO; it drops non-TC frames,
    answers TC2 with UnsupportedProtocol, FETCH with ArtifactNotFound, anything else UnsupportedMessage."""
    start_agent(agents, tmp_path, [coord.endpoint])
    _, hello, _ = coord.expect("HELLO", 15)
    peer = ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(hello.blob_endpoint)

    def ask(*frames: bytes) -> Error:
        peer.send_multipart(list(frames))
        assert peer.poll(5000), "no answer from the blob endpoint"
        msg = decode_message(parse(peer.recv_multipart(), router=False))
        assert isinstance(msg, Error)
        return msg

    peer.send_multipart([b"not a TC frame"])  # dropped: the next answer must be FETCH's own
    err = ask(b"TC1", b"FETCH", msgpack.packb({"msg_id": "f-1", "artifact_id": "art-" + "0" * 24}))
    assert (err.name, err.parent_id) == ("ArtifactNotFound", "f-1")
    assert ask(b"TC2", b"FETCH", b"\x80").name == "UnsupportedProtocol"
    assert ask(b"TC1", b"HEARTBEAT", msgpack.packb({"msg_id": "h-1"})).name == "UnsupportedMessage"
    assert ask(b"TC1", b"FETCH", b"\xc1").name == "MalformedMessage"
    peer.close()


def test_blob_endpoint_ignores_a_peer_past_the_bad_message_limit(tmp_path: Path, ctx: zmq.Context[Any],
                                                                  coord: Coordinator, agents: list[Proc]) -> None:
    """SEC-8 on the blob endpoint: a peer sending more than security.max_bad_msgs (here 20) bad
    requests a minute gets no answer for the cool-down; another peer is still served."""
    agent = start_agent(agents, tmp_path, [coord.endpoint], "security.max_bad_msgs=20")
    _, hello, _ = coord.expect("HELLO", 15)

    def peer() -> zmq.Socket[Any]:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(hello.blob_endpoint)
        return s

    def fetch(s: zmq.Socket[Any], n: int) -> bool:
        s.send_multipart([b"TC1", b"FETCH", msgpack.packb({"msg_id": f"f-{n}", "artifact_id": "art-" + "0" * 24})])
        if not s.poll(1000 if n == -1 else 5000):
            return False
        msg = decode_message(parse(s.recv_multipart(), router=False))
        assert isinstance(msg, Error) and msg.name == "ArtifactNotFound"
        return True

    bad = peer()
    for n in range(21):  # 21 refusals: one past the limit
        assert fetch(bad, n), f"refusal {n} was not answered"
    assert not fetch(bad, -1), "a peer past the limit is still answered"
    good = peer()
    assert fetch(good, 0), "another peer is no longer served"
    wait_for(lambda: "sent more than 20 bad requests in a minute" in agent.output(), 10, "the cool-down log line")
    bad.close()
    good.close()
