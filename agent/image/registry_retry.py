"""Transient registry faults and the retry budget of one operation (SPEC IMG-8;
agent/image/registry.py): ``retries`` retries with exponential backoff, honouring
``Retry-After`` (seconds or an HTTP date, capped at ``MAX_RETRY_AFTER``), then
ImageRegistryUnavailable naming the host and the last reason."""
from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable
from datetime import UTC
from typing import TYPE_CHECKING

import httpx

from protocol.errors import ImageRegistryUnavailable

if TYPE_CHECKING:
    from .registry import RegistryClient

log = logging.getLogger("agent.image.registry")  # the client's logger: one log name for the registry

MAX_RETRY_AFTER = 60.0


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Retry-After in seconds (delta or HTTP date), clamped to [0, MAX_RETRY_AFTER]."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(int(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now()
    return max(0.0, min(seconds, MAX_RETRY_AFTER))


def error_codes(resp: httpx.Response) -> set[str]:
    try:
        body = resp.json()
    except Exception:  # noqa: BLE001 - any garbage body just has no codes
        return set()
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list):
        return set()
    return {e["code"] for e in errors if isinstance(e, dict) and isinstance(e.get("code"), str)}


class Retry(Exception):
    """Internal: a transient fault worth another attempt."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Budget:
    """Transient failures allowed for one operation (IMG-8: ``retries`` retries)."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self.failures = 0

    def fail(self, exc: Retry) -> None:
        self.failures += 1
        c = self.client
        if self.failures > c.retries:
            raise ImageRegistryUnavailable(
                f"registry {c.host} unavailable after {self.failures} attempts: {exc.reason}",
                {"registry": c.host, "attempts": self.failures, "last": exc.reason})
        base, cap = c.backoff
        delay = min(cap, base * (2 ** (self.failures - 1)))
        if exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        log.warning("registry %s: %s; retry %d/%d in %.1fs", c.host, exc.reason, self.failures, c.retries, delay)
        c._sleep(delay)
