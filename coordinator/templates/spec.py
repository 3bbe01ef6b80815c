"""Template create requests: validation (TPL-1 to TPL-3), the sanitised form idempotency keys
on (TPL-5), and the generated runtime config (TPL-30). Pure functions, no database.

The spec is what the template keeps (``templates.spec``): everything the operator asked for,
normalised, and never the registry credentials — those travel separately, only in the
coordinator's memory and the builder's task args (IMG-4).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from protocol import ids
from protocol.canonical import digest
from protocol.errors import InvalidAlias, InvalidRequest

MIB = 1 << 20
GIB = 1 << 30
MAX_WRITABLE = 1 << 40
SNAPSHOT_MODES = ("rootfs", "memory")
COMPAT_POLICIES = ("STRICT", "GUEST_ONLY")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_USER = re.compile(r"(\d+(:\d+)?|[a-z_][a-z0-9_.-]{0,31}(:[a-z_][a-z0-9_.-]{0,31})?)\Z")
_PORT = re.compile(r"(\d{1,5})(?:/(tcp|udp|sctp))?\Z")
_PROBE = re.compile(r"(started|exec:.{1,4096}|delay:\d{1,5})\Z", re.S)
_PLATFORM = re.compile(r"[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?\Z")


def _bad(field_: str, message: str, reason: str = "invalid") -> InvalidRequest:
    return InvalidRequest(message, {"field": field_, "reason": reason})


@dataclass(frozen=True, slots=True)
class Overrides:
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: tuple[tuple[str, str], ...] = ()
    workdir: str | None = None
    user: str | None = None
    ports: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TemplateSpec:
    image: str
    alias: str | None = None
    nodes: tuple[str, ...] = ()
    builder: str | None = None
    platform: str | None = None
    writable_size: int = GIB
    overrides: Overrides = field(default_factory=Overrides)
    vcpus: int = 1
    memory_mib: int = 512
    snapshot_mode: str = "rootfs"
    probe: str = "started"
    compat_policy: str = "STRICT"

    def to_dict(self) -> dict[str, Any]:
        """The stored, canonical form (lists, sorted where order carries no meaning)."""
        d = asdict(self)
        o = d["overrides"]
        o["env"] = dict(o["env"])
        for k in ("entrypoint", "cmd"):
            o[k] = list(o[k]) if o[k] is not None else None
        o["ports"] = list(o["ports"])
        d["nodes"] = list(d["nodes"])
        return d


def _str(args: dict[str, Any], name: str, limit: int = 4096) -> str | None:
    v = args.get(name)
    if v is None or v == "":
        return None
    if not isinstance(v, str) or len(v) > limit:
        raise _bad(name, f"{name} must be a string of at most {limit} characters", "type")
    return v


def _int(args: dict[str, Any], name: str, lo: int, hi: int, default: int) -> int:
    v = args.get(name)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _bad(name, f"{name} must be an integer from {lo} to {hi}", "range")
    return v


def _argv(args: dict[str, Any], name: str) -> tuple[str, ...] | None:
    v = args.get(name)
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and len(x) <= 4096 for x in v) or len(v) > 256:
        raise _bad(name, f"{name} must be a list of strings", "type")
    return tuple(v)


def _env(raw: Any) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    pairs: list[tuple[str, str]] = []
    if isinstance(raw, dict):
        pairs = [(k, v) for k, v in raw.items()]
    elif isinstance(raw, list):
        for item in raw:
            if not isinstance(item, str) or "=" not in item:
                raise _bad("env", f"env entry {str(item)[:80]!r} is not KEY=VALUE")
            k, _, v = item.partition("=")
            pairs.append((k, v))
    else:
        raise _bad("env", "env must be a map or a list of KEY=VALUE", "type")
    out: dict[str, str] = {}
    for k, v in pairs:
        if not isinstance(k, str) or not _ENV_KEY.match(k):
            raise _bad("env", f"invalid env key {str(k)[:80]!r}")
        if not isinstance(v, str):
            raise _bad("env", f"env {k} must be a string", "type")
        out[k] = v
    return tuple(sorted(out.items()))


def port_key(port: str) -> tuple[int, str]:
    num, _, proto = port.partition("/")
    return int(num), proto


def normalise_port(value: Any) -> str:
    """``80``, ``"80"``, ``"80/tcp"`` → ``"80/tcp"``; out of 1..65535: "invalid exposed port N" (TPL-3)."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    m = _PORT.match(text) if isinstance(text, str) else None
    if m is None or not 1 <= int(m.group(1)) <= 65535:
        raise _bad("ports", f"invalid exposed port {str(value)[:40]}")
    return f"{int(m.group(1))}/{m.group(2) or 'tcp'}"


