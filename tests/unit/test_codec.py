"""msgpack codec limits (SPEC WIRE-2) and body shape (WIRE-1, WIRE-3).

Oversized inputs are built from raw msgpack headers (a type byte plus a length that is
never backed by data), so the tests prove the decoder refuses them without allocating
what the header claims.
"""
from __future__ import annotations

import struct
import time
import tracemalloc
from typing import Callable

import msgpack
import pytest

from protocol import codec
from protocol.codec import DEFAULT_LIMITS, Limits, MiB, check_frame, decode, encode
from protocol.config import CodecConfig
from protocol.errors import MalformedMessage

GiB2 = 2**31  # 2 GiB, as a 32-bit msgpack length


def _malformed(body: bytes, limits: Limits = DEFAULT_LIMITS) -> MalformedMessage:
    with pytest.raises(MalformedMessage) as ei:
        decode(body, limits)
    exc = ei.value
    assert exc.code == 1002 and exc.name == "MalformedMessage"
    assert isinstance(exc.details.get("field"), str) and exc.details["field"]
    assert isinstance(exc.details.get("reason"), str) and exc.details["reason"]
    return exc


def _in_map(value_bytes: bytes) -> bytes:
    """A one-entry map {"v": <raw value>} so the body itself is a map."""
    return b"\x81\xa1v" + value_bytes


def _peak_alloc(fn: Callable[[], object]) -> tuple[int, float]:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        try:
            fn()
        except MalformedMessage:
            pass
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, elapsed


def test_defaults_match_spec() -> None:
    """WIRE-2 / CFG codec.*: frame 16 MiB, str 1 MiB, bin 16 MiB, array 100,000, map 10,000."""
    assert DEFAULT_LIMITS == Limits(16 * MiB, 1 * MiB, 16 * MiB, 100_000, 10_000)
    assert CodecConfig().limits() == DEFAULT_LIMITS


def test_round_trip_types() -> None:
    """WIRE-1: a body is a msgpack map; str stays str, bytes stays bytes, lists stay lists."""
    body = {"s": "héllo", "b": b"\x00\xff", "i": -5, "big": 2**63 - 1, "f": 1.5, "n": None,
            "t": True, "l": [1, "a", [b"x"]], "m": {"k": {"z": 0}}}
    assert decode(encode(body)) == body


# --- frame / body size -----------------------------------------------------------------

def test_body_over_max_frame() -> None:
    """WIRE-2: a body one byte over the 16 MiB frame limit is MalformedMessage before decoding."""
    body = b"\x80" + bytes(16 * MiB)  # 16 MiB + 1; would be "extra data" if it were decoded
    exc = _malformed(body)
    assert exc.details["field"] == "body"
    assert exc.details["reason"] == "too_large"
    assert exc.details["limit"] == 16 * MiB


def test_body_at_custom_max_frame_is_accepted_and_one_over_is_not() -> None:
    """WIRE-2: the frame limit is inclusive and follows custom Limits."""
    body = encode({"s": "x" * 50})
    limits = Limits(max_frame=len(body))
    assert decode(body, limits) == {"s": "x" * 50}
    exc = _malformed(body, Limits(max_frame=len(body) - 1))
    assert (exc.details["field"], exc.details["reason"]) == ("body", "too_large")


def test_check_frame_names_the_frame() -> None:
    """WIRE-2: check_frame on a raw frame size reports field and limit."""
    check_frame(16 * MiB)
    with pytest.raises(MalformedMessage) as ei:
        check_frame(16 * MiB + 1)
    assert ei.value.details == {"field": "frame", "reason": "too_large", "limit": 16 * MiB}


def test_encode_refuses_oversized_body() -> None:
    """WIRE-2: our own encoder never emits a body a peer would refuse."""
    with pytest.raises(MalformedMessage) as ei:
        encode({"b": bytes(200)}, Limits(max_frame=100))
    assert ei.value.details["field"] == "body"


# --- per-object limits, cheap headers ------------------------------------------------

