"""The base of every wire message: one frozen, validated class per message type (WIRE-3).

A subclass declares ``TYPE`` and its fields with ``req(validator)`` / ``opt(validator)``;
``__init_subclass__`` registers it, so the decoder finds the class by type name. Fields are
validated when an instance is built (before encode) and when a body is decoded; unknown body
fields are ignored, so a newer peer of the same major can add fields freely.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from . import codec
from .envelope import Envelope, frames as _frames
from .errors import MalformedMessage, UnsupportedMessage
from .schema import SchemaError, Validator

REGISTRY: dict[str, type["Message"]] = {}


def req(v: Validator) -> Any:
    """A required field."""
    return dataclasses.field(metadata={"v": v, "req": True})


def opt(v: Validator, default: Any = None) -> Any:
    """An optional field; ``None`` means absent and is not sent."""
    if isinstance(default, (dict, list)):
        raise TypeError("use None for an empty optional container")
    return dataclasses.field(default=default, metadata={"v": v, "req": False})


class Message:
    """Base class; subclasses are ``@dataclass(frozen=True, slots=True)``."""

    TYPE: ClassVar[str] = ""
    _SPEC: ClassVar[tuple[tuple[str, Validator, bool], ...]] = ()

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.TYPE:
            if cls.TYPE in REGISTRY and REGISTRY[cls.TYPE].__qualname__ != cls.__qualname__:
                raise TypeError(f"message type {cls.TYPE} registered twice")
            REGISTRY[cls.TYPE] = cls

    @classmethod
    def _spec(cls) -> tuple[tuple[str, Validator, bool], ...]:
        # Computed once per class: the field list, its validators and requiredness.
        spec = cls.__dict__.get("_SPEC_CACHE")
        if spec is None:
            spec = tuple((f.name, f.metadata["v"], f.metadata["req"])
                         for f in dataclasses.fields(cls))  # type: ignore[arg-type]
            setattr(cls, "_SPEC_CACHE", spec)
        return spec

    def __post_init__(self) -> None:
        for name, v, required in self._spec():
            val = getattr(self, name)
            if val is None:
                if required:
                    raise MalformedMessage(f"{self.TYPE}: field {name} is required",
                                           {"field": name, "reason": "required"})
                continue
            try:
                new = v(val, name)
            except SchemaError as exc:
                raise MalformedMessage(f"{self.TYPE}: {exc.field}: {exc.reason}",
                                       {"field": exc.field, "reason": exc.reason}) from None
            if new is not val:
                object.__setattr__(self, name, new)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "Message":
        kwargs = {name: body.get(name) for name, _, _ in cls._spec()}
        return cls(**kwargs)

    def to_body(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name, _, _ in self._spec()
                if getattr(self, name) is not None}

    def encode(self, limits: codec.Limits = codec.DEFAULT_LIMITS) -> bytes:
        return codec.encode(self.to_body(), limits)

    def to_frames(self, identity: bytes | None = None) -> list[bytes]:
        return _frames(self.TYPE, self.encode(), identity)


def decode_message(env: Envelope, limits: codec.Limits = codec.DEFAULT_LIMITS) -> Message:
    """Decode an envelope's body into its message class (WIRE-3)."""
    cls = REGISTRY.get(env.msg_type)
    if cls is None:
        raise UnsupportedMessage(f"unknown message type {env.msg_type}",
                                 {"field": "type", "reason": "unknown", "type": env.msg_type})
    return cls.from_body(codec.decode(env.body, limits))


def body_msg_id(env: Envelope) -> str | None:
    """Best-effort ``msg_id`` of a body that failed validation, for the error's parent_id."""
    try:
        body = codec.decode(env.body)
    except Exception:  # noqa: BLE001 — the body is already known to be bad
        return None
    mid = body.get("msg_id")
    return mid if isinstance(mid, str) and 0 < len(mid) <= 64 else None
