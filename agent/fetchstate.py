"""The state of one artifact fetch, kept apart from the socket work in ``transfer.py``:
the credit window over a file's chunks (WIRE-16), the resume record next to the partial file
(WIRE-17) and the token renewal through the session (DIST-5)."""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from protocol.errors import TransferTokenExpired, from_wire
from protocol.message import Message
from protocol.messages import Error, TokenGrant, TokenRequest

log = logging.getLogger("transfer")

TOKEN_WAIT = 30.0          # s to wait for a TOKEN after a TOKEN_REQUEST
POLL_SLICE = 0.5           # s: cancel checks while waiting


# --- pure logic: the credit window of one file ------------------------------------------

class ChunkPlan:
    """Which ranges of one file to ask for next (credit-based), their retries, and the
    contiguous verified prefix. No I/O: the fetch loop and the unit tests drive it."""

    def __init__(self, size: int, start: int, chunk: int, window: int, retries: int) -> None:
        if not 0 <= start <= size or chunk < 1 or window < 1 or retries < 1:
            raise ValueError("bad chunk plan")
        self.size, self.chunk, self.window, self.retries = size, chunk, window, retries
        self.verified = start           # bytes [0, verified) are verified and in order
        self._next = start              # the next range never asked for
        self._again: collections.deque[int] = collections.deque()
        self._tries: dict[int, int] = {}
        self.inflight: set[int] = set()
        self._ready: dict[int, bytes | None] = {}  # verified, waiting for the prefix (None: zeros)

    def length(self, offset: int) -> int:
        return min(self.chunk, self.size - offset)

    @property
    def done(self) -> bool:
        return self.verified >= self.size

    def take(self) -> list[tuple[int, int]]:
        """The ranges ``(offset, length)`` to send now: one per free credit."""
        out: list[tuple[int, int]] = []
        while len(self.inflight) < self.window:
            if self._again:
                offset = self._again.popleft()
            elif self._next < self.size:
                offset = self._next
                self._next += self.length(offset)
            else:
                break
            self.inflight.add(offset)
            self._tries[offset] = self._tries.get(offset, 0) + 1
            out.append((offset, self.length(offset)))
        return out

    def requeue(self, offset: int) -> None:
        """Ask again without counting a try (the request was refused, e.g. its token expired)."""
        if offset in self.inflight:
            self.inflight.discard(offset)
            self._tries[offset] -= 1
            self._again.appendleft(offset)

    def bad(self, offset: int) -> bool:
        """A chunk failed its digest: True if it is queued again, False when out of tries."""
        self.inflight.discard(offset)
        if self._tries.get(offset, 0) >= self.retries:
            return False
        self._again.append(offset)
        return True

    def tries(self, offset: int) -> int:
        return self._tries.get(offset, 0)

    def good(self, offset: int, data: bytes | None) -> list[tuple[int, bytes | None]]:
        """A verified chunk (``None``: all zeros). Returns the pieces that now extend the prefix, in order."""
        self.inflight.discard(offset)
        self._tries.pop(offset, None)
        self._ready[offset] = data
        out: list[tuple[int, bytes | None]] = []
        while self.verified in self._ready:
            piece = self._ready.pop(self.verified)
            out.append((self.verified, piece))
            self.verified += self.length(self.verified)
        return out


# --- the resume record --------------------------------------------------------------------

