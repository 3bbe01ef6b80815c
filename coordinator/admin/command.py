"""The admin command base class and registry (STYLE 2: one module per command).

A command declares its name (``"node list"``), its arguments — from which tcctl builds its
parser — and two halves: ``execute`` runs in the coordinator, ``render`` in the CLI. Adding
a command means adding one module under ``commands/``; ``__init_subclass__`` registers it.
Commands import nothing daemon-only at module level, so tcctl can load them all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from protocol import ids
from protocol.errors import InvalidRequest
from protocol.schema import SchemaError, Str, Validator

if TYPE_CHECKING:
    from rich.console import Console

    from .context import AdminContext

REGISTRY: dict[str, type["Command"]] = {}
REQUEST_ID = Str(128, ids.REQUEST_ID, 1, "request id")


@dataclass(frozen=True, slots=True)
class Arg:
    """One argument: its wire name, CLI shape and validator."""
    name: str
    help: str
    validator: Validator
    positional: bool = False
    required: bool = False
    default: Any = None
    choices: tuple[str, ...] | None = None
    flag: bool = False          # a boolean switch (--wait)
    metavar: str | None = None
    cli: bool = True            # False: on the wire only, filled by ``client_args`` (e.g. credentials)
    many: bool = False          # a positional taking zero or more values (a list; compat rescan NODE…)

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


class Command:
    """Base of every admin command. Subclasses set ``name``, ``summary`` and ``args``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    args: ClassVar[tuple[Arg, ...]] = ()
    mutating: ClassVar[bool] = False   # takes --request-id (CLI-2)

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.name:
            if cls.name in REGISTRY:
                raise TypeError(f"admin command {cls.name!r} registered twice")
            REGISTRY[cls.name] = cls

    @classmethod
    def all_args(cls) -> tuple[Arg, ...]:
        if cls.mutating:
            return cls.args + (Arg("request_id", "idempotency key; tcctl generates one if absent", REQUEST_ID),)
        return cls.args

    @classmethod
    def client_args(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Runs in tcctl before validation: turn CLI-only inputs (a password read from stdin or
        a file) into wire arguments. Default: unchanged."""
        return raw

    @classmethod
    def cli_only(cls) -> tuple[str, ...]:
        """Argument names the CLI parses that ``client_args`` consumes (never sent)."""
        return ()

    @classmethod
    def validate(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Check the arguments (WIRE-3): InvalidRequest with details.field and details.reason."""
        spec = {a.name: a for a in cls.all_args()}
        out: dict[str, Any] = {}
        for key in raw:
            if key not in spec:
                raise InvalidRequest(f"{cls.name}: unknown argument {key}", {"field": key, "reason": "unknown"})
        for name, a in spec.items():
            val = raw.get(name)
            if val is None:
                if a.required:
                    raise InvalidRequest(f"{cls.name}: {name} is required", {"field": name, "reason": "required"})
                out[name] = a.default
                continue
            try:
                out[name] = a.validator(val, name)
            except SchemaError as exc:
                raise InvalidRequest(f"{cls.name}: {exc.field}: {exc.reason}",
                                     {"field": exc.field, "reason": exc.reason}) from None
            if a.choices and out[name] not in a.choices:
                raise InvalidRequest(f"{cls.name}: {name} must be one of {', '.join(a.choices)}",
                                     {"field": name, "reason": "choice"})
        return out

    async def execute(self, ctx: "AdminContext", args: dict[str, Any]) -> Any:  # daemon side
        raise NotImplementedError

    def render(self, result: Any, console: "Console") -> None:  # CLI side
        console.print(result)
