"""Field validators for message schemas (SPEC WIRE-3).

A validator is a callable ``(value, path) -> value`` that returns the (possibly
normalised) value or raises the schema's error with ``details.field`` naming the path.
The same validators check admin arguments, where the error is InvalidRequest instead of
MalformedMessage; ``SchemaError`` carries the field and reason so the caller picks.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable

Validator = Callable[[Any, str], Any]


class SchemaError(ValueError):
    """A value broke its schema; ``field`` is a dotted path, ``reason`` a short text."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def Str(max_len: int = 1024, pattern: re.Pattern[str] | None = None, min_len: int = 0,
        what: str = "") -> Validator:
    def v(x: Any, p: str) -> str:
        if not isinstance(x, str):
            raise SchemaError(p, f"expected a string, got {_tname(x)}")
        if len(x) > max_len or len(x) < min_len:
            raise SchemaError(p, f"length {len(x)} is outside {min_len}..{max_len}")
        if pattern is not None and pattern.match(x) is None:
            raise SchemaError(p, f"{x[:80]!r} is not a valid {what or 'value'}")
        return x
    return v


def Int(lo: int = -(2**63), hi: int = 2**63 - 1) -> Validator:
    def v(x: Any, p: str) -> int:
        if type(x) is not int:  # bool is an int subclass: refuse it on purpose
            raise SchemaError(p, f"expected an integer, got {_tname(x)}")
        if x < lo or x > hi:
            raise SchemaError(p, f"{x} is outside {lo}..{hi}")
        return x
    return v


def Num(lo: float, hi: float) -> Validator:
    def v(x: Any, p: str) -> float:
        if type(x) not in (int, float) or x != x:
            raise SchemaError(p, f"expected a number, got {_tname(x)}")
        if x < lo or x > hi:
            raise SchemaError(p, f"{x} is outside {lo}..{hi}")
        return x
    return v


def Bool() -> Validator:
    def v(x: Any, p: str) -> bool:
        if type(x) is not bool:
            raise SchemaError(p, f"expected a boolean, got {_tname(x)}")
        return x
    return v


def Bin(max_len: int) -> Validator:
    def v(x: Any, p: str) -> bytes:
        if not isinstance(x, (bytes, bytearray)):
            raise SchemaError(p, f"expected bytes, got {_tname(x)}")
        if len(x) > max_len:
            raise SchemaError(p, f"length {len(x)} exceeds {max_len}")
        return bytes(x)
    return v


def Enum(values: Iterable[str]) -> Validator:
    allowed = frozenset(values)
    shown = ", ".join(sorted(allowed))

    def v(x: Any, p: str) -> str:
        if not isinstance(x, str) or x not in allowed:
            # Never str() a hostile value: a deeply nested list would recurse (WIRE-5).
            got = x[:40] if isinstance(x, str) else _tname(x)
            raise SchemaError(p, f"{got!r} is not one of {shown}")
        return x
    return v


def Scalar(max_str: int = 4096) -> Validator:
    def v(x: Any, p: str) -> Any:
        if x is None or type(x) in (bool, int, float):
            return x
        if isinstance(x, str):
            if len(x) > max_str:
                raise SchemaError(p, f"length {len(x)} exceeds {max_str}")
            return x
        raise SchemaError(p, f"expected a scalar, got {_tname(x)}")
    return v


def Any_() -> Validator:
    """Any decoded value (the codec limits already bound it)."""
    return lambda x, p: x


def List(item: Validator, max_len: int = 10_000) -> Validator:
    def v(x: Any, p: str) -> list[Any]:
        if not isinstance(x, (list, tuple)):
            raise SchemaError(p, f"expected a list, got {_tname(x)}")
        if len(x) > max_len:
            raise SchemaError(p, f"{len(x)} items exceed {max_len}")
        return [item(e, f"{p}[{i}]") for i, e in enumerate(x)]
    return v


def Map(value: Validator, key: Validator | None = None, max_len: int = 1000) -> Validator:
    key = key or Str(256)

    def v(x: Any, p: str) -> dict[str, Any]:
        if not isinstance(x, dict):
            raise SchemaError(p, f"expected a map, got {_tname(x)}")
        if len(x) > max_len:
            raise SchemaError(p, f"{len(x)} entries exceed {max_len}")
        return {key(k, f"{p}.<key>"): value(val, f"{p}.{k}") for k, val in x.items()}
    return v


def Struct(required: dict[str, Validator], optional: dict[str, Validator] | None = None) -> Validator:
    """A map with named keys; unknown keys are dropped (forward compatibility)."""
    optional = optional or {}

    def v(x: Any, p: str) -> dict[str, Any]:
        if not isinstance(x, dict):
            raise SchemaError(p, f"expected a map, got {_tname(x)}")
        out: dict[str, Any] = {}
        for k, fv in required.items():
            if k not in x:
                raise SchemaError(f"{p}.{k}", "is required")
            out[k] = fv(x[k], f"{p}.{k}")
        for k, fv in optional.items():
            if k in x and x[k] is not None:
                out[k] = fv(x[k], f"{p}.{k}")
        return out
    return v


def _tname(x: Any) -> str:
    return "null" if x is None else type(x).__name__
