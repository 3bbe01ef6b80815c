"""Decoder fuzzing (SPEC WIRE-5, with WIRE-1, WIRE-2, WIRE-3).

Whatever arrives, ``envelope.parse`` + ``message.decode_message`` may only end in a valid
message or one of the four outcomes a socket loop knows how to handle: FrameDropped,
UnsupportedProtocol, MalformedMessage, UnsupportedMessage. Any other exception would
escape a daemon's receive loop, so it fails the test.
"""
from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import Limits
from protocol.envelope import PROTOCOL, FrameDropped, parse
from protocol.errors import MalformedMessage, UnsupportedMessage, UnsupportedProtocol
from protocol.message import REGISTRY, Message, decode_message
from protocol.messages import (Admin, CatalogDelta, CatalogSnapshot, Chunk, Error, Event, Fetch, Grant, GrantAck,
                               Heartbeat, HeartbeatAck, Hello, Progress, Result, Revoke, RuntimeRefs, Task,
                               TaskAccepted, TaskCancel, TaskProgress, TaskResult, TokenGrant, TokenRequest,
                               Versions, Welcome)

ALLOWED = (FrameDropped, UnsupportedProtocol, MalformedMessage, UnsupportedMessage)
# Sized so the whole file runs in well under 20 s; the structure-heavy properties get fewer examples.
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_HEAVY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TYPE_NAMES = sorted(REGISTRY)

H = "ab" * 32
SID = "0123456789abcdef"
TID = "tsk-" + "c" * 24
_ENTRY = {"kind": "artifact", "id": "art-" + "1" * 24, "body": {"size": 1}}

# One valid message per type: the seeds for field-level and byte-level mutation.
SEEDS: list[Message] = [
    Hello(msg_id="m1", node_id="n1", address="10.0.0.1", blob_endpoint="tcp://10.0.0.1:7713",
          facts={"cores": 4}, versions={"agent": "1"}, labels={"rack": "r1"}, capabilities={"kvm": True},
          catalog={"epoch": "e0", "seq": 1, "digest": H}, reconcile={"missing": [_ENTRY], "orphans": ["x"]},
          boot_ms=5),
    Welcome(parent_id="m1", session_id=SID, heartbeat_interval=2000, lease_ttl=15000, want_full_catalog=False),
    Heartbeat(msg_id="m2", session_id=SID, seq=1, catalog_seq=1, catalog_digest=H, versions_digest=H,
              refs_digest="", storage={"total": 10, "used": 5, "free": 5}, mem_free=1, sandboxes=0),
    HeartbeatAck(parent_id="m2", interval=1000, wants=["catalog", "versions", "refs"]),
    Versions(msg_id="m3", session_id=SID, versions={"agent": "1"}, digest=H),
    RuntimeRefs(msg_id="m4", session_id=SID, refs=[{"sandbox": "sbx-1"}], digest=""),
    CatalogSnapshot(msg_id="m5", session_id=SID, epoch="e0", seq=1, page=0, last=True, entries=[_ENTRY], digest=H),
    CatalogDelta(msg_id="m6", session_id=SID, epoch="e0", from_seq=1, to_seq=2, upserts=[_ENTRY],
                 deletes=[_ENTRY], digest=H),
    Task(msg_id="m7", task_id=TID, op="PROBE_STORAGE", args={"a": [1, {"b": b"\x00"}]}, deadline=10),
    TaskAccepted(parent_id="m7", task_id=TID),
    TaskProgress(parent_id="m7", task_id=TID, progress={"pct": 5}),
    TaskResult(parent_id="m7", task_id=TID, ok=False, result={"x": 1},
               error={"code": 1000, "name": "Internal", "message": "m", "details": {"ref": "log-1"}}),
    TaskCancel(msg_id="m8", task_id=TID),
    Admin(msg_id="m9", command="node list", args={"all": True}),
    Result(parent_id="m9", result=[1, 2, 3]),
    Progress(parent_id="m9", message="working", data={"n": 1}),
    Error(code=1002, name="MalformedMessage", message="bad", details={"field": "x"}, parent_id="m9"),
    Event(seq=1, topic="node.n1", ts=1, kind="health", data={"health": "READY"}, epoch="e"),
    # artifact transfer (WIRE-16, DIST-4, DIST-5)
    Grant(msg_id="g1", artifact_id="art-" + "1" * 24, token=H, expires=5, target_node="n2", target_key=""),
    GrantAck(parent_id="g1"),
    Revoke(msg_id="g2", artifact_id="art-" + "1" * 24, target_node="n2"),
    Fetch(msg_id="f1", artifact_id="art-" + "1" * 24, file="rootfs.ext4", offset=0, length=4, token=H),
    Chunk(parent_id="f1", artifact_id="art-" + "1" * 24, file="rootfs.ext4", offset=0, length=4,
          data=b"\x00\x01\x02\x03", sha256=H, eof=False, zero=False),
    TokenRequest(msg_id="t1", artifact_id="art-" + "1" * 24, source_node="n1", task_id=TID),
    TokenGrant(parent_id="t1", artifact_id="art-" + "1" * 24, token=H, expires=5),
]
SEED_TYPES = sorted(s.TYPE for s in SEEDS)


