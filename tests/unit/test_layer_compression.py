"""Layer decompression, magic checks and diff_id verification (SPEC IMG-7, IMG-8, IMG-16)."""
from __future__ import annotations

import gzip
import io
import os
import tracemalloc
import zlib
from pathlib import Path

import pytest
import zstandard

from agent.image.compression import open_layer, sniff
from agent.image.model import (
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    Descriptor,
    Layer,
)
from agent.image.unpack import UnpackLimits, UnpackState, apply_layer
from protocol.errors import ImageDigestMismatch, ImageInvalid, ImageLimitExceeded
from tests.layers import File, digest, gzip_layer, layer

MEDIA = {"none": OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}
TAR = layer([File("etc/os-release", b"ID=test\n"), File("big", os.urandom(300_000) * 4)])


def zstd(data: bytes, **kw: object) -> bytes:
    return zstandard.ZstdCompressor(**kw).compress(data)


def make(blob: bytes, compression: str, diff_id: str | None = None) -> Layer:
    return Layer(Descriptor(MEDIA[compression], digest(blob), len(blob)), compression, diff_id or digest(TAR))


def decompress(blob: bytes, lay: Layer, **kw: object) -> bytes:
    reader = open_layer(io.BytesIO(blob), lay)
    out = reader.read()
    reader.finish(**kw)
    return out


@pytest.mark.parametrize("compression,blob", [
    ("none", TAR), ("gzip", gzip_layer(TAR)), ("zstd", zstd(TAR)), ("zstd", zstd(TAR, write_checksum=True)),
])
def test_round_trip(compression: str, blob: bytes) -> None:
    """IMG-7/IMG-8: each supported compression decompresses to the tar whose sha256 is the diff_id."""
    assert decompress(blob, make(blob, compression)) == TAR


def test_small_reads_and_readinto() -> None:
    """The reader serves tarfile-sized reads (short reads only at chunk boundaries) and readinto."""
    blob = gzip_layer(TAR)
    reader = open_layer(io.BytesIO(blob), make(blob, "gzip"))
    parts = []
    buf = bytearray(10240)
    while True:
        n = reader.readinto(buf)
        if not n:
            break
        parts.append(bytes(buf[:n]))
        parts.append(reader.read(777))
    assert b"".join(parts) == TAR
    assert reader.finish() == digest(TAR)


def test_multi_member_gzip_and_zero_padding() -> None:
    """IMG-7: concatenated gzip members are one stream; zero padding after the last member is ignored."""
    blob = gzip_layer(TAR[:1000]) + gzip_layer(TAR[1000:50_000]) + gzip_layer(TAR[50_000:]) + b"\0" * 100
    assert decompress(blob, make(blob, "gzip")) == TAR


def test_multi_frame_zstd() -> None:
    """IMG-7: concatenated zstd frames (e.g. from a parallel compressor) are one stream."""
    blob = zstd(TAR[:5000], write_checksum=True) + zstd(TAR[5000:])
    assert decompress(blob, make(blob, "zstd")) == TAR


def test_gzip_with_junk_after_member_is_invalid() -> None:
    blob = gzip_layer(TAR) + b"JUNKJUNK"
    lay = make(blob, "gzip")
    with pytest.raises(ImageInvalid) as exc:
        decompress(blob, lay)
    assert lay.digest in exc.value.message


@pytest.mark.parametrize("declared,blob,actual", [
    ("gzip", zstd(TAR), "zstd"),
    ("none", gzip_layer(TAR), "gzip"),
    ("zstd", TAR, "tar"),
    ("gzip", b"\xfd7zXZ\x00" + b"\0" * 100, "xz"),
])
def test_declared_compression_must_match_magic(declared: str, blob: bytes, actual: str) -> None:
    """IMG-7: compression is checked against the magic bytes; the error names digest, declared and actual."""
    lay = make(blob, declared)
    with pytest.raises(ImageInvalid) as exc:
        open_layer(io.BytesIO(blob), lay)
    msg = exc.value.message
    assert lay.digest in msg and f"declared tar{'' if declared == 'none' else '+' + declared}" in msg
    assert f"bytes are {actual}" in msg
    assert exc.value.details["digest"] == lay.digest


