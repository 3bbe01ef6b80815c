"""The agent's blob ROUTER (SPEC WIRE-16, DIST-4, SEC-6, GC-14): other agents fetch artifacts here.

A FETCH ``{msg_id, artifact_id, file, offset, length ≤ 1 MiB, token}`` is answered by one
CHUNK ``{parent_id, artifact_id, file, offset, length, data, sha256, eof, zero}`` or one ERROR.
Checks, in this order:

1. the artifact is held here (a ``verified`` catalog entry of kind ``artifact``), else
   ArtifactNotFound — asked first, so a FETCH for something this node does not hold gets the
   same answer however incomplete it is;
2. the FETCH is well formed (WIRE-3), else MalformedMessage naming the field;
3. a live grant matches artifact, token and requester (see ``agent/grants.py`` for what is
   matched with and without CURVE), else TransferTokenInvalid / TransferTokenExpired;
4. ``file`` is one of the entry's ``files`` and ``offset`` lies inside it, else InvalidRequest.

The bytes come from ``store/artifacts/<artifact_id>/<file>``: a path made of a validated id and
a name the catalog lists, never of what the message says (SEC-7). Reads and digests run on a
small thread pool of the server's own (``pread`` and ``hashlib`` release the GIL), so neither
a slow disk nor a busy build stalls the loop; replies go out as they finish, in any order
(each CHUNK names its offset). A range of zero bytes (a hole of a sparse ext4) travels as
``zero=True`` with empty ``data``. Chunk digests are cached per (artifact, file, offset,
length) — artifacts never change — so serving the same artifact to many targets (fan-out,
DIST-3) hashes each chunk once.

Frames that are not ``TC…`` are dropped and counted, ``TC<n>`` gets UnsupportedProtocol and
broken ``TC1`` frames MalformedMessage (WIRE-1, WIRE-5). With CURVE on, a ZAP handler lets
every key finish the handshake (the grant decides per FETCH) so the peer's key is known.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from protocol import codec, ids
from protocol.daemon import configure_socket
from protocol.envelope import FrameDropped, parse
from protocol.errors import InvalidRequest, TCError, UnsupportedMessage, error_class
from protocol.keys import KeyPair
from protocol.message import body_msg_id
from protocol.messages import Chunk, Error, Fetch
from protocol.peers import PeerTable

from .catalog import ARTIFACT_KIND, Catalog
from .config import AgentConfig
from .grants import GrantTable, short

log = logging.getLogger("blobs")

_WILDCARD_HOSTS = ("0.0.0.0", "*", "[::]", "::")
ZAP_DOMAIN = "blobs"
READ_THREADS = 4
_DIGEST_CACHE_MAX = 1 << 16  # entries; 64 GiB of artifacts at 1 MiB chunks


def advertised(bound: str, address: str) -> str:
    """The endpoint peers should dial: a wildcard bind host is replaced by the node address."""
    if not bound.startswith("tcp://"):
        return bound
    host, _, port = bound[len("tcp://"):].rpartition(":")
    if host in _WILDCARD_HOSTS:
        host = f"[{address}]" if ":" in address else address
    return f"tcp://{host}:{port}"


@functools.lru_cache(maxsize=8)
def zeros(n: int) -> bytes:
    return bytes(n)


@functools.lru_cache(maxsize=8)
def zero_digest(n: int) -> str:
    return hashlib.sha256(zeros(n)).hexdigest()


@dataclass(frozen=True, slots=True)
class _Read:
    """A FETCH that passed every check: read ``length`` bytes of ``path`` at ``offset``."""
    identity: bytes
    fetch: Fetch
    path: Path
    length: int
    eof: bool


class _AllowAll:
    """ZAP credentials provider: every CURVE key may connect; grants decide what it gets."""

    def callback(self, domain: str, key: bytes) -> bool:
        return True


def _peer_name(peer: bytes) -> str:
    """A CURVE key prints as itself (Z85 is printable), a ROUTER identity as hex."""
    try:
        text = peer.decode("ascii")
        return text if text.isprintable() else peer.hex()
    except UnicodeDecodeError:
        return peer.hex()


class BlobServer:
    """Owns the blob ROUTER; ``bind()`` before READY, then run ``serve()`` as a task.

    Without a catalog and a grant table (a harness) every FETCH gets ArtifactNotFound."""

    def __init__(self, ctx: zmq.asyncio.Context, cfg: AgentConfig, pair: "KeyPair | None" = None, *,
                 catalog: Catalog | None = None, grants: GrantTable | None = None) -> None:
        self._cfg = cfg
        self._limits = cfg.codec.limits()
        self._catalog = catalog
        self._grants = grants
        self._artifacts = Path(cfg.agent.state_dir) / "store" / "artifacts"
        self._sock = ctx.socket(zmq.ROUTER)
        configure_socket(self._sock, hwm=cfg.zmq.hwm, linger=cfg.zmq.linger, max_frame=cfg.codec.max_frame)
        self._curve = pair is not None
        self._auth: Any = None
        if pair is not None:  # SEC-1: encrypted with this node's key; grants decide access
            from zmq.auth.asyncio import AsyncioAuthenticator
            self._auth = AsyncioAuthenticator(ctx)
            self._auth.start()
            self._auth.configure_curve_callback(ZAP_DOMAIN, _AllowAll())
            self._sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
            self._sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret.encode())
            self._sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public.encode())
            self._sock.setsockopt(zmq.CURVE_SERVER, 1)
        self.endpoint = ""
        # reason -> count, and per peer (its CURVE key, else its ROUTER identity) for SEC-8: a
        # peer past security.max_bad_msgs bad requests a minute is ignored for the cool-down.
        self.counters: collections.Counter[str] = collections.Counter()
        self.peers = PeerTable(cfg.security.max_bad_msgs, float(cfg.security.bad_peer_cooldown))
        self._pool = concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="blob-read")
        self._slots = asyncio.Semaphore(4 * READ_THREADS)
        self._inflight: set[asyncio.Task[None]] = set()
        self._digests: dict[tuple[str, str, int, int], tuple[str, bool]] = {}
        self._corrupt_left = int(cfg.transfer.test_corrupt_chunks)
        self._delay = float(cfg.transfer.test_chunk_delay)
        self.served_bytes = 0

    def bind(self) -> str:
        """Bind ``agent.blob_endpoint`` (a ``*`` port picks a free one) and return the real endpoint."""
        self._sock.bind(self._cfg.agent.blob_endpoint)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    async def serve(self) -> None:
        try:
            while True:
                frames = await self._sock.recv_multipart(copy=False)
                key: str | None = None
                if self._curve:
                    try:
                        key = frames[0].get("User-Id")
                    except zmq.ZMQError:
                        key = None
                raw = [f.bytes for f in frames]
                peer = key.encode() if key else raw[0]
                if self.peers.ignored(peer):
                    self.counters["ignored"] += 1
                    continue
                try:
                    reply = self._handle(raw, key, peer)
                except Exception:  # noqa: BLE001 — a bad request must never stop the blob server (WIRE-5)
                    log.exception("blob request handling failed")
                    self.counters["internal"] += 1
                    continue
                if isinstance(reply, _Read):
                    await self._slots.acquire()  # back-pressure: stop reading requests while full
                    task = asyncio.create_task(self._serve_read(reply))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
                elif reply is not None:
                    await self._reply(reply)
        finally:
            for task in list(self._inflight):
                task.cancel()

    async def _reply(self, frames: list[bytes]) -> None:
        try:
            await self._sock.send_multipart(frames, flags=zmq.DONTWAIT, copy=False)
        except zmq.ZMQError as exc:  # peer gone or its queue full: nothing to do
            self.counters["reply_dropped"] += 1
            log.debug("blob reply dropped: %s", exc)

    def _bad(self, peer: bytes, reason: str, *, dropped: bool) -> None:
        self.counters[reason] += 1
        c = self.peers.record(peer, dropped=dropped)
        if c.window_bad == self.peers.max_bad + 1:
            log.warning("blob endpoint: peer %s sent more than %d bad requests in a minute; ignoring it for %gs",
                        _peer_name(peer), self.peers.max_bad, self.peers.cooldown)

    def _handle(self, frames: list[bytes], key: str | None, peer: bytes = b"") -> list[bytes] | _Read | None:
        try:
            env = parse(frames, router=True, limits=self._limits)
        except FrameDropped as exc:
            self._bad(peer, f"dropped:{exc.reason}", dropped=True)
            log.info("blob endpoint dropped a frame: %s", exc.reason)
            return None
        except TCError as exc:  # UnsupportedProtocol or MalformedMessage: the peer gets told why
            self._bad(peer, exc.name, dropped=False)
            return Error.of(exc).to_frames(bytes(frames[0]))
        parent = body_msg_id(env)
        assert env.identity is not None
        try:
            body = codec.decode(env.body, self._limits)
            if env.msg_type != "FETCH":
                raise UnsupportedMessage(f"the blob endpoint does not serve {env.msg_type}",
                                         {"type": env.msg_type})
            return self._check_fetch(env.identity, body, key)
        except TCError as exc:
            self._bad(peer, exc.name, dropped=False)
            if exc.name.startswith("TransferToken"):
                log.info("FETCH refused (%s): %s", exc.name, exc.message)
            return Error.of(exc, parent).to_frames(env.identity)

    def _check_fetch(self, identity: bytes, body: dict[str, Any], key: str | None) -> _Read:
        art = body.get("artifact_id")
        entry = None
        if self._catalog is not None and ids.valid("artifact", art):
            entry = self._catalog.get(ARTIFACT_KIND, art)
        if entry is None or entry["body"].get("state") != "verified" or self._grants is None:
            what = art[:64] if isinstance(art, str) else "requested"
            raise error_class("ArtifactNotFound")(f"artifact {what} is not held by this node",
                                                  {"artifact_id": what})
        fetch = Fetch.from_body(body)
        assert isinstance(fetch, Fetch)
        self._grants.check(fetch.artifact_id, fetch.token, key, identity)
        size = next((f.get("size") for f in entry["body"].get("files") or ()
                     if isinstance(f, dict) and f.get("name") == fetch.file), None)
        if not isinstance(size, int):
            raise InvalidRequest(f"artifact {fetch.artifact_id} has no file {fetch.file}",
                                 {"field": "file", "reason": "unknown"})
        if fetch.offset > size:
            raise InvalidRequest(f"offset {fetch.offset} is past the end of {fetch.file} ({size} bytes)",
                                 {"field": "offset", "reason": "range"})
        length = min(fetch.length, size - fetch.offset)
        return _Read(identity, fetch, self._artifacts / fetch.artifact_id / fetch.file, length,
                     fetch.offset + length >= size)

    async def _serve_read(self, job: _Read) -> None:
        try:
            loop = asyncio.get_running_loop()
            try:
                # Read, digest and encode in the pool: packing 1 MiB is a copy the event loop
                # (which also receives every FETCH) should not make.
                frames = await loop.run_in_executor(self._pool, self._read_frames, job)
                self.served_bytes += job.length
            except OSError as exc:  # the file vanished or the disk failed: the target tries elsewhere
                log.warning("FETCH %s %s@%d failed: %s", job.fetch.artifact_id, job.fetch.file,
                            job.fetch.offset, exc)
                self.counters["read_failed"] += 1
                err = error_class("ArtifactNotFound")(
                    f"artifact {job.fetch.artifact_id} cannot be read on this node: {exc.strerror}",
                    {"artifact_id": job.fetch.artifact_id})
                frames = Error.of(err, job.fetch.msg_id).to_frames(job.identity)
            if self._delay:
                await asyncio.sleep(self._delay)
            await self._reply(frames)
        finally:
            self._slots.release()

    def _read_frames(self, job: _Read) -> list[bytes]:
        return self._read(job).to_frames(job.identity)

    def _read(self, job: _Read) -> Chunk:
        """In a pool thread: the bytes, their digest (cached) and the zero flag."""
        f = job.fetch
        cache_key = (f.artifact_id, f.file, f.offset, job.length)
        cached = self._digests.get(cache_key)
        data = b""
        if cached is None or not cached[1]:  # a cached zero range needs no read at all
            fd = os.open(job.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.pread(fd, job.length, f.offset)
            finally:
                os.close(fd)
            if len(data) != job.length:
                raise OSError(5, f"short read ({len(data)} of {job.length} bytes)")
        if cached is None:
            zero = data == zeros(job.length)
            cached = (zero_digest(job.length) if zero else hashlib.sha256(data).hexdigest(), zero)
            if len(self._digests) >= _DIGEST_CACHE_MAX:
                self._digests.clear()
            self._digests[cache_key] = cached
        digest, zero = cached
        if zero:
            data = b""
        if self._corrupt_left > 0:  # test-only fault (transfer.test_corrupt_chunks)
            self._corrupt_left -= 1
            if zero:
                data, zero = b"\x01" + zeros(job.length - 1) if job.length else b"", False
            elif data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
        return Chunk(parent_id=f.msg_id, artifact_id=f.artifact_id, file=f.file, offset=f.offset,
                     length=job.length, data=data, sha256=digest, eof=job.eof, zero=zero or None)

    def close(self, linger_ms: int) -> None:
        self._sock.close(linger=linger_ms)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._auth is not None:
            self._auth.stop()


__all__ = ["BlobServer", "advertised", "zeros", "zero_digest", "short"]
