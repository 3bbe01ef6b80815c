"""The admin endpoint: a ROUTER serving tcctl (WIRE-19, SEC-5).

The default is an ``ipc://`` socket protected by file permissions: its directory is 0750
owned by root and the service group, and the socket is chmod 0660 after bind — never via
the process umask, which races with threads (TOOLS.md §4). Each request runs as its own
task: there is no "one command at a time" lock (STYLE avoid-1).
"""
from __future__ import annotations

import grp
import logging
import os
from pathlib import Path

import zmq
import zmq.asyncio

from protocol import codec
from protocol.errors import UnsupportedMessage
from protocol.message import Message
from protocol.messages import Admin

from protocol.peers import PeerTable
from ..router import RouterEndpoint
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


class AdminEndpoint(RouterEndpoint):
    name = "admin endpoint"
    batch = 1000

    def __init__(self, sock: zmq.asyncio.Socket, ctx: AdminContext, limits: codec.Limits,
                 progress_every: float, peers: PeerTable) -> None:
        super().__init__(sock, limits, peers)
        self.ctx = ctx
        self.progress_every = progress_every

    def on_message(self, ident: bytes, msg: Message, key: str | None) -> None:
        if not isinstance(msg, Admin):
            raise UnsupportedMessage(f"{msg.TYPE} is not accepted on the admin endpoint",
                                     {"field": "type", "type": msg.TYPE})
        # Each request is its own task: no "one command at a time" lock.
        self.spawn(ident, msg.msg_id,
                   dispatch(self.ctx, msg, lambda m: self.reply(ident, m), self.progress_every))
