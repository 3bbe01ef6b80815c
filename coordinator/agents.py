"""The agent endpoint: a ROUTER that serves every agent's DEALER (WIRE-1 to WIRE-11).

One receive loop drains the socket in batches with non-blocking reads on a shadow of the
asyncio socket, which is several times cheaper per message than one ``await`` each; slow
handlers (HELLO, VERSIONS, catalog pages — they write to the database) run as tasks so a
database wait never stalls heartbeats. Nothing a peer sends may crash the loop (WIRE-5).
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, Awaitable

import zmq
import zmq.asyncio

from protocol import codec, envelope
from protocol.errors import (Internal, MalformedMessage, ProtocolError, TCError, UnsupportedMessage,
                             UnsupportedProtocol)
from protocol.message import Message, body_msg_id, decode_message
from protocol.messages import (CatalogDelta, CatalogSnapshot, Error, Heartbeat, Hello, RuntimeRefs,
                               TaskAccepted, TaskProgress, TaskResult, Versions)

from .mirror import CatalogMirrors
from .nodes import NodeRegistry
from .peers import PeerTable

log = logging.getLogger(__name__)
BATCH = 2000


class AgentEndpoint:
    def __init__(self, sock: zmq.asyncio.Socket, registry: NodeRegistry, limits: codec.Limits,
                 peers: PeerTable) -> None:
        self.sock = sock
        self.raw = zmq.Socket.shadow(sock.underlying)
        self.reg = registry
        self.mirrors = CatalogMirrors(registry)
        self.limits = limits
        self.peers = peers
        self.serving = True  # False on a standby or a deposed leader (HA-3, HA-4)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.received = 0

    async def run(self) -> None:
        while True:
            await self.sock.poll(flags=zmq.POLLIN)
            for _ in range(BATCH):
                try:
                    frames = self.raw.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.received += 1
                try:
                    self.handle(frames)
                except Exception:  # noqa: BLE001 — last line of defence: log, count, keep serving
                    ref = uuid.uuid4().hex[:12]
                    log.exception("agent endpoint: unexpected fault (ref %s)", ref)
            await asyncio.sleep(0)  # let HELLO tasks and other endpoints run between batches

    # --- one message -----------------------------------------------------------------
    def handle(self, frames: list[bytes]) -> None:
        ident = frames[0] if frames else b""
        if self.peers.ignored(ident):
            return
        try:
            env = envelope.parse(frames, router=True, limits=self.limits)
        except envelope.FrameDropped as exc:
            self._count(ident, dropped=True, reason=exc.reason)
            return
        except (UnsupportedProtocol, MalformedMessage) as exc:
            self._count(ident, dropped=False, reason=exc.message)
            self.reply(ident, Error.of(exc))
            return
        try:
            msg = decode_message(env, self.limits)
        except ProtocolError as exc:
            self._count(ident, dropped=False, reason=exc.message)
            self.reply(ident, Error.of(exc, body_msg_id(env)))
            return
        try:
            self.dispatch(ident, msg)
        except TCError as exc:
            self.reply(ident, Error.of(exc, getattr(msg, "msg_id", None)))

    def dispatch(self, ident: bytes, msg: Message) -> None:
        node_id = ident.decode("ascii", "replace")
        if isinstance(msg, Heartbeat):
            self.reply(ident, self.reg.heartbeat(node_id, msg))
        elif isinstance(msg, Hello):
            if msg.node_id != node_id:
                self._count(ident, dropped=False, reason="HELLO node_id differs from socket identity")
                raise MalformedMessage("HELLO node_id must equal the DEALER identity",
                                       {"field": "node_id", "reason": "identity_mismatch"})
            self._spawn(ident, msg.msg_id, self._hello(ident, msg))
        elif isinstance(msg, Versions):
            self._spawn(ident, msg.msg_id, self.reg.versions(node_id, msg))
        elif isinstance(msg, CatalogSnapshot):
            self._spawn(ident, msg.msg_id, self.mirrors.snapshot_page(node_id, msg))
        elif isinstance(msg, CatalogDelta):
            self._spawn(ident, msg.msg_id, self.mirrors.delta(node_id, msg))
        elif isinstance(msg, RuntimeRefs):
            self.reg.session(node_id, msg.session_id)  # runtime refs arrive with the snapshot issue
        elif isinstance(msg, (TaskAccepted, TaskProgress, TaskResult)):
            self.reg.touch(node_id)
            log.info("node %s: %s for unknown task %s ignored", node_id, msg.TYPE, msg.task_id)
        elif isinstance(msg, Error):
            self.reg.touch(node_id)
            log.info("node %s: error %s %s", node_id, msg.name, msg.message)
        else:
            self._count(ident, dropped=False, reason=f"unexpected {msg.TYPE}")
            raise UnsupportedMessage(f"{msg.TYPE} is not accepted on the agent endpoint",
                                     {"field": "type", "type": msg.TYPE})

    async def _hello(self, ident: bytes, msg: Hello) -> None:
        self.reply(ident, await self.reg.hello(msg))

    def _spawn(self, ident: bytes, msg_id: str, coro: Awaitable[Any]) -> None:
        async def run() -> None:
            try:
                await coro
            except TCError as exc:
                self.reply(ident, Error.of(exc, msg_id))
            except Exception:  # noqa: BLE001
                ref = uuid.uuid4().hex[:12]
                log.exception("agent endpoint: handler fault (ref %s)", ref)
                self.reply(ident, Error.of(Internal("internal error", {"log_ref": ref}), msg_id))
        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def reply(self, ident: bytes, msg: Message) -> None:
        try:
            self.raw.send_multipart(msg.to_frames(ident), zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone or HWM: the agent's liveness logic recovers
            log.debug("reply to %r dropped: %s", ident[:64], exc)

    def _count(self, ident: bytes, *, dropped: bool, reason: str) -> None:
        c = self.peers.record(ident, dropped=dropped)
        n = self.reg.nodes.get(ident.decode("ascii", "replace")) if ident else None
        if n is not None:
            n.bad_messages, n.dropped = c.bad, c.dropped
        if c.bad + c.dropped <= 3 or (c.bad + c.dropped) % 1000 == 0:
            log.warning("agent endpoint: bad message from %r (%s); %d refused, %d dropped",
                        ident[:64], reason, c.bad, c.dropped)