def feed(frames: list[Any], router: bool, limits: Limits | None = None) -> Message | None:
    """The receive path of a daemon: parse, then decode; only the allowed outcomes may escape."""
    kw = {"limits": limits} if limits is not None else {}
    try:
        env = parse(frames, router=router, **kw)
        msg = decode_message(env, **kw)
    except ALLOWED:
        return None
    assert type(msg) is REGISTRY[env.msg_type]
    return msg


def test_seeds_cover_the_registry() -> None:
    """WIRE-5: the mutation seeds include every registered message type."""
    assert SEED_TYPES == TYPE_NAMES
    for seed in SEEDS:
        assert feed(seed.to_frames(), router=False) == seed


# --- strategies --------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), st.binary(max_size=40),
)
structures = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=25,
)
type_frames = st.one_of(
    st.sampled_from(TYPE_NAMES).map(str.encode),
    st.from_regex(rb"\A[A-Z][A-Z0-9_]{0,40}\Z"),
    st.binary(max_size=40),
)


def _field_names() -> list[str]:
    import dataclasses
    return sorted({f.name for cls in REGISTRY.values() for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


FIELD_NAMES = _field_names()
bodies_with_known_fields = st.dictionaries(
    st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=10)), structures, max_size=12)


# --- properties ----------------------------------------------------------------------

@FUZZ
@given(frames=st.lists(st.binary(max_size=64), max_size=5), router=st.booleans())
def test_random_frames(frames: list[bytes], router: bool) -> None:
    """WIRE-5: 0-5 frames of random bytes never raise anything but the four outcomes."""
    feed(frames, router)


@FUZZ
@given(proto=st.one_of(st.just(PROTOCOL), st.from_regex(rb"\ATC[0-9]{1,7}\Z"), st.binary(max_size=8)),
       raw_type=type_frames, body=st.binary(max_size=200),
       extra=st.lists(st.binary(max_size=8), max_size=2), router=st.booleans())
def test_tc_frames_with_random_type_and_body(proto: bytes, raw_type: bytes, body: bytes,
                                             extra: list[bytes], router: bool) -> None:
    """WIRE-1 / WIRE-5: TC-ish protocol frames, random types and random bodies are handled."""
    frames = [proto, raw_type, body, *extra]
    feed([b"peer", *frames] if router else frames, router)


@FUZZ_HEAVY
@given(msg_type=st.sampled_from(TYPE_NAMES), body=st.one_of(bodies_with_known_fields, structures),
       router=st.booleans())
def test_valid_msgpack_under_registry_types(msg_type: str, body: Any, router: bool) -> None:
    """WIRE-3 / WIRE-5: any well-formed msgpack under a real type is a message or MalformedMessage."""
    frames = [PROTOCOL, msg_type.encode(), msgpack.packb(body, use_bin_type=True)]
    feed([b"peer", *frames] if router else frames, router)


@FUZZ_HEAVY
@given(seed=st.sampled_from(SEEDS), data=st.data())
def test_field_mutations_of_valid_messages(seed: Message, data: st.DataObject) -> None:
    """WIRE-3 / WIRE-5: replacing, dropping or adding fields of a valid body stays handled."""
    body = seed.to_body()
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "replace" and body:
            body[data.draw(st.sampled_from(sorted(body)))] = data.draw(structures)
        elif action == "drop" and body:
            del body[data.draw(st.sampled_from(sorted(body)))]
        else:
            body[data.draw(st.text(max_size=10))] = data.draw(structures)
    feed([PROTOCOL, seed.TYPE.encode(), msgpack.packb(body, use_bin_type=True)], router=False)


@FUZZ
@given(seed=st.sampled_from(SEEDS), data=st.data())
def test_byte_mutations_of_valid_messages(seed: Message, data: st.DataObject) -> None:
    """WIRE-5: bit flips, truncations, insertions and splices of encoded messages stay handled."""
    raw = bytearray(seed.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "set", "splice"]))
        if op == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "truncate":
            del raw[data.draw(st.integers(0, len(raw))):]
        elif op == "insert":
            i = data.draw(st.integers(0, len(raw)))
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=6))
        elif op == "set" and raw:
            # header bytes that claim big lengths: str32, bin32, array32, map32, ext32
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i:i + 5] = data.draw(st.sampled_from([b"\xdb", b"\xc6", b"\xdd", b"\xdf", b"\xc9"])) + b"\xff\xff\xff\xff"
        elif op == "splice":
            other = data.draw(st.sampled_from(SEEDS)).encode()
            i = data.draw(st.integers(0, len(raw)))
            j = data.draw(st.integers(0, len(other)))
            raw = bytearray(raw[:i] + other[j:])
    feed([PROTOCOL, seed.TYPE.encode(), bytes(raw)], router=False)


