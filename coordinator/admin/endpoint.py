"""The admin endpoint: a ROUTER serving tcctl (WIRE-19, SEC-5).

The default is an ``ipc://`` socket protected by file permissions: its directory is 0750
owned by root and the service group, and the socket is chmod 0660 after bind — never via
the process umask, which races with threads (TOOLS.md §4). Each request runs as its own
task: there is no "one command at a time" lock (STYLE avoid-1).
"""
from __future__ import annotations

import asyncio
import grp
import logging
import os
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from protocol import codec, envelope
from protocol.errors import MalformedMessage, ProtocolError, UnsupportedMessage, UnsupportedProtocol
from protocol.message import Message, body_msg_id, decode_message
from protocol.messages import Admin, Error

from ..peers import PeerTable
from .context import AdminContext
from .dispatcher import dispatch

log = logging.getLogger(__name__)


def ipc_path(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None


def prepare_ipc_dir(endpoint: str, group: str) -> int | None:
    """Create the socket's directory 0750, group-owned by ``group`` when it exists (SEC-5).
    Returns the gid to give the socket, or None to keep the process's group."""
    path = ipc_path(endpoint)
    if path is None:
        return None
    gid: int | None = None
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            log.warning("admin group %r does not exist; the admin socket keeps group %d", group, os.getgid())
    path.parent.mkdir(parents=True, exist_ok=True)
    if gid is not None and os.geteuid() == 0:
        os.chown(path.parent, 0, gid)
    os.chmod(path.parent, 0o750)
    if path.exists() or path.is_symlink():
        path.unlink()  # a socket left by a previous run (libzmq does not remove it)
    return gid


def secure_ipc_socket(endpoint: str, gid: int | None) -> None:
    path = ipc_path(endpoint)
    if path is None:
        return
    if gid is not None and os.geteuid() == 0:
        os.chown(path, 0, gid)
    os.chmod(path, 0o660)


class AdminEndpoint:
    def __init__(self, sock: zmq.asyncio.Socket, ctx: AdminContext, limits: codec.Limits,
                 progress_every: float, peers: PeerTable) -> None:
        self.sock = sock
        self.raw = zmq.Socket.shadow(sock.underlying)
        self.ctx = ctx
        self.limits = limits
        self.progress_every = progress_every
        self.peers = peers
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self) -> None:
        while True:
            await self.sock.poll(flags=zmq.POLLIN)
            for _ in range(1000):
                try:
                    frames = self.raw.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    self.handle(frames)
                except Exception:  # noqa: BLE001 — never let one request end the endpoint
                    log.exception("admin endpoint: unexpected fault")
            await asyncio.sleep(0)

    def handle(self, frames: list[bytes]) -> None:
        ident = frames[0] if frames else b""
        if self.peers.ignored(ident):
            return
        try:
            env = envelope.parse(frames, router=True, limits=self.limits)
        except envelope.FrameDropped:
            self.peers.record(ident, dropped=True)
            return
        except (UnsupportedProtocol, MalformedMessage) as exc:
            self.peers.record(ident, dropped=False)
            self.reply(ident, Error.of(exc))
            return
        try:
            msg = decode_message(env, self.limits)
            if not isinstance(msg, Admin):
                raise UnsupportedMessage(f"{msg.TYPE} is not accepted on the admin endpoint",
                                         {"field": "type", "type": msg.TYPE})
        except ProtocolError as exc:
            self.peers.record(ident, dropped=False)
            self.reply(ident, Error.of(exc, body_msg_id(env)))
            return
        task = asyncio.ensure_future(self._run(ident, msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, ident: bytes, req: Admin) -> None:
        reply = await dispatch(self.ctx, req, lambda m: self.reply(ident, m), self.progress_every)
        self.reply(ident, reply)

    def reply(self, ident: bytes, msg: Message) -> None:
        try:
            self.raw.send_multipart(msg.to_frames(ident), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("admin reply dropped: %s", exc)
