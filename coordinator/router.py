"""The shared shape of the coordinator's ROUTER endpoints (agents, admin).

One receive loop drains the socket in batches with non-blocking reads on a shadow of the
asyncio socket — several times cheaper per message than one ``await`` each. Every frame is
parsed and decoded here; bad ones are counted per peer (WIRE-2, SEC-8) and answered with an
error where a reply is possible. Subclasses see only decoded messages in ``on_message``.
Nothing a peer sends may end the loop (WIRE-5).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Awaitable

import zmq
import zmq.asyncio
import zmq.backend

from protocol import codec, envelope
from protocol.errors import Internal, MalformedMessage, ProtocolError, TCError, UnsupportedProtocol
from protocol.message import Message, body_msg_id, decode_message
from protocol.messages import Error

from protocol.peers import PeerTable

log = logging.getLogger(__name__)

# The hot path calls libzmq through pyzmq's backend with plain-int flags: the sugar layer's
# per-frame enum arithmetic (``SNDMORE | flags``) cost ~40 % of a heartbeat's socket time (tests/bench).
_send, _recv, _get = zmq.backend.Socket.send, zmq.backend.Socket.recv, zmq.backend.Socket.get
_NB, _NB_MORE, _RCVMORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE), int(zmq.RCVMORE)


def recv_frames(sock: zmq.Socket) -> list[bytes]:
    """One multipart message without blocking (zmq.Again when there is none)."""
    parts = [_recv(sock, _NB)]
    while _get(sock, _RCVMORE):
        parts.append(_recv(sock, _NB))
    return parts


def recv_frames_with_key(sock: zmq.Socket) -> tuple[list[bytes], str | None]:
    """Like ``recv_frames``, plus the CURVE public key the peer proved (the ``User-Id`` the
    ZAP handler set) — who sent a message is decided by its key, never by what it says."""
    first = _recv(sock, _NB, False)
    parts = [first.bytes]
    while _get(sock, _RCVMORE):
        parts.append(_recv(sock, _NB))
    try:
        key = first.get("User-Id")
    except zmq.ZMQError:
        key = None
    return parts, key


def send_frames(sock: zmq.Socket, frames: list[bytes]) -> None:
    """One multipart message without blocking (zmq.Again on HWM)."""
    last = len(frames) - 1
    for i, f in enumerate(frames):
        _send(sock, f, _NB if i == last else _NB_MORE)


class RouterEndpoint:
    name = "endpoint"
    batch = 2000
    slice_s = 0.005  # longest stretch one drain holds the loop, so admin requests are not starved
    coalesce_s = 0.0  # > 0: after a busy drain, wait this long before the next (batches wake-ups)

    def __init__(self, sock: zmq.asyncio.Socket, limits: codec.Limits, peers: PeerTable) -> None:
        self.sock = sock
        self.curve = bool(sock.getsockopt(zmq.CURVE_SERVER))
        self.raw = zmq.Socket.shadow(sock.underlying)
        self.limits = limits
        self.peers = peers
        self.received = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_drain = False
        self._drain_scheduled = False
        self._fd = -1
        self._watching = True

    async def run(self) -> None:
        """Serve until cancelled. The socket's descriptor drives ``_drain`` directly, with no
        future per wake-up; libzmq's descriptor is edge-triggered, so every drain reads until
        EAGAIN, and a send made outside a drain schedules one (a send can swallow the edge)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._fd = self.raw.getsockopt(zmq.FD)
        loop.add_reader(self._fd, self._drain)
        loop.call_soon(self._drain)  # messages that arrived before we watched the descriptor
        try:
            await loop.create_future()  # runs until cancelled
        finally:
            if self._watching:
                loop.remove_reader(self._fd)
            self._watching = False

    def _drain(self) -> None:
        self._drain_scheduled = False
        self._in_drain = True
        deadline = time.monotonic() + self.slice_s
        try:
            for i in range(self.batch):
                try:
                    if self.curve:
                        frames, key = recv_frames_with_key(self.raw)
                    else:
                        frames, key = recv_frames(self.raw), None
                except zmq.Again:
                    if i and self.coalesce_s and self._watching and self._loop is not None:
                        # Under load messages trickle in one by one, and a wake-up per message
                        # costs more than the message: stop watching for a moment, then read
                        # everything that arrived meanwhile in one go.
                        self._loop.remove_reader(self._fd)
                        self._watching = False
                        self._loop.call_later(self.coalesce_s, self._resume)
                    return
                except zmq.ZMQError as exc:  # socket closing at shutdown
                    log.debug("%s: receive failed: %s", self.name, exc)
                    return
                self.received += 1
                try:
                    self.handle(frames, key)
                except Exception:  # noqa: BLE001 — last line of defence: log and keep serving
                    log.exception("%s: unexpected fault (ref %s)", self.name, uuid.uuid4().hex[:12])
                if i & 63 == 63 and time.monotonic() > deadline:
                    break
            # Not drained yet: yield to other callbacks (admin requests, timers), then go on.
            self._schedule_drain()
        finally:
            self._in_drain = False

    def _resume(self) -> None:
        if not self._watching and self._loop is not None:
            self._loop.add_reader(self._fd, self._drain)
            self._watching = True
        self._drain()

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and self._loop is not None:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def handle(self, frames: list[bytes], key: str | None = None) -> None:
        """One message; ``key`` is the peer's CURVE public key (None without CURVE)."""
        ident = frames[0] if frames else b""
        if self.peers.ignored(ident):
            return
        try:
            env = envelope.parse(frames, router=True, limits=self.limits)
        except envelope.FrameDropped as exc:
            self.count_bad(ident, dropped=True, reason=exc.reason)
            return
        except (UnsupportedProtocol, MalformedMessage) as exc:
            self.count_bad(ident, dropped=False, reason=exc.message)
            self.reply(ident, Error.of(exc))
            return
        try:
            msg = decode_message(env, self.limits)
        except ProtocolError as exc:
            self.count_bad(ident, dropped=False, reason=exc.message)
            self.reply(ident, Error.of(exc, body_msg_id(env)))
            return
        try:
            self.on_message(ident, msg, key)
        except TCError as exc:
            if exc.family == "protocol":
                self.count_bad(ident, dropped=False, reason=exc.message)
            self.reply(ident, Error.of(exc, getattr(msg, "msg_id", None)))

    def on_message(self, ident: bytes, msg: Message, key: str | None) -> None:
        raise NotImplementedError

    def spawn(self, ident: bytes, msg_id: str | None, coro: Awaitable[Any]) -> None:
        """Run a slow handler as a task; its TCError becomes an ERROR reply to ``msg_id``."""
        async def run() -> None:
            try:
                reply = await coro
            except TCError as exc:
                reply = Error.of(exc, msg_id)
            except Exception:  # noqa: BLE001
                ref = uuid.uuid4().hex[:12]
                log.exception("%s: handler fault (ref %s)", self.name, ref)
                reply = Error.of(Internal(f"internal error (log ref {ref})", {"log_ref": ref}), msg_id)
            if isinstance(reply, Message):
                self.reply(ident, reply)
        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def reply(self, ident: bytes, msg: Message) -> None:
        self.send(msg.to_frames(ident))

    def send(self, frames: list[bytes]) -> None:
        try:
            send_frames(self.raw, frames)
        except zmq.ZMQError as exc:  # peer gone or HWM: the peer's own timeouts recover
            log.debug("%s: reply to %r dropped: %s", self.name, frames[0][:64], exc)
        if not self._in_drain:
            self._schedule_drain()

    def count_bad(self, ident: bytes, *, dropped: bool, reason: str) -> None:
        c = self.peers.record(ident, dropped=dropped)
        total = c.bad + c.dropped
        if total <= 3 or total % 1000 == 0:
            log.warning("%s: bad message from %r (%s); %d refused, %d dropped", self.name, ident[:64],
                        reason, c.bad, c.dropped)
