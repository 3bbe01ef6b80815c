"""Where the target side of FETCH_ARTIFACT puts one file's verified chunks (SPEC WIRE-16,
WIRE-17; agent/transfer.py): written at their offset with 4 KiB blocks of zeros left as holes,
the contiguous verified prefix fed to a running sha256, dirty pages written back as it goes."""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import os
import threading
from typing import Any

from protocol.messages import Chunk

from .blobs import zero_digest, zeros
from .fetchstate import ChunkPlan

BLOCK = 4096               # hole granularity of the target file


class FileSink:
    """Where one file's verified chunks go: written at their offset (zero blocks skipped), the
    contiguous prefix fed in order to a running sha256 on its own thread, and dirty pages
    written back in the background (``fdatasync`` every 64 MiB), so the final fsync is short."""

    FLUSH_EVERY = 64 << 20
    HASH_BACKLOG = 32  # chunks queued for the running digest before the receive loop waits

    def __init__(self, fd: int, plan: ChunkPlan) -> None:
        self.fd, self.plan = fd, plan
        self.running = hashlib.sha256()
        hash_prefix(fd, plan.verified, self.running)
        self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fetch-digest")
        self._flusher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fetch-flush")
        self._hashing: collections.deque[concurrent.futures.Future[None]] = collections.deque()
        self._flushing: concurrent.futures.Future[None] | None = None
        self._written = 0
        self._lock = threading.Lock()
        self._data: dict[int, bytes | None] = {}

    def __enter__(self) -> "FileSink":
        return self

    def __exit__(self, *_: Any) -> None:
        self._hasher.shutdown(wait=True, cancel_futures=True)
        self._flusher.shutdown(wait=True, cancel_futures=True)

    def check_and_write(self, msg: Chunk, offset: int, length: int, fits: bool) -> bool:
        """In a pool thread: the chunk's digest, then its bytes at ``offset``; False if it is bad."""
        if not fits:
            return False
        if msg.zero:
            ok = msg.sha256 == zero_digest(length)
        else:
            ok = hashlib.sha256(msg.data).hexdigest() == msg.sha256
        if not ok:
            return False
        if not msg.zero:
            write_sparse(self.fd, offset, msg.data)
        with self._lock:
            self._data[offset] = None if msg.zero else msg.data
            self._written += length
            flush = self._written >= self.FLUSH_EVERY and (self._flushing is None or self._flushing.done())
            if flush:
                self._written = 0
                self._flushing = self._flusher.submit(os.fdatasync, self.fd)
        return True

    def extend(self, offset: int) -> None:
        """In the receive thread, once ``offset`` is verified and written: grow the prefix."""
        with self._lock:
            data = self._data.pop(offset)
        for off, piece in self.plan.good(offset, data):
            chunk = piece if piece is not None else zeros(self.plan.length(off))
            self._hashing.append(self._hasher.submit(self.running.update, chunk))
        while self._hashing and (self._hashing[0].done() or len(self._hashing) > self.HASH_BACKLOG):
            self._hashing.popleft().result()

    def digest(self) -> str:
        while self._hashing:
            self._hashing.popleft().result()
        if self._flushing is not None:
            self._flushing.result()
        return self.running.hexdigest()


# --- file helpers ---------------------------------------------------------------------

def write_sparse(fd: int, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset``, skipping 4 KiB-aligned blocks of zeros (they stay holes)."""
    zero = zeros(BLOCK)
    if data.find(zero) < 0:  # the common case for dense data: one write
        os.pwrite(fd, data, offset)
        return
    view = memoryview(data)
    n = len(data)
    run_start = -1
    # Block boundaries are relative to the file, so holes line up with the file system's blocks.
    first = (-offset) % BLOCK
    edges = [0, *range(first or BLOCK, n, BLOCK), n] if first else [*range(0, n, BLOCK), n]
    for lo, hi in zip(edges, edges[1:]):
        is_zero = hi - lo == BLOCK and data[lo:hi] == zero
        if is_zero:
            if run_start >= 0:
                os.pwrite(fd, view[run_start:lo], offset + run_start)
                run_start = -1
        elif run_start < 0:
            run_start = lo
    if run_start >= 0:
        os.pwrite(fd, view[run_start:n], offset + run_start)


def hash_prefix(fd: int, length: int, h: "hashlib._Hash") -> None:
    pos = 0
    while pos < length:
        data = os.pread(fd, min(1 << 20, length - pos), pos)
        if not data:
            raise OSError(5, "partial file shorter than its record")
        h.update(data)
        pos += len(data)