def test_sniff() -> None:
    assert sniff(b"\x1f\x8b\x08") == "gzip"
    assert sniff(b"\x28\xb5\x2f\xfd\x00") == "zstd"
    assert sniff(TAR[:512]) == "none"
    assert sniff(b"\0" * 1024) == "none"  # an empty layer of zero blocks is a valid plain tar
    assert sniff(b"") == "none"


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.parametrize("cut", [0.5, 0.999, 20])
def test_truncated_compressed_layer_is_invalid(compression: str, cut: float) -> None:
    """IMG-8: a truncated or corrupt gzip/zstd blob is ImageInvalid naming the layer digest."""
    full = gzip_layer(TAR) if compression == "gzip" else zstd(TAR)
    blob = full[:int(cut if cut > 1 else len(full) * cut)]
    lay = make(blob, compression)
    with pytest.raises(ImageInvalid) as exc:
        decompress(blob, lay)
    assert lay.digest in exc.value.message


def test_corrupt_gzip_is_invalid() -> None:
    full = bytearray(gzip_layer(TAR))
    full[len(full) // 2] ^= 0xFF
    lay = make(bytes(full), "gzip")
    with pytest.raises(ImageInvalid) as exc:
        decompress(bytes(full), lay)
    assert lay.digest in exc.value.message


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_wrong_diff_id_is_digest_mismatch(compression: str) -> None:
    """IMG-8: the uncompressed sha256 must equal the config's diff_id."""
    blob = {"none": TAR, "gzip": gzip_layer(TAR), "zstd": zstd(TAR)}[compression]
    wrong = digest(b"something else")
    lay = make(blob, compression, diff_id=wrong)
    with pytest.raises(ImageDigestMismatch) as exc:
        decompress(blob, lay)
    assert exc.value.details == {"digest": lay.digest, "expected": wrong, "actual": digest(TAR)}


def test_finish_drains_what_the_unpacker_left(tmp_path: Path) -> None:
    """IMG-8/IMG-16: the unpacker stops after the end-of-archive blocks; finish() hashes the rest."""
    tar = layer([File("a", b"hello")]) + b"\0" * 100_000  # extra padding after the end-of-archive
    blob = gzip_layer(tar)
    lay = Layer(Descriptor(OCI_LAYER_GZIP, digest(blob), len(blob)), "gzip", digest(tar))
    root = tmp_path / "root"
    root.mkdir()
    reader = open_layer(io.BytesIO(blob), lay)
    apply_layer(root, reader, UnpackLimits(), UnpackState())
    assert reader.bytes_read < len(tar)
    assert reader.finish(max_bytes=1 << 20) == digest(tar)
    assert (root / "a").read_bytes() == b"hello"


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_bomb_drain_is_bounded(compression: str) -> None:
    """IMG-16: a small blob expanding to 4 GiB of zeros behind the end-of-archive stops at max_bytes."""
    head = layer([File("a", b"x")])
    member = b"\0" * (64 << 20)
    if compression == "gzip":  # concatenated members: 64 x 64 MiB of zeros
        first, rest = gzip.compress(head + member, 9, mtime=0), gzip.compress(member, 9, mtime=0)
    else:  # concatenated frames
        first, rest = zstd(head + member, level=19), zstd(member, level=19)
    blob = first + rest * 63
    assert len(blob) < 8 << 20
    lay = make(blob, compression, diff_id=digest(b"whatever"))
    reader = open_layer(io.BytesIO(blob), lay, max_bytes=16 << 20)
    reader.read(4096)
    with pytest.raises(ImageLimitExceeded) as exc:
        reader.finish()
    assert exc.value.details["limit"] == "bytes"
    assert reader.bytes_out < (16 << 20) + (2 << 20)


def test_streaming_memory_is_bounded() -> None:
    """Decompression is streaming: 64 MiB of output never sits in memory at once."""
    size = 64 << 20
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    chunk = os.urandom(1 << 16) * 16  # 1 MiB, compressible enough to keep the blob small
    blob = b"".join(comp.compress(chunk) for _ in range(size >> 20)) + comp.flush()
    import hashlib
    h = hashlib.sha256()
    for _ in range(size >> 20):
        h.update(chunk)
    lay = Layer(Descriptor(OCI_LAYER_GZIP, digest(blob), len(blob)), "gzip", "sha256:" + h.hexdigest())
    raw = io.BytesIO(blob)
    tracemalloc.start()
    try:
        reader = open_layer(raw, lay)
        total = 0
        while data := reader.read(10240):
            total += len(data)
        reader.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size
    assert peak < 8 << 20, peak


def test_gzip_module_output_matches() -> None:
    """Interop: blobs written by the stdlib gzip module with a file name and mtime decompress too."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="layer.tar", mode="wb", fileobj=buf, mtime=123) as g:
        g.write(TAR)
    blob = buf.getvalue()
    assert decompress(blob, make(blob, "gzip")) == TAR
