"""Pure logic of artifact transfer: the grant table (SEC-6, DIST-4), the credit window and its
retries (WIRE-16), the resume record (WIRE-17), sparse writes and the transfer messages (WIRE-3)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.support import async_wait_for

from agent.grants import Grant, GrantTable, short
from agent.fetchstate import ChunkPlan, ResumeRecord
from agent.transfer import _write_sparse
from protocol.errors import MalformedMessage, TransferTokenExpired, TransferTokenInvalid
from protocol.messages import Chunk, Fetch, Grant as GrantMsg, TokenGrant, TokenRequest

ART = "art-" + "a" * 24
TOKEN = "ab" * 32
KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


# --- grants ---------------------------------------------------------------------------

def test_grant_matches_artifact_token_and_node_without_curve() -> None:
    """SEC-6: with CURVE off the requester's identity must be the target node (or node/<suffix>)."""
    clock = Clock()
    table = GrantTable(clock)
    table.add(Grant(ART, TOKEN, clock.now + 1000, "node-b", ""))
    assert table.check(ART, TOKEN, None, b"node-b/1a2b").target_node == "node-b"
    assert table.check(ART, TOKEN, None, b"node-b").target_node == "node-b"
    for art, tok, ident in ((ART, "cd" * 32, b"node-b/1"), ("art-" + "b" * 24, TOKEN, b"node-b/1"),
                            (ART, TOKEN, b"node-c/1"), (ART, TOKEN, b"node-bb/1")):
        with pytest.raises(TransferTokenInvalid):
            table.check(art, tok, None, ident)


def test_grant_with_curve_matches_the_proven_key_only() -> None:
    """SEC-6: with CURVE the requester's key decides; a right identity with another key is refused."""
    clock = Clock()
    table = GrantTable(clock)
    table.add(Grant(ART, TOKEN, clock.now + 1000, "node-b", KEY))
    assert table.check(ART, TOKEN, KEY, b"whatever")
    with pytest.raises(TransferTokenInvalid):
        table.check(ART, TOKEN, KEY[::-1], b"node-b/1")
    with pytest.raises(TransferTokenInvalid):
        table.check(ART, TOKEN, None, b"node-b/1")


def test_expired_grant_says_expired_to_its_target_and_is_dropped_later() -> None:
    """DIST-5: an expired grant is never served; its own target hears TransferTokenExpired (every
    FETCH in flight, not just the first) and others TransferTokenInvalid; it is pruned after the grace."""
    clock = Clock()
    table = GrantTable(clock, keep_expired_ms=10_000)
    table.add(Grant(ART, TOKEN, clock.now + 1000, "node-b", ""))
    clock.now += 1000
    for _ in range(2):
        with pytest.raises(TransferTokenExpired) as exc:
            table.check(ART, TOKEN, None, b"node-b/x")
        assert TOKEN not in exc.value.message and TOKEN[:8] in exc.value.message  # SEC-6: ≤ 8 hex digits
    with pytest.raises(TransferTokenInvalid):
        table.check(ART, TOKEN, None, b"node-c/x")
    assert table.live() == []
    clock.now += 10_001
    table.add(Grant("art-" + "b" * 24, "ef" * 32, clock.now + 5, "node-b", ""))  # add prunes
    assert len(table) == 1
    with pytest.raises(TransferTokenInvalid):
        table.check(ART, TOKEN, None, b"node-b/x")


def test_new_grant_replaces_the_old_one_and_revoke_drops() -> None:
    clock = Clock()
    table = GrantTable(clock)
    table.add(Grant(ART, TOKEN, clock.now + 1000, "node-b", ""))
    table.add(Grant(ART, "cd" * 32, clock.now + 1000, "node-b", ""))
    table.add(Grant(ART, "ef" * 32, clock.now + 1000, "node-c", ""))
    with pytest.raises(TransferTokenInvalid):
        table.check(ART, TOKEN, None, b"node-b")
    assert table.revoke(ART, "node-b") == 1
    assert table.revoke(ART) == 1
    assert len(table) == 0
    assert short(TOKEN) == TOKEN[:8] + "…"


# --- the credit window ------------------------------------------------------------------

def test_plan_keeps_at_most_window_requests_in_flight() -> None:
    """WIRE-16: ≤ window FETCHes in flight; each answer returns one credit; the last range is short."""
    plan = ChunkPlan(size=10 * 100 + 30, start=0, chunk=100, window=4, retries=3)
    first = plan.take()
    assert first == [(0, 100), (100, 100), (200, 100), (300, 100)]
    assert plan.take() == []  # no credit left
    assert plan.good(100, b"b" * 100) == []  # ahead of the prefix: held back
    assert plan.take() == [(400, 100)]
    assert [o for o, _ in plan.good(0, b"a" * 100)] == [0, 100]
    assert plan.verified == 200
    for _ in range(100):
        plan.take()
        for offset in sorted(plan.inflight):
            plan.good(offset, None)
        if plan.done:
            break
    assert plan.verified == 1030 and plan.length(1000) == 30


def test_plan_retries_a_bad_chunk_then_gives_up() -> None:
    """WIRE-16: a bad chunk is asked again, 3 tries in all; a refused request (expired token) is no try."""
    plan = ChunkPlan(size=300, start=0, chunk=100, window=8, retries=3)
    plan.take()
    plan.requeue(0)
    assert plan.take() == [(0, 100)] and plan.tries(0) == 1
    assert plan.bad(0) is True
    assert plan.take() == [(0, 100)]
    assert plan.bad(0) is True
    assert plan.take() == [(0, 100)]
    assert plan.bad(0) is False