class ResumeRecord:
    """``<id>.partial/.progress.json``: per file ``{size, sha256, verified}`` (WIRE-17)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[str, dict[str, Any]] = {}

    @classmethod
    def load(cls, path: Path, files: list[dict[str, Any]]) -> "ResumeRecord":
        """The record for ``files``; entries whose size or digest differ start from zero."""
        rec = cls(path)
        try:
            old = json.loads(path.read_text())
            old_files = old.get("files") if isinstance(old, dict) else None
        except (OSError, ValueError):
            old_files = None
        for f in files:
            prev = old_files.get(f["name"]) if isinstance(old_files, dict) else None
            verified = 0
            if (isinstance(prev, dict) and prev.get("size") == f["size"] and prev.get("sha256") == f["sha256"]
                    and isinstance(prev.get("verified"), int) and 0 <= prev["verified"] <= f["size"]):
                verified = prev["verified"]
            rec.files[f["name"]] = {"size": f["size"], "sha256": f["sha256"], "verified": verified}
        return rec

    def verified(self, name: str) -> int:
        return int(self.files[name]["verified"])

    def set(self, name: str, verified: int) -> None:
        self.files[name]["verified"] = verified

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"version": 1, "files": self.files}, sort_keys=True))
        os.replace(tmp, self.path)


# --- token renewal through the session (DIST-5) -----------------------------------------

Send = Callable[[Message], Awaitable[bool]]


class TokenBroker:
    """Lets a fetch (a worker thread) ask the coordinator for a new token over the live session."""

    def __init__(self, wait: float = TOKEN_WAIT) -> None:
        self._wait = wait
        self._lock = threading.Lock()
        self._attached = threading.Condition(self._lock)
        self._send: Send | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[str, concurrent.futures.Future[TokenGrant]] = {}
        self._ids = (f"tok-{secrets.token_hex(6)}-{n}" for n in itertools.count(1))

    def attach(self, send: Send | None, loop: asyncio.AbstractEventLoop | None = None) -> None:
        with self._lock:
            self._send, self._loop = send, loop
            self._attached.notify_all()

    def request(self, artifact_id: str, source_node: str, task_id: str | None,
                cancel: Callable[[], None] = lambda: None) -> tuple[str, int]:
        """From a worker thread: send TOKEN_REQUEST, wait for TOKEN; (token, expires ms).
        TransferTokenExpired if no session or no answer in time; the coordinator's ERROR as is.
        ``cancel`` is called every half second while waiting (a task's ``check``)."""
        deadline = time.monotonic() + self._wait
        with self._lock:
            while self._send is None and (left := deadline - time.monotonic()) > 0:
                self._attached.wait(min(left, POLL_SLICE))
                cancel()
            send, loop = self._send, self._loop
            if send is None or loop is None:
                raise TransferTokenExpired(f"the grant for {artifact_id} expired and no coordinator session is "
                                           "up to renew it", {"artifact_id": artifact_id})
            msg = TokenRequest(msg_id=next(self._ids), artifact_id=artifact_id, source_node=source_node,
                               task_id=task_id)
            fut: concurrent.futures.Future[TokenGrant] = concurrent.futures.Future()
            self._waiting[msg.msg_id] = fut
        try:
            sent = asyncio.run_coroutine_threadsafe(send(msg), loop).result(self._wait)
            if not sent:
                raise TransferTokenExpired(f"the TOKEN_REQUEST for {artifact_id} could not be sent",
                                           {"artifact_id": artifact_id})
            while True:
                left = deadline - time.monotonic()
                try:
                    answer = fut.result(max(0.0, min(left, POLL_SLICE)))
                    return answer.token, answer.expires
                except concurrent.futures.TimeoutError:
                    if left <= POLL_SLICE:
                        raise TransferTokenExpired(f"no new token for {artifact_id} within {self._wait:g}s",
                                                   {"artifact_id": artifact_id}) from None
                    cancel()
        finally:
            with self._lock:
                self._waiting.pop(msg.msg_id, None)

    def on_token(self, msg: TokenGrant) -> bool:
        with self._lock:
            fut = self._waiting.get(msg.parent_id)
        if fut is None or fut.done():
            return False
        fut.set_result(msg)
        return True

    def on_error(self, err: Error) -> bool:
        with self._lock:
            fut = self._waiting.get(err.parent_id or "")
        if fut is None or fut.done():
            return False
        fut.set_exception(from_wire({"code": err.code, "name": err.name, "message": err.message,
                                     "details": err.details}))
        return True