HEADER_BOMBS = {
    "str32 claiming 2 GiB": _in_map(b"\xdb" + struct.pack(">I", GiB2)),
    "str32 claiming max_str + 1": _in_map(b"\xdb" + struct.pack(">I", MiB + 1)),
    "bin32 claiming 2 GiB": _in_map(b"\xc6" + struct.pack(">I", GiB2)),
    "bin32 claiming max_bin + 1": _in_map(b"\xc6" + struct.pack(">I", 16 * MiB + 1)),
    "array32 claiming 2**31 items": _in_map(b"\xdd" + struct.pack(">I", GiB2)),
    "array32 claiming max_array + 1": _in_map(b"\xdd" + struct.pack(">I", 100_001)),
    "map32 claiming 2**31 entries": _in_map(b"\xdf" + struct.pack(">I", GiB2)),
    "map32 claiming max_map + 1": _in_map(b"\xdf" + struct.pack(">I", 10_001)),
    "top-level map32 claiming 2**32 - 1": b"\xdf\xff\xff\xff\xff",
    "top-level array32 claiming 2**32 - 1": b"\xdd\xff\xff\xff\xff",
}


@pytest.mark.parametrize("body", list(HEADER_BOMBS.values()), ids=list(HEADER_BOMBS))
def test_header_bomb_is_refused_without_allocation(body: bytes) -> None:
    """WIRE-2: limits are enforced before allocation — a header claiming GiBs costs < 1 MiB and no time."""
    _malformed(body)
    peak, elapsed = _peak_alloc(lambda: decode(body))
    assert peak < 1 * MiB, f"decoder allocated {peak} bytes for a {len(body)}-byte body"
    assert elapsed < 0.5


def test_array_over_max_array_names_the_limit() -> None:
    """WIRE-2: an array header above max_array is refused on the header itself."""
    exc = _malformed(_in_map(b"\xdd" + struct.pack(">I", 100_001)))
    assert exc.details["field"] == "body"
    assert "max_array" in exc.message


def test_map_over_max_map_names_the_limit() -> None:
    """WIRE-2: a map header above max_map is refused on the header itself."""
    exc = _malformed(_in_map(b"\xdf" + struct.pack(">I", 10_001)))
    assert exc.details["field"] == "body"
    assert "max_map" in exc.message


@pytest.mark.parametrize("kind", ["str", "bin", "array", "map"])
def test_custom_limits_boundary(kind: str) -> None:
    """WIRE-2: with custom Limits, exactly the limit decodes and one more is MalformedMessage."""
    n = 8
    limits = Limits(max_str=n, max_bin=n, max_array=n, max_map=n)

    def value(k: int) -> object:
        return {"str": "x" * k, "bin": b"x" * k, "array": list(range(k)),
                "map": {f"k{i}": i for i in range(k)}}[kind]

    ok = encode({"v": value(n)})
    assert decode(ok, limits) == {"v": value(n)}
    exc = _malformed(encode({"v": value(n + 1)}), limits)
    assert exc.details["field"] == "body"
    # The default limits accept the same body: the refusal came from the custom limit.
    assert decode(encode({"v": value(n + 1)})) == {"v": value(n + 1)}


def test_real_str_over_default_max_str() -> None:
    """WIRE-2: a complete 1 MiB + 1 string is refused; exactly 1 MiB is accepted."""
    assert decode(encode({"s": "x" * MiB}))["s"] == "x" * MiB
    _malformed(msgpack.packb({"s": "x" * (MiB + 1)}))


def test_body_map_size_itself_is_limited() -> None:
    """WIRE-2: the top-level map counts against max_map too."""
    limits = Limits(max_map=3)
    _malformed(encode({"a": 1, "b": 2, "c": 3, "d": 4}), limits)


# --- body shape ---------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    msgpack.packb([1, 2]), msgpack.packb(7), msgpack.packb("map"), msgpack.packb(None),
    msgpack.packb(b"\x80"), msgpack.packb(True), msgpack.packb(1.5),
], ids=["array", "int", "str", "nil", "bin", "bool", "float"])
def test_non_map_body(body: bytes) -> None:
    """WIRE-1: the body must be a msgpack map."""
    exc = _malformed(body)
    assert exc.details == {"field": "body", "reason": "not_a_map"}