def _ports(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > 1024:
        raise _bad("ports", "ports must be a list", "type")
    return tuple(sorted({normalise_port(p) for p in raw}, key=port_key))


def parse_create(args: dict[str, Any]) -> TemplateSpec:
    """Validate a `template create --image` request (TPL-1 to TPL-3)."""
    if not args.get("request_id"):
        raise _bad("request_id", "requestID is required", "required")
    if not ids.valid("request", args["request_id"]):
        raise _bad("request_id", "request id must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
    image = _str(args, "image", 1024)
    if image is None:
        raise _bad("image", "image is required", "required")
    alias = _str(args, "alias", 256)
    if alias is not None and not ids.valid("alias", alias):
        raise InvalidAlias(f"alias {alias!r} must be [a-z0-9][a-z0-9-]{{0,63}}, not starting with tpl-, snap- "
                           "or sbx-", {"field": "alias", "alias": alias})
    nodes_raw = args.get("nodes") or []
    if isinstance(nodes_raw, str):
        nodes_raw = [n for n in nodes_raw.split(",") if n]
    if not isinstance(nodes_raw, list) or not all(ids.valid("node", n) for n in nodes_raw):
        raise _bad("nodes", "nodes must be node ids (DNS labels)")
    builder = _str(args, "builder", 63)
    if builder is not None and not ids.valid("node", builder):
        raise _bad("builder", f"builder {builder!r} is not a node id")
    platform = _str(args, "platform", 64)
    if platform is not None and not _PLATFORM.match(platform):
        raise _bad("platform", f"platform {platform!r} is not os/arch[/variant]")
    user = _str(args, "user", 65)
    if user is not None and not _USER.match(user):
        raise _bad("user", f"user {user!r} must be uid[:gid] or name[:group]")
    snapshot_mode = _str(args, "snapshot_mode", 16) or "rootfs"
    if snapshot_mode not in SNAPSHOT_MODES:
        raise _bad("snapshot_mode", f"snapshot_mode must be one of {', '.join(SNAPSHOT_MODES)}", "choice")
    compat = _str(args, "compat_policy", 16) or "STRICT"
    if compat not in COMPAT_POLICIES:
        raise _bad("compat_policy", f"compat_policy must be one of {', '.join(COMPAT_POLICIES)}", "choice")
    probe = _str(args, "probe", 4200) or "started"
    if not _PROBE.match(probe):
        raise _bad("probe", "probe must be started, exec:CMD or delay:SECONDS")
    return TemplateSpec(
        image=image, alias=alias, nodes=tuple(sorted(set(nodes_raw))), builder=builder, platform=platform,
        writable_size=_int(args, "writable_size", 0, MAX_WRITABLE, GIB),
        overrides=Overrides(entrypoint=_argv(args, "entrypoint"), cmd=_argv(args, "cmd"), env=_env(args.get("env")),
                            workdir=_str(args, "workdir", 4096), user=user, ports=_ports(args.get("ports"))),
        vcpus=_int(args, "vcpus", 1, 64, 1), memory_mib=_int(args, "memory_mib", 64, 262_144, 512),
        snapshot_mode=snapshot_mode, probe=probe, compat_policy=compat)


def sanitised_request(operation: str, spec: TemplateSpec) -> tuple[dict[str, Any], str]:
    """TPL-5: the normalised request without credentials, and its digest (idempotency key)."""
    body = {"operation": operation, "spec": spec.to_dict()}
    return body, digest(body)


def runtime_config(image_config: dict[str, Any], spec: TemplateSpec) -> dict[str, Any]:
    """TPL-30: image config + overrides. An entrypoint override resets the image cmd unless a
    cmd is given; env overlays the image's, sorted by key; workdir ``/`` and user ``0:0`` by
    default; ports = image ∪ requested, sorted; no entrypoint and no cmd: the guest idles."""
    o = spec.overrides
    entrypoint = list(o.entrypoint) if o.entrypoint is not None else list(image_config.get("entrypoint") or [])
    if o.cmd is not None:
        cmd = list(o.cmd)
    elif o.entrypoint is not None:
        cmd = []
    else:
        cmd = list(image_config.get("cmd") or [])
    env: dict[str, str] = {}
    for item in image_config.get("env") or []:
        k, sep, v = str(item).partition("=")
        if sep and _ENV_KEY.match(k):
            env[k] = v
    env.update(dict(o.env))
    ports: set[str] = set()
    for p in image_config.get("exposed_ports") or []:
        try:
            ports.add(normalise_port(p))
        except InvalidRequest:
            continue  # an odd port in an image config is the image's business, not a request error
    ports.update(o.ports)
    return {
        "entrypoint": entrypoint,
        "cmd": cmd,
        "env": [f"{k}={v}" for k, v in sorted(env.items())],
        "workdir": o.workdir or image_config.get("workdir") or "/",
        "user": o.user or image_config.get("user") or "0:0",
        "ports": sorted(ports, key=port_key),
        "labels": dict(sorted((image_config.get("labels") or {}).items())),
        "idle": not entrypoint and not cmd,
        "vcpus": spec.vcpus,
        "memory_mib": spec.memory_mib,
        "probe": spec.probe,
    }