def test_plan_resumes_from_the_verified_prefix() -> None:
    """WIRE-17: a plan started at the recorded prefix asks only for the rest."""
    plan = ChunkPlan(size=1000, start=600, chunk=100, window=8, retries=3)
    asked = plan.take()
    assert [o for o, _ in asked] == [600, 700, 800, 900]
    assert ChunkPlan(size=0, start=0, chunk=100, window=8, retries=3).done


# --- the resume record ------------------------------------------------------------------

def test_resume_record_round_trip_and_mismatch(tmp_path: Path) -> None:
    """WIRE-17: the verified byte count survives; another size or digest starts that file over."""
    files = [{"name": "rootfs.ext4", "size": 1000, "sha256": "1" * 64},
             {"name": "config.json", "size": 10, "sha256": "2" * 64}]
    rec = ResumeRecord.load(tmp_path / ".progress.json", files)
    assert rec.verified("rootfs.ext4") == 0
    rec.set("rootfs.ext4", 700)
    rec.save()
    again = ResumeRecord.load(tmp_path / ".progress.json", files)
    assert again.verified("rootfs.ext4") == 700 and again.verified("config.json") == 0
    changed = [{**files[0], "sha256": "3" * 64}, files[1]]
    assert ResumeRecord.load(tmp_path / ".progress.json", changed).verified("rootfs.ext4") == 0
    (tmp_path / ".progress.json").write_text("{not json")
    assert ResumeRecord.load(tmp_path / ".progress.json", files).verified("rootfs.ext4") == 0


def test_sparse_write_skips_zero_blocks(tmp_path: Path) -> None:
    """Zero 4 KiB blocks inside a chunk stay holes; the bytes read back are the same."""
    path = tmp_path / "f"
    data = os.urandom(4096) + bytes(64 * 4096) + os.urandom(100)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, 1 << 20)
        _write_sparse(fd, 4096, data)
    finally:
        os.close(fd)
    raw = path.read_bytes()
    assert raw[4096:4096 + len(data)] == data
    assert path.stat().st_blocks * 512 < 32 * 4096  # the 256 KiB of zeros took no blocks


# --- messages ------------------------------------------------------------------------------

def test_transfer_messages_validate() -> None:
    """WIRE-3, WIRE-16: FETCH length ≤ 1 MiB, tokens are 64 hex, CHUNK carries its digest."""
    Fetch(msg_id="f1", artifact_id=ART, file="rootfs.ext4", offset=0, length=1 << 20, token=TOKEN)
    with pytest.raises(MalformedMessage) as exc:
        Fetch(msg_id="f1", artifact_id=ART, file="rootfs.ext4", offset=0, length=(1 << 20) + 1, token=TOKEN)
    assert exc.value.details["field"] == "length"
    for bad in ("../etc/passwd", ".progress.json", "a/b", ""):
        with pytest.raises(MalformedMessage):
            Fetch(msg_id="f1", artifact_id=ART, file=bad, offset=0, length=1, token=TOKEN)
    with pytest.raises(MalformedMessage):
        GrantMsg(msg_id="g", artifact_id=ART, token="xyz", expires=1, target_node="node-b", target_key="")
    GrantMsg(msg_id="g", artifact_id=ART, token=TOKEN, expires=1, target_node="node-b", target_key=KEY)
    data = b"hello"
    c = Chunk(parent_id="f1", artifact_id=ART, file="config.json", offset=0, length=5, data=data,
              sha256=hashlib.sha256(data).hexdigest(), eof=True)
    assert Chunk.from_body(c.to_body()) == c
    TokenRequest(msg_id="t1", artifact_id=ART, source_node="node-a")
    TokenGrant(parent_id="t1", artifact_id=ART, token=TOKEN, expires=5)


def test_token_broker_without_a_session_fails_expired() -> None:
    """DIST-5: with no coordinator session to ask, an expired grant ends the task TransferTokenExpired."""
    from agent.fetchstate import TokenBroker
    broker = TokenBroker(wait=0.2)
    with pytest.raises(TransferTokenExpired):
        broker.request(ART, "node-a", None)


def test_token_broker_round_trip() -> None:
    """DIST-5: TOKEN_REQUEST goes out through the attached session; the TOKEN answering it ends the wait."""
    import asyncio
    import threading

    from agent.fetchstate import TokenBroker

    async def scenario() -> tuple[str, int]:
        broker = TokenBroker(wait=5)
        sent: list[TokenRequest] = []

        async def send(msg: TokenRequest) -> bool:
            sent.append(msg)
            loop.call_later(0.05, broker.on_token, TokenGrant(parent_id=msg.msg_id, artifact_id=ART, token=TOKEN,
                                                              expires=99))
            return True

        loop = asyncio.get_running_loop()
        broker.attach(send, loop)  # type: ignore[arg-type]
        out: list[tuple[str, int]] = []
        t = threading.Thread(target=lambda: out.append(broker.request(ART, "node-a", None)))
        t.start()
        await async_wait_for(lambda: not t.is_alive(), 30, "the token request", 0.01)
        assert sent and sent[0].source_node == "node-a"
        return out[0]

    assert asyncio.run(scenario()) == (TOKEN, 99)