@pytest.mark.parametrize("body", [
    msgpack.packb({"a": 1}) + b"\x00",
    msgpack.packb({"a": 1}) + msgpack.packb({"b": 2}),
    b"\x80\xc0",
], ids=["one-byte", "second-map", "nil-after-map"])
def test_trailing_garbage(body: bytes) -> None:
    """WIRE-1 / WIRE-3: exactly one object per body; trailing bytes are malformed."""
    _malformed(body)


@pytest.mark.parametrize("body", [
    b"", b"\xc1", b"\x81", b"\x81\xa1a", b"\x82\xa1a\x01", b"\x81\xa3ab", b"\x81\xa1a\xcd\x01",
], ids=["empty", "never-used-byte", "map-no-key", "map-no-value", "map-short", "short-str", "short-uint16"])
def test_truncated_or_invalid(body: bytes) -> None:
    """WIRE-3: undecodable bodies are MalformedMessage with field=body."""
    exc = _malformed(body)
    assert exc.details["field"] == "body"


@pytest.mark.parametrize("body", [
    msgpack.packb({1: "int key"}),
    b"\x81\x90\x01",  # array as a key
    b"\x81\x80\x01",  # map as a key
    b"\x81\xc0\x01",  # nil as a key
], ids=["int", "array", "map", "nil"])
def test_non_string_map_keys(body: bytes) -> None:
    """WIRE-3: maps are keyed by strings; other keys are malformed, never a TypeError."""
    _malformed(body)


@pytest.mark.parametrize("ext", [
    b"\xd4\x01\x00",                       # fixext1
    b"\xd6\xff\x00\x00\x00\x01",           # timestamp32 (msgpack ext -1)
    b"\xc7\x03\x05abc",                    # ext8
    b"\xc9" + struct.pack(">I", GiB2) + b"\x05",  # ext32 claiming 2 GiB
], ids=["fixext1", "timestamp", "ext8", "ext32-bomb"])
def test_ext_types_refused(ext: bytes) -> None:
    """WIRE-2 / CONV-3: no ext types on the wire (times are unix ms integers)."""
    _malformed(_in_map(ext))


def test_moderate_nesting_is_fine() -> None:
    """WIRE-3: ordinary nesting decodes."""
    value: object = 0
    for _ in range(100):
        value = [value]
    assert decode(encode({"v": value})) == {"v": value}


@pytest.mark.parametrize("depth", [1100, 5000, 100_000])
def test_deep_nesting_is_malformed(depth: int) -> None:
    """WIRE-2 / WIRE-5: a body nested thousands deep is MalformedMessage, not a crash or RecursionError."""
    _malformed(_in_map(b"\x91" * depth + b"\xc0"))
    _malformed(_in_map(b"\x81\xa1k" * depth + b"\xc0"))


def test_nested_array_headers_refused_fast() -> None:
    """WIRE-2 / WIRE-5: a 5 KB body of 1000 nested max-size array headers fails fast."""
    body = _in_map(b"\xdd" + struct.pack(">I", 100_000)) + (b"\xdd" + struct.pack(">I", 100_000)) * 999
    t0 = time.perf_counter()
    _malformed(body)
    assert time.perf_counter() - t0 < 2.0


def test_limits_are_frozen() -> None:
    """WIRE-2: a Limits value cannot be changed after it is handed to a socket loop."""
    import dataclasses
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_LIMITS.max_str = 1  # type: ignore[misc]


def test_decode_returns_plain_dict_with_str_keys() -> None:
    """WIRE-3: decode gives a dict the schema layer can read (raw=False: str, not bytes)."""
    out = codec.decode(msgpack.packb({"msg_id": "m1", "x": [1]}, use_bin_type=True))
    assert out == {"msg_id": "m1", "x": [1]}
    assert all(type(k) is str for k in out)
