"""The TC1 envelope (SPEC WIRE-1): ``[identity] [b"TC1"] [type] [msgpack body]``."""
from __future__ import annotations

import msgpack
import pytest

from protocol import envelope
from protocol.codec import Limits
from protocol.envelope import PROTOCOL, Envelope, FrameDropped, parse
from protocol.errors import MalformedMessage, UnsupportedMessage, UnsupportedProtocol
from protocol.message import decode_message
from protocol.messages import Heartbeat, TaskCancel

BODY = msgpack.packb({"msg_id": "m-1"})
IDENT = b"node-1"


def _both(frames: list[bytes]) -> list[tuple[list[bytes], bool]]:
    """The same logical message as a DEALER sees it and as a ROUTER sees it."""
    return [(frames, False), ([IDENT, *frames], True)]


# --- protocol frame -------------------------------------------------------------------

@pytest.mark.parametrize("proto", [b"TC2", b"TC0", b"TC10", b"TC999999"])
@pytest.mark.parametrize("router", [False, True])
def test_other_major_is_unsupported_protocol(proto: bytes, router: bool) -> None:
    """WIRE-1: a first frame TC<n>, n != 1, gets UnsupportedProtocol naming both versions."""
    frames = [proto, b"HELLO", BODY]
    with pytest.raises(UnsupportedProtocol) as ei:
        parse([IDENT, *frames] if router else frames, router=router)
    exc = ei.value
    assert exc.code == 1001
    assert exc.details == {"supported": "TC1", "got": proto.decode()}
    assert proto.decode() in exc.message


def test_unsupported_protocol_regardless_of_remaining_frames() -> None:
    """WIRE-1: the major is judged first, so TC2 with any frame count is UnsupportedProtocol."""
    for rest in ([], [b"HELLO"], [b"hello", b"x", b"y", b"z"]):
        with pytest.raises(UnsupportedProtocol):
            parse([b"TC2", *rest], router=False)


@pytest.mark.parametrize("proto", [
    b"", b"T", b"TC", b"tc1", b"TC1 ", b" TC1", b"TC1\x00", b"XYZ", b"GET / HTTP/1.1",
    b"TCx", b"TC1234567", b"TC1" + b"\x00" * 20, b"\xff\xfe", b"TC-1",
])
@pytest.mark.parametrize("router", [False, True])
def test_non_tc_first_frame_is_dropped(proto: bytes, router: bool) -> None:
    """WIRE-1: a first frame not of the form TC<n> is dropped (and counted), with no reply."""
    frames = [proto, b"HELLO", BODY]
    with pytest.raises(FrameDropped) as ei:
        parse([IDENT, *frames] if router else frames, router=router)
    assert ei.value.reason


def test_frame_dropped_is_not_a_wire_error() -> None:
    """WIRE-1: a drop gets no reply, so FrameDropped is not one of the table's errors."""
    from protocol.errors import TCError
    assert not issubclass(FrameDropped, TCError)


# --- frame counts -----------------------------------------------------------------------

@pytest.mark.parametrize("router", [False, True])
def test_no_frames_is_dropped(router: bool) -> None:
    """WIRE-1: an empty message cannot be answered: dropped."""
    with pytest.raises(FrameDropped):
        parse([], router=router)


def test_router_identity_only_is_dropped() -> None:
    """WIRE-1: a ROUTER message with nothing after the identity is dropped."""
    with pytest.raises(FrameDropped):
        parse([IDENT], router=True)


@pytest.mark.parametrize("after", [
    [PROTOCOL],
    [PROTOCOL, b"HELLO"],
    [PROTOCOL, b"HELLO", BODY, b""],
    [PROTOCOL, b"HELLO", BODY, BODY, BODY],
], ids=["1", "2", "4", "5"])
def test_wrong_frame_count_is_malformed(after: list[bytes]) -> None:
    """WIRE-1: TC1 followed by anything but exactly type + body is MalformedMessage (field frames)."""
    for frames, router in _both(after):
        with pytest.raises(MalformedMessage) as ei:
            parse(frames, router=router)
        assert ei.value.details == {"field": "frames", "reason": "count"}


def test_dealer_parsing_a_router_message_sees_a_bad_protocol_frame() -> None:
    """WIRE-1: framing depends on the socket side; an identity in first position is not TC1."""
    with pytest.raises(FrameDropped):
        parse([IDENT, PROTOCOL, b"HELLO", BODY], router=False)


# --- type frame ----------------------------------------------------------------------

