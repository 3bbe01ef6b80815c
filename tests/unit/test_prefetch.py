"""The layer read-ahead (agent/image/prefetch.py): same bytes as the source for any read
pattern, errors raised at the consumer, bounded read-ahead, a clean stop mid-stream."""
from __future__ import annotations

import io
import os
import threading

import pytest

from agent.image.prefetch import Prefetch
from protocol.errors import ImageInvalid


@pytest.mark.parametrize("sizes", [[1], [512], [1000, 7, 200 << 10], [-1]])
def test_same_bytes_for_any_read_pattern(sizes: list[int]) -> None:
    data = os.urandom((300 << 10) + 123)
    out = bytearray()
    with Prefetch(io.BytesIO(data), chunk=16 << 10) as p:
        i = 0
        while True:
            n = sizes[i % len(sizes)]
            piece = p.read(n)
            if not piece:
                break
            assert n < 0 or len(piece) == n or len(out) + len(piece) == len(data)  # short only at the end
            out += piece
            i += 1
    assert bytes(out) == data


class Failing(io.RawIOBase):
    def __init__(self, good: bytes) -> None:
        self.good = io.BytesIO(good)

    def read(self, n: int = -1) -> bytes:
        piece = self.good.read(n)
        if not piece:
            raise ImageInvalid("layer sha256:x: corrupt gzip data")
        return piece


def test_a_source_error_reaches_the_consumer_after_the_good_bytes() -> None:
    with Prefetch(Failing(b"a" * 1000), chunk=100) as p:
        assert p.read(1000) == b"a" * 1000
        with pytest.raises(ImageInvalid, match="corrupt gzip"):
            p.read(1)


class Counting(io.RawIOBase):
    def __init__(self) -> None:
        self.reads = 0
        self.event = threading.Event()

    def read(self, n: int = -1) -> bytes:
        self.reads += 1
        self.event.set()
        return b"z" * n


def test_read_ahead_is_bounded_and_close_stops_an_endless_source() -> None:
    src = Counting()
    p = Prefetch(src, chunk=1024, depth=4)
    assert p.read(10) == b"z" * 10
    p.close()  # must return although the source never ends
    assert src.reads <= 4 + 3  # depth chunks queued, one being handed over, one consumed



def test_check_stops_the_consumer_mid_stream() -> None:
    """WIRE-12/14: a cancelled task's unpack stops within a chunk, with the task's reason."""
    from protocol.errors import JobCancelled
    stop = threading.Event()

    def check() -> None:
        if stop.is_set():
            raise JobCancelled("task cancelled")

    with Prefetch(Counting(), chunk=1024, depth=2, check=check) as p:
        assert p.read(1024)
        stop.set()
        with pytest.raises(JobCancelled):
            p.read(10 << 20)
