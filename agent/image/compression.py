"""Layer decompression with magic checks and diff_id verification (SPEC IMG-7, IMG-8, IMG-16).

A layer blob in the cache is opened with :func:`open_layer`, which peeks at its first bytes
and checks them against the compression the media type declares (IMG-7: "compression is
checked against the magic bytes"). The returned :class:`LayerReader` is a plain file-like
object yielding the *decompressed* tar stream; the unpacker reads it with ``tarfile`` in
stream mode. Every decompressed byte is hashed as it is produced, and
:meth:`LayerReader.finish` drains what the unpacker left (the unpacker stops after the
end-of-archive blocks) and compares the sha256 with the layer's diff_id (IMG-8).

Typical use::

    with open(cache.path(layer.digest), "rb") as raw:
        reader = open_layer(raw, layer, max_bytes=limits.max_bytes - state.bytes)
        apply_layer(root, reader, limits, state)
        reader.finish()

Memory is bounded whatever the layer: input is read and output produced in chunks of at
most :data:`CHUNK` bytes (``zlib`` ``max_length``, zstd ``stream_reader``), so neither a 1 GB
layer nor a gzip bomb is ever held in memory. The drain in ``finish`` is bounded by
``max_bytes`` (the unpack byte budget): more than that many bytes after the point where
the unpacker stopped is ImageLimitExceeded with ``details.limit = "bytes"`` — a bomb of
10 GiB of zeros behind a valid end-of-archive is stopped after ``max_bytes``.

Errors (all name the layer digest):

* declared compression differs from the bytes -> ImageInvalid
  ("layer sha256:… is declared tar+gzip but its bytes are zstd");
* corrupt or truncated gzip/zstd data -> ImageInvalid;
* decompressed sha256 differs from diff_id -> ImageDigestMismatch
  (details: digest, diff_id = expected, actual);
* drain beyond ``max_bytes`` -> ImageLimitExceeded (details.limit = "bytes").
"""
from __future__ import annotations

import hashlib
import zlib
from typing import Any, BinaryIO, Self

import zstandard

from protocol.errors import ImageDigestMismatch, ImageInvalid, ImageLimitExceeded

from .model import Layer, check_digest

__all__ = ["CHUNK", "LayerReader", "open_layer", "sniff"]

CHUNK = 1 << 20  # input read size and maximum output chunk

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BZIP2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_PEEK = 512

# How a compression is named in messages: the media-type suffix.
_DECLARED = {"none": "tar", "gzip": "tar+gzip", "zstd": "tar+zstd"}


def sniff(head: bytes) -> str:
    """The compression the first bytes of a blob show.

    ``"gzip"`` (1f 8b), ``"zstd"`` (28 b5 2f fd), ``"bzip2"``/``"xz"`` (recognised only so a
    mismatch message can name them; never a valid layer), else ``"none"``: a plain tar. No
    ustar-magic check is made for ``"none"``: a layer of zero blocks (empty layer) and old v7
    tars have none, and a garbage "plain" layer is rejected by the unpacker (ImageInvalid)
    or by the diff_id check anyway.
    """
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    if head.startswith(_XZ_MAGIC):
        return "xz"
    if head.startswith(_BZIP2_MAGIC):
        return "bzip2"
    return "none"


def open_layer(raw: BinaryIO, layer: Layer, *, max_bytes: int | None = None) -> LayerReader:
    """Check ``raw``'s magic against ``layer.compression`` (IMG-7) and return a reader of the
    decompressed tar. ``max_bytes`` is the default drain bound of :meth:`LayerReader.finish`
    (None: unbounded)."""
    digest = layer.digest
    if layer.compression not in _DECLARED:
        raise ImageInvalid(f"layer {digest} has unsupported compression {layer.compression!r}",
                           {"digest": digest})
    check_digest(layer.diff_id, f"layer {digest} diff_id")
    head = b""
    while len(head) < _PEEK:
        more = raw.read(_PEEK - len(head))
        if not more:
            break
        head += more
    actual = sniff(head)
    if actual != layer.compression:
        raise ImageInvalid(
            f"layer {digest} is declared {_DECLARED[layer.compression]} but its bytes are "
            f"{'tar' if actual == 'none' else actual}",
            {"digest": digest, "declared": layer.compression, "actual": actual})
    return LayerReader(raw, layer, head, max_bytes=max_bytes)