@pytest.mark.parametrize("raw_type", [
    b"hello", b"Hello", b"HELLo", b"", b"A" * 33, "HÉLLO".encode(), b"HEL LO", b"HELLO\n",
    b"1HELLO", b"_HELLO", b"HEL-LO", b"HELLO\x00", b"\xff", b"TASK.RESULT",
], ids=lambda b: repr(b)[:30])
def test_bad_type_frame_is_malformed(raw_type: bytes) -> None:
    """WIRE-1: the type is ASCII upper-case letters, digits and _, at most 32 bytes."""
    for frames, router in _both([PROTOCOL, raw_type, BODY]):
        with pytest.raises(MalformedMessage) as ei:
            parse(frames, router=router)
        assert ei.value.details == {"field": "type", "reason": "format"}


@pytest.mark.parametrize("raw_type", [b"A", b"A" * 32, b"TASK_RESULT", b"X9_"])
def test_good_type_frames(raw_type: bytes) -> None:
    """WIRE-1: up to 32 bytes of [A-Z][A-Z0-9_]* is a well-formed type (known or not)."""
    env = parse([PROTOCOL, raw_type, BODY], router=False)
    assert env.msg_type == raw_type.decode()


def test_body_over_frame_limit_is_malformed() -> None:
    """WIRE-2: the envelope checks the raw body frame against max_frame before any decoding."""
    limits = Limits(max_frame=16)
    parse([PROTOCOL, b"HELLO", b"\x00" * 16], router=False, limits=limits)
    with pytest.raises(MalformedMessage) as ei:
        parse([PROTOCOL, b"HELLO", b"\x00" * 17], router=False, limits=limits)
    assert ei.value.details["reason"] == "too_large"
    assert ei.value.details["limit"] == 16


# --- router vs dealer, and a real round trip ----------------------------------------------

def test_router_and_dealer_framing() -> None:
    """WIRE-1: ROUTER side carries the identity first; DEALER side has none."""
    env = parse([IDENT, PROTOCOL, b"HEARTBEAT", BODY], router=True)
    assert env == Envelope(IDENT, "HEARTBEAT", BODY)
    env = parse([PROTOCOL, b"HEARTBEAT", BODY], router=False)
    assert env == Envelope(None, "HEARTBEAT", BODY)


def test_frames_helper() -> None:
    """WIRE-1: frames() builds the exact layout parse() reads."""
    assert envelope.frames("TASK", b"\x80") == [b"TC1", b"TASK", b"\x80"]
    assert envelope.frames("TASK", b"\x80", b"id") == [b"id", b"TC1", b"TASK", b"\x80"]


def _heartbeat() -> Heartbeat:
    return Heartbeat(msg_id="hb-1", session_id="0123456789abcdef", seq=7, catalog_seq=3,
                     catalog_digest="a" * 64, versions_digest="b" * 64, refs_digest="",
                     storage={"total": 100, "used": 40, "free": 60}, mem_free=1 << 30, sandboxes=2)


def test_round_trip_via_message_to_frames_dealer() -> None:
    """WIRE-1 / WIRE-3: Message.to_frames → parse → decode_message gives an equal message."""
    msg = _heartbeat()
    frames = msg.to_frames()
    assert frames[0] == b"TC1" and frames[1] == b"HEARTBEAT" and len(frames) == 3
    env = parse(frames, router=False)
    assert env.identity is None
    assert decode_message(env) == msg


def test_round_trip_via_message_to_frames_router() -> None:
    """WIRE-1: a ROUTER reply carries the peer identity first; the receiver sees the same message."""
    msg = TaskCancel(msg_id="c-1", task_id="tsk-" + "0" * 24)
    frames = msg.to_frames(identity=IDENT)
    assert frames[0] == IDENT
    env = parse(frames, router=True)
    assert env.identity == IDENT
    assert decode_message(env) == msg


def test_memoryview_frames_are_accepted() -> None:
    """WIRE-1: pyzmq may hand over buffer objects; they parse like bytes."""
    frames = [memoryview(f) for f in _heartbeat().to_frames(identity=IDENT)]
    env = parse(frames, router=True)
    assert env.identity == IDENT and isinstance(env.body, bytes)
    assert decode_message(env) == _heartbeat()


def test_unknown_type_is_unsupported_message() -> None:
    """WIRE-1 / §1: a well-formed but unknown type is UnsupportedMessage naming it."""
    env = parse([PROTOCOL, b"NO_SUCH_TYPE", BODY], router=False)
    with pytest.raises(UnsupportedMessage) as ei:
        decode_message(env)
    assert ei.value.code == 1003
    assert ei.value.details["type"] == "NO_SUCH_TYPE"
