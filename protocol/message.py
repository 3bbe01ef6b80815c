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
from . import envelope
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
            envelope._KNOWN_TYPES[cls.TYPE.encode("ascii")] = cls.TYPE

    @classmethod
    def _spec(cls) -> tuple[tuple[str, Validator, bool], ...]:
        # Computed once per (slotted) class: the field list, its validators and requiredness.
        try:
            return cls.__dict__["_SPEC_CACHE"]  # type: ignore[no-any-return]
        except KeyError:
            spec = tuple((f.name, f.metadata["v"], f.metadata["req"])
                         for f in dataclasses.fields(cls))  # type: ignore[arg-type]
            setattr(cls, "_SPEC_CACHE", spec)
            return spec

    @classmethod
    def _validated(cls, get: Any) -> dict[str, Any]:
        """Every field's checked value, reading raw values with ``get(name)``."""
        out: dict[str, Any] = {}
        for name, v, required in cls._spec():
            val = get(name)
            if val is None:
                if required:
                    raise MalformedMessage(f"{cls.TYPE}: field {name} is required",
                                           {"field": name, "reason": "required"})
                out[name] = None
                continue
            try:
                out[name] = v(val, name)
            except SchemaError as exc:
                raise MalformedMessage(f"{cls.TYPE}: {exc.field}: {exc.reason}",
                                       {"field": exc.field, "reason": exc.reason}) from None
        return out

    def __post_init__(self) -> None:
        for name, val in self._validated(lambda n: getattr(self, n)).items():
            object.__setattr__(self, name, val)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "Message":
        """Validate a decoded body once and build the instance without a second pass; unknown
        fields are ignored (WIRE-3). This is the heartbeat hot path, hence no ``cls(**kw)``."""
        values = cls._validated(body.get)
        obj = object.__new__(cls)
        for name, val in values.items():
            object.__setattr__(obj, name, val)
        return obj

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
