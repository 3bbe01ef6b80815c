"""Canonical JSON (SPEC CONV-3) and the digests built on it."""
from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> bytes:
    """UTF-8, sorted keys, no spare whitespace; floats are refused (integers only)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False, default=_refuse).encode("utf-8")


def _refuse(o: Any) -> Any:
    if isinstance(o, (bytes, bytearray)):
        return o.hex()
    raise TypeError(f"{type(o).__name__} is not canonical-JSON serialisable")


def digest(obj: Any) -> str:
    """sha256 hex of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def catalog_digest(entries: list[dict[str, Any]]) -> str:
    """CAT-2: sha256 of the canonical JSON of all entries, ordered by (kind, id); an absent
    body counts as ``{}``. Agent and coordinator both compute it here."""
    norm = sorted(({"kind": e["kind"], "id": e["id"], "body": e.get("body") or {}} for e in entries),
                  key=lambda e: (e["kind"], e["id"]))
    return digest(norm)
