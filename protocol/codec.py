"""msgpack codec with the WIRE-2 limits enforced before anything is allocated.

msgpack's unpacker checks each declared length against ``max_*_len`` before it allocates
the object, so a 4-byte header claiming a 2 GiB string costs nothing. The frame size is
checked by the caller on the raw frame (``check_frame``) before decoding starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import MalformedMessage

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Codec limits (SPEC WIRE-2, CFG `codec.*`)."""
    max_frame: int = 16 * MiB
    max_str: int = 1 * MiB
    max_bin: int = 16 * MiB
    max_array: int = 100_000
    max_map: int = 10_000


DEFAULT_LIMITS = Limits()


def check_frame(size: int, limits: Limits = DEFAULT_LIMITS, what: str = "frame") -> None:
    if size > limits.max_frame:
        raise MalformedMessage(f"{what} of {size} bytes exceeds the {limits.max_frame}-byte limit",
                               {"field": what, "reason": "too_large", "limit": limits.max_frame})


def decode(body: bytes, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Decode one message body: a msgpack map with string keys, within ``limits``."""
    if len(body) > limits.max_frame:
        check_frame(len(body), limits, "body")
    try:
        obj = msgpack.unpackb(
            body, raw=False, strict_map_key=True, use_list=True,
            max_str_len=limits.max_str, max_bin_len=limits.max_bin,
            # Every element takes at least one byte, so no container can truly hold more items
            # than the body has bytes: capping by the body size bounds what a lying header
            # makes msgpack preallocate.
            max_array_len=min(limits.max_array, len(body)), max_map_len=min(limits.max_map, len(body) // 2),
            max_ext_len=0,  # no ext types on our wire (timestamps are ints)
        )
    except ValueError as exc:  # msgpack raises ValueError subclasses for limits and bad data
        raise MalformedMessage(f"undecodable body: {exc}", {"field": "body", "reason": "decode"}) from None
    except Exception as exc:  # noqa: BLE001 — any decoder fault on hostile input is a malformed body
        raise MalformedMessage(f"undecodable body: {type(exc).__name__}", {"field": "body", "reason": "decode"}) from None
    if not isinstance(obj, dict):
        raise MalformedMessage("body must be a map", {"field": "body", "reason": "not_a_map"})
    return obj


def encode(obj: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> bytes:
    data = msgpack.packb(obj, use_bin_type=True)
    check_frame(len(data), limits, "body")
    return data