@FUZZ
@given(seed=st.sampled_from(SEEDS), body=st.binary(max_size=300),
       limits=st.builds(Limits, max_frame=st.integers(0, 400), max_str=st.integers(0, 50),
                        max_bin=st.integers(0, 50), max_array=st.integers(0, 10), max_map=st.integers(0, 12)))
def test_tight_limits(seed: Message, body: bytes, limits: Limits) -> None:
    """WIRE-2 / WIRE-5: under small custom limits, valid and random bodies are still only handled outcomes."""
    feed([PROTOCOL, seed.TYPE.encode(), seed.encode()], router=False, limits=limits)
    feed([PROTOCOL, seed.TYPE.encode(), body], router=False, limits=limits)


# --- targeted: deep values in every field --------------------------------------------------

def _deep_list(depth: int) -> Any:
    v: Any = None
    for _ in range(depth):
        v = [v]
    return v


def _deep_map(depth: int) -> Any:
    v: Any = None
    for _ in range(depth):
        v = {"k": v}
    return v


def test_deeply_nested_value_in_every_field() -> None:
    """WIRE-5: a value nested ~1000 deep (still within msgpack's own depth limit) in any field,
    directly, as a list item or as a map value, is a message or MalformedMessage — never a
    RecursionError escaping the decoder."""
    escaped: list[str] = []
    for seed in SEEDS:
        for field in sorted(seed.to_body()):
            for deep in (_deep_list(1000), _deep_map(1000)):
                for value in (deep, [deep], {"k": deep}):
                    body = {**seed.to_body(), field: value}
                    frames = [PROTOCOL, seed.TYPE.encode(), _pack_deep(body)]
                    try:
                        feed(frames, router=False)
                    except Exception as exc:  # noqa: BLE001 — collect every escape, then fail once
                        escaped.append(f"{seed.TYPE}.{field}: {type(exc).__name__}: {str(exc)[:60]}")
    assert not escaped, "exceptions escaped the decoder:\n" + "\n".join(sorted(set(escaped)))


def _pack_deep(obj: Any) -> bytes:
    """msgpack.packb refuses nesting past 511, but a hostile peer need not: hand-roll the encoding."""
    out = bytearray()
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, list):
            out += _array_header(len(o))
            stack.extend(reversed(o))
        elif isinstance(o, dict):
            out += _map_header(len(o))
            for k, v in reversed(list(o.items())):
                stack.append(v)
                stack.append(_Raw(msgpack.packb(k, use_bin_type=True)))
        elif isinstance(o, _Raw):
            out += o.data
        else:
            out += msgpack.packb(o, use_bin_type=True)
    return bytes(out)


class _Raw:
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def _array_header(n: int) -> bytes:
    return bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")


def _map_header(n: int) -> bytes:
    return bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")


def test_pack_deep_matches_msgpack() -> None:
    """The hand-rolled encoder above agrees with msgpack where msgpack can encode."""
    for seed in SEEDS:
        assert _pack_deep(seed.to_body()) == msgpack.packb(seed.to_body(), use_bin_type=True)
    shallow = {"a": _deep_list(50), "b": _deep_map(50)}
    assert _pack_deep(shallow) == msgpack.packb(shallow, use_bin_type=True)


# --- the heartbeat inline path agrees with the generic validator (WIRE-3, WIRE-5) ---------

from hypothesis import given as _given, settings as _settings, strategies as _st  # noqa: E402

from protocol.message import Message as _Message  # noqa: E402
from protocol.messages import Heartbeat as _Heartbeat  # noqa: E402

_GOOD_HB = {"msg_id": "abc-1", "session_id": "a" * 32, "seq": 1, "catalog_seq": 0, "catalog_digest": "",
            "versions_digest": "0" * 64, "refs_digest": "", "storage": {"total": 10, "used": 5, "free": 5},
            "mem_free": 7, "sandboxes": 0}
_ODD_VALUES = _st.one_of(_st.none(), _st.booleans(), _st.integers(-2**64, 2**64), _st.floats(allow_nan=True),
                         _st.text(max_size=70), _st.sampled_from(["", "0" * 64, "A" * 64, "a" * 8, "x" * 65]),
                         _st.dictionaries(_st.sampled_from(["total", "used", "free", "x"]),
                                          _st.integers(-5, 2**64), max_size=4),
                         _st.lists(_st.integers(), max_size=3))


def _outcome(fn, body):  # noqa: ANN001
    try:
        return ("ok", fn(body).to_body())
    except Exception as exc:  # noqa: BLE001
        return ("err", type(exc).__name__)


@_settings(max_examples=400, deadline=None)
@_given(_st.dictionaries(_st.sampled_from(sorted(_GOOD_HB)), _ODD_VALUES, max_size=4))
def test_heartbeat_inline_path_matches_generic_validation(changes) -> None:
    """Heartbeat.from_body's inline checks accept exactly what the generic schema accepts."""
    body = {**_GOOD_HB, **changes}
    generic = _outcome(lambda b: _Message.from_body.__func__(_Heartbeat, b), body)
    assert _outcome(_Heartbeat.from_body, body) == generic
