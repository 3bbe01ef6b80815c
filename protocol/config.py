"""Typed configuration from TOML plus ``--set section.key=value`` (SPEC CFG-1, CFG-2).

Each daemon declares a root dataclass whose fields are section dataclasses; the field
annotations are the schema. Durations read ``500ms``/``2s``/``15m``/``2h``/``7d`` (or a
number of seconds), sizes ``16MiB``/``1G`` (all suffixes ×1024, CONV-3), percentages
``70%``. An unknown section or key, or a value of the wrong shape, raises ConfigError
naming ``section.key`` — the daemon prints it and stops.
"""
from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, NewType, TypeVar

from .codec import Limits

Duration = NewType("Duration", float)   # seconds
Size = NewType("Size", int)             # bytes
Percent = NewType("Percent", float)     # 0..100

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid; the message names the key."""


_DUR = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*\Z")
_DUR_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]?)(i?B?)\s*\Z", re.I)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_duration(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("expected a duration such as 500ms, 2s, 15m, 2h or 7d")
    if isinstance(v, (int, float)):
        if not math.isfinite(v) or v < 0:
            raise ValueError("a duration must be a finite, non-negative number of seconds")
        return float(v)
    m = _DUR.match(str(v))
    if not m:
        raise ValueError(f"{v!r} is not a duration such as 500ms, 2s, 15m, 2h or 7d")
    return float(m.group(1)) * _DUR_UNITS[m.group(2)]


def parse_size(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("expected a size such as 512MiB or 20G")
    if isinstance(v, int):
        if v < 0:
            raise ValueError("a size cannot be negative")
        return v
    m = _SIZE.match(str(v))
    if not m:
        raise ValueError(f"{v!r} is not a size such as 512MiB or 20G")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def parse_percent(v: Any) -> float:
    s = str(v).strip()
    if isinstance(v, bool):
        raise ValueError("expected a percentage such as 70%")
    f = float(s[:-1]) if s.endswith("%") else float(s)
    if not 0 <= f <= 100:
        raise ValueError(f"{v!r} is not a percentage between 0 and 100")
    return f


def format_duration(seconds: float) -> str:
    for unit, mult in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= mult and seconds % mult == 0:
            return f"{int(seconds // mult)}{unit}"
    return f"{int(round(seconds * 1000))}ms"


def _coerce(hint: Any, v: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "unset")):
            return None
        return _coerce(args[0], v, key)
    if hint is Duration:
        return parse_duration(v)
    if hint is Size:
        return parse_size(v)
    if hint is Percent:
        return parse_percent(v)
    if hint is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return v.lower() in ("true", "yes", "on", "1")
        raise ValueError(f"{v!r} is not a boolean")
    if hint is int:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise ValueError(f"{v!r} is not an integer")
        return int(v)
    if hint is float:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ValueError(f"{v!r} is not a number")
        return float(v)
    if hint is str:
        if not isinstance(v, str):
            raise ValueError(f"{v!r} is not a string")
        return v
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(v, str):
            v = _set_list(v)
        if not isinstance(v, list):
            raise ValueError(f"{v!r} is not a list")
        return [_coerce(item, e, key) for e in v]
    if origin is dict:
        _, val = typing.get_args(hint)
        if not isinstance(v, dict):
            raise ValueError(f"{v!r} is not a table")
        return {str(k): _coerce(val, e, f"{key}.{k}") for k, e in v.items()}
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def _set_list(text: str) -> list[Any]:
    """A list given on the command line: TOML (``["a", "b"]``) or comma-separated. A value
    that starts with ``[`` but has no quotes is not TOML: a CURVE key in Z85 may start with
    ``[`` (its alphabet has brackets but no quotes or commas), so it is one plain item."""
    stripped = text.strip()
    if stripped.startswith("[") and ('"' in stripped or "'" in stripped or stripped == "[]"):
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{text!r} is not a TOML list: {exc}") from None
    return [s for s in (p.strip() for p in text.split(",")) if s]


def load(root_cls: type[T], path: str | Path | None = None, sets: list[str] | tuple[str, ...] = ()) -> T:
    """Build ``root_cls`` from defaults, then the TOML file, then each ``--set``."""
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{section}: expected a [{section}] table")
            raw.setdefault(section, {}).update(table)
    for item in sets:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        head, dot2, rest = name.partition(".")
        if dot2:  # a table key such as agent.labels.rack=r1 or agent.versions.guest_image=x
            table = raw.setdefault(section, {}).setdefault(head, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {item!r}: {section}.{head} is not a table")
            table[rest] = value.strip()
        else:
            raw.setdefault(section, {})[name] = value.strip()  # typed by _coerce
    return build(root_cls, raw)


def build(root_cls: type[T], raw: dict[str, dict[str, Any]]) -> T:
    root_hints = typing.get_type_hints(root_cls)
    sections: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(root_cls)}  # type: ignore[arg-type]
    for section in raw:
        if section not in known:
            keys = ", ".join(f"{section}.{k}" for k in raw[section]) or f"[{section}]"
            raise ConfigError(f"unknown key {keys}: there is no [{section}] section "
                              f"(known: {', '.join(sorted(known))})")
    for f in dataclasses.fields(root_cls):  # type: ignore[arg-type]
        sec_cls = root_hints[f.name]
        values = raw.get(f.name, {})
        hints = typing.get_type_hints(sec_cls)
        names = {g.name for g in dataclasses.fields(sec_cls)}
        kwargs: dict[str, Any] = {}
        for k, v in values.items():
            if k not in names:
                raise ConfigError(f"unknown key {f.name}.{k}")
            try:
                kwargs[k] = _coerce(hints[k], v, f"{f.name}.{k}")
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"invalid value for {f.name}.{k}: {exc}") from None
        try:
            sections[f.name] = sec_cls(**kwargs)
        except ValueError as exc:  # a section's __post_init__ cross-checks
            raise ConfigError(f"[{f.name}] {exc}") from None
    return root_cls(**sections)


# --- sections both daemons read ------------------------------------------------------

section = dataclasses.dataclass(frozen=True, slots=True)


@section
class CodecConfig:
    """WIRE-2 limits."""
    max_frame: Size = Size(16 << 20)
    max_str: Size = Size(1 << 20)
    max_bin: Size = Size(16 << 20)
    max_array: int = 100_000
    max_map: int = 10_000

    def __post_init__(self) -> None:
        # msgpack reads a negative limit as "use my default": refuse it rather than lose the limit.
        for name in ("max_frame", "max_str", "max_bin", "max_array", "max_map"):
            if getattr(self, name) <= 0:
                raise ValueError(f"codec.{name} must be positive")

    def limits(self) -> Limits:
        return Limits(self.max_frame, self.max_str, self.max_bin, self.max_array, self.max_map)


@section
class ZmqConfig:
    """WIRE-20 socket options."""
    hwm: int = 10_000
    linger: Duration = Duration(1.0)


@section
class SecurityConfig:
    """SEC-1, SEC-3, SEC-8."""
    curve: bool = True
    max_bad_msgs: int = 100
    bad_peer_cooldown: Duration = Duration(60.0)
    max_pending_keys: int = 1000


@section
class TaskConfig:
    accept_timeout: Duration = Duration(10.0)
    resend: int = 3
    progress_interval: Duration = Duration(1.0)
    record_retention: Duration = Duration(7 * 86400.0)


@section
class CatalogConfig:
    delta_coalesce: Duration = Duration(0.5)
    page_size: int = 1000


@section
class TransferConfig:
    chunk: Size = Size(1 << 20)
    window: int = 8
    chunk_retries: int = 3
    token_ttl: Duration = Duration(3600.0)
    # A source that answers nothing this long while FETCHes are outstanding fails the fetch
    # with NodeUnavailable naming it, so the coordinator can pick another source (DIST-5).
    stall_timeout: Duration = Duration(10.0)
    # Test-only fault injection on a source agent's blob endpoint; leave at the defaults.
    # test_corrupt_chunks: flip one byte in each of the first N chunks served (the digest stays
    # the true one, so targets see a bad chunk). test_chunk_delay: wait this long before each reply.
    test_corrupt_chunks: int = 0
    test_chunk_delay: Duration = Duration(0.0)

    def __post_init__(self) -> None:
        if not 1 <= self.chunk <= 1 << 20:
            raise ValueError("transfer.chunk must be from 1 B to 1 MiB (WIRE-16)")
        if self.window < 1 or self.chunk_retries < 1:
            raise ValueError("transfer.window and transfer.chunk_retries must be at least 1")
        if self.stall_timeout <= 0:
            raise ValueError("transfer.stall_timeout must be positive")
        if self.test_corrupt_chunks < 0 or self.test_chunk_delay < 0:
            raise ValueError("transfer.test_corrupt_chunks and transfer.test_chunk_delay must not be negative")


@section
class ImageConfig:
    platform: str = "linux/amd64"
    default_registry: str = "registry-1.docker.io"
    insecure_registries: list[str] = dataclasses.field(default_factory=list)
    local_roots: list[str] = dataclasses.field(default_factory=lambda: ["/var/lib/templatecenter/import"])
    layer_concurrency: int = 4
    registry_retries: int = 3
    cache_budget: Size = Size(20 << 30)
    cache_low_water: Percent = Percent(90.0)
    # Per-registry-host credentials (IMG-4): TOML, {"HOST[:PORT]" = {username, password}}; "" = none.
    credentials_file: str = ""


@section
class BuildConfig:
    default_writable: Size = Size(1 << 30)
    max_writable: Size = Size(1 << 40)
    min_size: Size = Size(64 << 20)
    inode_factor: float = 1.2
    inode_extra: int = 1024
    inode_per_writable: Size = Size(16 << 10)
    slack: Percent = Percent(5.0)
    journal_small: Size = Size(16 << 20)
    journal_large: Size = Size(64 << 20)
    grow_factor: float = 1.25
    grow_retries: int = 2
    space_factor: int = 4
    max_builders: int = 2
    wait_poll: Duration = Duration(5.0)
    # Unpacked root trees kept for reuse by derived images (agent/image/chains.py); 0 = off.
    tree_cache: int = 2
