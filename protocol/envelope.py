"""The TC1 envelope (SPEC WIRE-1): ``[identity] [b"TC1"] [type] [msgpack body]``.

``parse`` turns raw frames into ``(identity, type, body-bytes)`` and tells the caller, by
exception, which of the three outcomes applies to a bad frame:

* ``FrameDropped`` — no reply is possible or deserved (not a TC frame, wrong frame count
  before we even know the protocol): drop it and count it.
* ``UnsupportedProtocol`` — ``TC<n>`` with n != 1: reply with that error, serve nothing.
* ``MalformedMessage`` — our protocol but a broken frame: reply with that error.
"""
from __future__ import annotations

import re
from typing import NamedTuple

from .codec import DEFAULT_LIMITS, Limits, check_frame
from .errors import MalformedMessage, UnsupportedProtocol

PROTOCOL = b"TC1"
MAJOR = 1
MAX_TYPE_LEN = 32
_TYPE_RE = re.compile(rb"[A-Z][A-Z0-9_]{0,31}\Z")
_TC_RE = re.compile(rb"TC([0-9]{1,6})\Z")


class FrameDropped(Exception):
    """A frame that gets no reply: it is dropped and counted (reason in ``args[0]``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Envelope(NamedTuple):
    # A NamedTuple, not a dataclass: built once per received message, so it must be cheap.
    identity: bytes | None
    msg_type: str
    body: bytes


def parse(frames: list[bytes], *, router: bool, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Split and check one multipart message. ``router``: the first frame is the peer identity."""
    identity: bytes | None = None
    if router:
        if not frames:
            raise FrameDropped("empty message")
        identity, frames = bytes(frames[0]), frames[1:]
    if not frames:
        raise FrameDropped("no protocol frame")
    proto = frames[0]
    if proto != PROTOCOL:
        proto = bytes(proto[:16])
        m = _TC_RE.match(proto)
        if m is None:
            raise FrameDropped("not a TC frame")
        raise UnsupportedProtocol(
            f"protocol {proto.decode()} is not supported; this peer speaks {PROTOCOL.decode()}",
            {"supported": PROTOCOL.decode(), "got": proto.decode()})
    if len(frames) != 3:
        raise MalformedMessage(f"expected 3 frames after the identity, got {len(frames)}",
                               {"field": "frames", "reason": "count"})
    raw_type, body = frames[1], frames[2]
    msg_type = _KNOWN_TYPES.get(raw_type)  # the common case: a type we have seen, no regex
    if msg_type is None:
        if len(raw_type) > MAX_TYPE_LEN or not _TYPE_RE.match(bytes(raw_type)):
            raise MalformedMessage("message type must be 1-32 upper-case ASCII letters, digits or _",
                                   {"field": "type", "reason": "format"})
        msg_type = bytes(raw_type).decode("ascii")
    if len(body) > limits.max_frame:
        check_frame(len(body), limits)
    return Envelope(identity, msg_type, body if type(body) is bytes else bytes(body))


# Filled by protocol.message as message classes register: raw type frame -> type name.
_KNOWN_TYPES: dict[bytes, str] = {}


def frames(msg_type: str, body: bytes, identity: bytes | None = None) -> list[bytes]:
    out = [PROTOCOL, msg_type.encode("ascii"), body]
    return [identity, *out] if identity is not None else out
