"""The image config as the artifact keeps it (IMG-21) and the build epoch (IMG-20).

OCI and Docker configs carry the runtime settings under ``config`` (``Config`` in some old
Docker writers). We keep only what a sandbox needs, in one normalised shape, so two images
that differ only in history or author produce the same generated config.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

__all__ = ["normalise", "created_epoch"]


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def normalise(config: dict[str, Any]) -> dict[str, Any]:
    """``{entrypoint, cmd, env, workdir, user, exposed_ports, labels}`` with empty defaults.
    Wrong types are dropped rather than refused: the config digest was verified, so this is
    the image author's data, and the runtime treats a missing value as the default."""
    raw = config.get("config")
    if not isinstance(raw, dict):
        raw = config.get("Config") if isinstance(config.get("Config"), dict) else {}
    ports = raw.get("ExposedPorts")
    labels = raw.get("Labels")
    return {
        "entrypoint": _strings(raw.get("Entrypoint")),
        "cmd": _strings(raw.get("Cmd")),
        "env": _strings(raw.get("Env")),
        "workdir": raw.get("WorkingDir") if isinstance(raw.get("WorkingDir"), str) else "",
        "user": raw.get("User") if isinstance(raw.get("User"), str) else "",
        "exposed_ports": sorted(k for k in ports if isinstance(k, str)) if isinstance(ports, dict) else [],
        "labels": ({k: v for k, v in sorted(labels.items()) if isinstance(k, str) and isinstance(v, str)}
                   if isinstance(labels, dict) else {}),
    }


def created_epoch(config: dict[str, Any]) -> int:
    """The config's ``created`` (RFC 3339) as whole Unix seconds, else 0; never negative."""
    created = config.get("created")
    if not isinstance(created, str) or not created:
        return 0
    text = created.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # Go writes up to nanoseconds; fromisoformat takes at most microseconds.
    if "." in text:
        head, _, rest = text.partition(".")
        frac = "".join(c for c in rest if c.isdigit())
        tz = rest[len(frac):]
        text = f"{head}.{frac[:6].ljust(6, '0')}{tz}"
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        return 0
    if stamp.tzinfo is None:
        return 0
    return max(0, int(stamp.timestamp()))
