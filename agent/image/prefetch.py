"""Read-ahead for layer streams: decompression and hashing in a second thread.

Unpacking is two kinds of work that can overlap: inflating and hashing the layer (zlib,
zstd and sha256 all release the GIL) and creating files (system calls, which release it
too). ``tar xzf`` gets the same overlap by running gzip as a separate process. The reader
thread stays at most ``depth`` chunks ahead, so memory is bounded (8 MiB by default); an
error in the reader thread is raised to the consumer at the point it would have been hit.
"""
from __future__ import annotations

import queue
import threading
from typing import BinaryIO, Callable

CHUNK = 1 << 20
_EOF = object()


class Prefetch:
    """A read-only file-like object over ``source`` that reads ahead in a thread."""

    def __init__(self, source: BinaryIO, *, chunk: int = CHUNK, depth: int = 8,
                 check: Callable[[], None] | None = None) -> None:
        self._source = source
        self._check = check  # raises to stop (a cancelled task): checked once per chunk
        self._chunk = chunk
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._buf = memoryview(b"")
        self._done = False
        self._thread = threading.Thread(target=self._run, name="layer-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._source.read(self._chunk)
                if not data:
                    break
                self._put(data)
        except BaseException as exc:  # noqa: BLE001 — handed to the consumer, raised there
            self._put(exc)
            return
        self._put(_EOF)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _next(self) -> bool:
        """Refill the buffer; False at the end of the stream."""
        if self._done:
            return False
        if self._check is not None:
            self._check()
        item = self._queue.get()
        if item is _EOF:
            self._done = True
            return False
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._buf = memoryview(item)  # type: ignore[arg-type]
        return True

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        """Up to ``n`` bytes (all that is left if ``n`` < 0); short only at the end."""
        chunks: list[memoryview] = []
        need = -1 if n is None or n < 0 else n
        while need != 0:
            if not self._buf and not self._next():
                break
            piece = self._buf if need < 0 else self._buf[:need]
            self._buf = self._buf[len(piece):]
            chunks.append(piece)
            if need > 0:
                need -= len(piece)
        return b"".join(chunks)

    def close(self) -> None:
        """Stop the reader thread and wait for it; the source stays open (the caller's)."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
