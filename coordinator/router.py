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
import uuid
from typing import Any, Awaitable

import zmq
import zmq.asyncio

from protocol import codec, envelope
from protocol.errors import Internal, MalformedMessage, ProtocolError, TCError, UnsupportedProtocol
from protocol.message import Message, body_msg_id, decode_message
from protocol.messages import Error

from .peers import PeerTable

log = logging.getLogger(__name__)


class RouterEndpoint:
    name = "endpoint"
    batch = 2000

    def __init__(self, sock: zmq.asyncio.Socket, limits: codec.Limits, peers: PeerTable) -> None:
        self.sock = sock
        self.raw = zmq.Socket.shadow(sock.underlying)
        self.limits = limits
        self.peers = peers
        self.received = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self) -> None:
        while True:
            await self.sock.poll(flags=zmq.POLLIN)
            for _ in range(self.batch):
                try:
                    frames = self.raw.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.received += 1
                try:
                    self.handle(frames)
                except Exception:  # noqa: BLE001 — last line of defence: log and keep serving
                    log.exception("%s: unexpected fault (ref %s)", self.name, uuid.uuid4().hex[:12])
            await asyncio.sleep(0)  # let handler tasks and the other endpoints run between batches

    def handle(self, frames: list[bytes]) -> None:
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
            self.on_message(ident, msg)
        except TCError as exc:
            if exc.family == "protocol":
                self.count_bad(ident, dropped=False, reason=exc.message)
            self.reply(ident, Error.of(exc, getattr(msg, "msg_id", None)))

    def on_message(self, ident: bytes, msg: Message) -> None:
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
        try:
            self.raw.send_multipart(msg.to_frames(ident), zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone or HWM: the peer's own timeouts recover
            log.debug("%s: reply to %r dropped: %s", self.name, ident[:64], exc)

    def count_bad(self, ident: bytes, *, dropped: bool, reason: str) -> None:
        c = self.peers.record(ident, dropped=dropped)
        total = c.bad + c.dropped
        if total <= 3 or total % 1000 == 0:
            log.warning("%s: bad message from %r (%s); %d refused, %d dropped", self.name, ident[:64],
                        reason, c.bad, c.dropped)