class LayerReader:
    """File-like reader of a layer's decompressed bytes, hashing them as they are produced.

    ``read(n)`` may return fewer than ``n`` bytes (at internal chunk boundaries); ``b""``
    means the end. Not thread-safe (one unpacker reads one layer).
    """

    def __init__(self, raw: BinaryIO, layer: Layer, head: bytes, *, max_bytes: int | None = None) -> None:
        self.layer = layer
        self.max_bytes = max_bytes
        self._raw = raw
        self._pending = head          # input read from raw but not yet decompressed
        self._hash = hashlib.sha256()
        self._buf = memoryview(b"")
        self._pos = 0
        self._limit: int | None = None  # total-output bound while draining
        self._done = False
        self.bytes_out = 0            # decompressed bytes produced so far
        self.bytes_read = 0           # decompressed bytes handed to the caller
        self._produce = {"none": self._plain, "gzip": self._gzip, "zstd": self._zstd}[layer.compression]
        self._z: Any = None
        if layer.compression == "zstd":
            self._walker = _ZstdFrames(layer.digest)
            self._z = zstandard.ZstdDecompressor().stream_reader(
                _Tee(self), read_size=CHUNK, read_across_frames=True, closefd=False)

    # --- file-like ------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            parts = []
            while chunk := self.read(CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        if n == 0:
            return b""
        if self._pos >= len(self._buf) and not self._refill():
            return b""
        end = min(self._pos + n, len(self._buf))
        out = bytes(self._buf[self._pos:end])
        self._pos = end
        self.bytes_read += len(out)
        return out

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if not len(view) or (self._pos >= len(self._buf) and not self._refill()):
            return 0
        n = min(len(view), len(self._buf) - self._pos)
        view[:n] = self._buf[self._pos:self._pos + n]
        self._pos += n
        self.bytes_read += n
        return n

    def close(self) -> None:
        """Release the decompressor; ``raw`` belongs to the caller and stays open."""
        if self.layer.compression == "zstd" and self._z is not None:
            self._z.close()
        self._buf = memoryview(b"")
        self._done = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- verification (IMG-8) ----------------------------------------------------------

    def finish(self, max_bytes: int | None = None) -> str:
        """Drain the rest of the stream (at most ``max_bytes`` more bytes, default the
        ``open_layer`` value; more is ImageLimitExceeded), then check the sha256 of all
        decompressed bytes against the diff_id. Returns the diff_id."""
        bound = self.max_bytes if max_bytes is None else max_bytes
        if bound is not None:
            self._limit = self.bytes_read + bound
            self._check_limit()
        self._pos = len(self._buf)
        while self._refill():
            self._pos = len(self._buf)
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.layer.diff_id:
            raise ImageDigestMismatch(
                f"layer {self.layer.digest}: uncompressed sha256 {actual} does not match diff_id {self.layer.diff_id}",
                {"digest": self.layer.digest, "expected": self.layer.diff_id, "actual": actual})
        return actual

    # --- producing ------------------------------------------------------------------

    def _refill(self) -> bool:
        if self._done:
            return False
        while True:
            chunk = self._produce()
            if not chunk:
                self._done = True
                self._buf, self._pos = memoryview(b""), 0
                return False
            self._hash.update(chunk)
            self.bytes_out += len(chunk)
            self._buf, self._pos = memoryview(chunk), 0
            if self._limit is not None:
                self._check_limit()
            return True

    def _check_limit(self) -> None:
        if self._limit is not None and self.bytes_out > self._limit:
            raise ImageLimitExceeded(
                f"layer {self.layer.digest} decompresses to more than the unpack byte limit allows",
                {"limit": "bytes", "digest": self.layer.digest, "max": self._limit - self.bytes_read})

    def _input(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        return self._raw.read(CHUNK)

    def _plain(self) -> bytes:
        return self._input()

    def _gzip(self) -> bytes:
        # Concatenated members are one stream (RFC 1952 §2.2); zero padding after a member is
        # ignored (as gzip(1) does); anything else after a member must be another member.
        try:
            while True:
                z = self._z
                if z is None:
                    data = self._input()
                    if not data:
                        return b""
                    data = data.lstrip(b"\0")
                    if not data:
                        continue
                    self._pending = data
                    self._z = z = zlib.decompressobj(31)
                if z.unconsumed_tail:
                    data = z.unconsumed_tail
                else:
                    data = self._input()
                    if not data:
                        raise ImageInvalid(f"layer {self.layer.digest} is truncated gzip data",
                                           {"digest": self.layer.digest})
                out = z.decompress(data, CHUNK)
                if z.eof:
                    self._pending, self._z = z.unused_data, None
                if out:
                    return out
        except zlib.error as exc:
            raise ImageInvalid(f"layer {self.layer.digest} is corrupt gzip data: {exc}",
                               {"digest": self.layer.digest}) from None

    def _zstd(self) -> bytes:
        try:
            out = self._z.read(CHUNK)
        except zstandard.ZstdError as exc:
            raise ImageInvalid(f"layer {self.layer.digest} is corrupt zstd data: {exc}",
                               {"digest": self.layer.digest}) from None
        if not out:
            self._walker.end()
        return out


class _Tee:
    """The zstd decompressor's input: the reader's raw input, also walked by the frame
    checker (python-zstandard's stream_reader silently ends on a truncated frame)."""

    def __init__(self, reader: LayerReader) -> None:
        self._reader = reader

    def read(self, n: int = -1) -> bytes:
        data = self._reader._input()
        self._reader._walker.feed(data)
        return data


class _ZstdFrames:
    """Walks zstd frame and block headers (RFC 8878) over the raw input to tell a complete
    stream from a truncated one. Work is per block (≤ 128 KiB of output), not per byte."""

    def __init__(self, digest: str) -> None:
        self._digest = digest
        self._hdr = bytearray()   # header bytes collected so far
        self._want = 4            # header bytes needed in the current state
        self._skip = 0            # payload bytes to pass over
        self._state = "magic"
        self._checksum = 0

    def _bad(self, why: str) -> ImageInvalid:
        return ImageInvalid(f"layer {self._digest} is {why} zstd data", {"digest": self._digest})

    def feed(self, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n:
            if self._skip:
                step = min(self._skip, n - pos)
                self._skip -= step
                pos += step
                if self._skip == 0 and self._state == "payload_done":
                    self._next_after_payload()
                continue
            take = min(self._want - len(self._hdr), n - pos)
            self._hdr += data[pos:pos + take]
            pos += take
            if len(self._hdr) == self._want:
                self._header()

    def _set(self, state: str, want: int) -> None:
        self._state, self._want = state, want
        self._hdr.clear()

    def _header(self) -> None:
        h = bytes(self._hdr)
        if self._state == "magic":
            magic = int.from_bytes(h, "little")
            if h == _ZSTD_MAGIC:
                self._set("fhd", 1)
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._set("skippable", 4)
            else:
                raise self._bad("corrupt (unknown frame magic)")
        elif self._state == "fhd":
            fhd = h[0]
            fcs_flag, single, did_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
            self._checksum = 4 if fhd & 4 else 0
            rest = (0 if single else 1) + (0, 1, 2, 4)[did_flag] + ((1 if single else 0), 2, 4, 8)[fcs_flag]
            if rest:
                self._set("fhrest", rest)
            else:
                self._set("block", 3)
        elif self._state == "fhrest":
            self._set("block", 3)
        elif self._state == "block":
            v = int.from_bytes(h, "little")
            last, btype, size = v & 1, (v >> 1) & 3, v >> 3
            if btype == 3:
                raise self._bad("corrupt (reserved block type)")
            self._last = bool(last)
            self._set("payload_done", 0)
            self._skip = 1 if btype == 1 else size
            if self._skip == 0:
                self._next_after_payload()
        elif self._state == "skippable":
            self._set("payload_done", 0)
            self._last = None  # type: ignore[assignment]
            self._skip = int.from_bytes(h, "little")
            if self._skip == 0:
                self._next_after_payload()
        elif self._state == "checksum":
            self._set("magic", 4)

    def _next_after_payload(self) -> None:
        last = self._last
        if last is None:                 # end of a skippable frame
            self._set("magic", 4)
        elif not last:
            self._set("block", 3)
        elif self._checksum:
            self._set("checksum", self._checksum)
        else:
            self._set("magic", 4)

    def end(self) -> None:
        if self._state != "magic" or self._hdr or self._skip:
            raise self._bad("truncated")
