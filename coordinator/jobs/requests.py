"""Sanitised requests and their digests: the payload half of idempotency (TPL-5).

A job stores the request it was made from, normalised (``None`` values and empty containers
dropped, keys sorted by canonical JSON) and with every credential removed, plus the sha256 of
its canonical JSON. A resubmit with the same request id and operation is "equal" exactly when
the digests match. Credentials are never persisted (IMG-5), so two requests that differ only in
credentials are the same request.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protocol.canonical import digest
from protocol.errors import InvalidRequest

# Keys removed wherever they appear, at any depth (compared lower-cased, '-' read as '_').
CREDENTIAL_KEYS = frozenset({
    "credentials", "registry_credentials", "registry_auth", "auth", "authorization",
    "username", "password", "token", "identity_token", "registry_token", "secret",
})
# Not part of the payload: the request id is the idempotency key itself.
_ENVELOPE_KEYS = frozenset({"request_id"})


def _is_credential(key: str) -> bool:
    return key.lower().replace("-", "_") in CREDENTIAL_KEYS


def _clean(value: Any, path: str) -> Any:
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidRequest(f"request keys must be strings ({path or 'request'})",
                                     {"field": path or "request", "reason": "non-string key"})
            if _is_credential(k):
                continue
            c = _clean(v, f"{path}.{k}" if path else k)
            if c is not None:
                out[k] = c
        return out or None
    if isinstance(value, (list, tuple)):
        items = [_clean(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return [i for i in items if i is not None] or None
    if isinstance(value, float):
        if not value.is_integer():  # canonical JSON carries integers only (CONV-3)
            raise InvalidRequest(f"{path or 'request'} must be an integer",
                                 {"field": path or "request", "reason": "not an integer"})
        return int(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    raise InvalidRequest(f"{path or 'request'} has an unsupported type {type(value).__name__}",
                         {"field": path or "request", "reason": "unsupported type"})


def sanitize_request(request: Mapping[str, Any]) -> dict[str, Any]:
    """The request as stored on the job: normalised, without credentials or the request id.

    List order is kept (CONV-3 "lists in defined order"): the validators that produce the
    request sort what the spec sorts (ports, env), so ``["a","b"]`` and ``["b","a"]`` stay
    different when order means something (an entrypoint)."""
    body = {k: v for k, v in request.items() if k not in _ENVELOPE_KEYS}
    return _clean(body, "") or {}


def request_digest(sanitized: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a sanitised request."""
    return digest(dict(sanitized))


def sanitize_and_digest(request: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    clean = sanitize_request(request)
    return clean, request_digest(clean)
