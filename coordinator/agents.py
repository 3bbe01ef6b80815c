"""The agent endpoint: the ROUTER every agent's DEALER talks to (WIRE-6 to WIRE-11).

Heartbeats are answered inline (memory only); HELLO, VERSIONS and catalog messages write
to the database, so they run as tasks and a database wait never stalls heartbeats.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import zmq.asyncio

from protocol import codec
from protocol.canonical import digest
from protocol.errors import MalformedMessage, Unauthorized, UnsupportedMessage
from protocol.message import Message
from protocol.messages import (CatalogDelta, CatalogSnapshot, Error, GrantAck, Heartbeat, HeartbeatAck, Hello,
                               RuntimeRefs, TaskAccepted, TaskProgress, TaskResult, TokenRequest, Versions)

from .grants import Grants
from .health import Health
from .keys import KeyRegistry
from .mirror import CatalogMirrors
from .nodes import NodeRegistry
from protocol.peers import PeerTable
from .router import RouterEndpoint
from .snapshots import refs as runtime_refs
from .tasks import TaskDispatcher

log = logging.getLogger(__name__)


class AgentEndpoint(RouterEndpoint):
    name = "agent endpoint"
    # 2 ms of added latency at most; at 5,000 heartbeats/s it turns ~10 wake-ups into one.
    coalesce_s = 0.002

    def __init__(self, sock: zmq.asyncio.Socket, registry: NodeRegistry, limits: codec.Limits,
                 peers: PeerTable, keys: KeyRegistry | None = None) -> None:
        super().__init__(sock, limits, peers)
        self.reg = registry
        self.mirrors = CatalogMirrors(registry)
        self.keys = keys  # None without CURVE (loopback tests): identities are trusted as given
        self.tasks: TaskDispatcher | None = None  # set by the server (WIRE-12)
        self.grants: Grants | None = None        # set by the server (DIST-4, DIST-5)
        # Set by the server: the tombstone finaliser for snapshots whose refs a report released (SNAP-14).
        self.on_refs_released: Callable[[list[str]], Awaitable[None]] | None = None

    async def _hello(self, msg: Hello, key: str | None) -> Message:
        if self.keys is not None:
            if key is None:
                raise Unauthorized("no CURVE key on this connection", {})
            await self.keys.on_hello(key, msg.node_id)  # NodeKeyPending / Unauthorized (SEC-3, NODE-1)
        welcome = await self.reg.hello(msg)
        if self.tasks is not None:
            # After the WELCOME reply is out (this coroutine's caller sends it first): WIRE-11.
            asyncio.get_running_loop().call_soon(self.tasks.on_session, msg.node_id)
        return welcome

    async def _runtime_refs(self, node_id: str, msg: RuntimeRefs) -> None:
        """WIRE-9, SNAP-19, SNAP-20: apply a complete ref report, in a worker thread, from a
        READY node only; the released snapshots go to the tombstone finaliser (SNAP-14)."""
        n = self.reg.get(node_id)
        try:
            # No refs digest to "" (as the agent sends); 100,000 refs take a while, so off the loop.
            if msg.digest != (await asyncio.to_thread(digest, msg.refs) if msg.refs else ""):
                raise MalformedMessage("RUNTIME_REFS digest does not match its refs", {"field": "digest"})
            async with n.lock:
                if self.reg.health(n) is not Health.READY:
                    log.info("node %s: runtime refs from a %s node not applied", node_id, self.reg.health(n))
                    return
                released = await asyncio.to_thread(runtime_refs.apply_report, self.reg.engine, node_id, msg.refs,
                                                   int(self.reg.clock() * 1000))
                n.refs_digest = msg.digest
        finally:
            if n.refs_pending == msg.digest:
                n.refs_pending = None
        log.info("node %s: %d runtime ref(s) reported%s", node_id, len(msg.refs),
                 f", released on {', '.join(released)}" if released else "")
        if released and self.on_refs_released is not None:
            try:
                await self.on_refs_released(released)
            except Exception:  # noqa: BLE001 — the finaliser's trouble is not the agent's
                log.exception("node %s: tombstone finaliser after a ref report failed", node_id)

    def on_message(self, ident: bytes, msg: Message, key: str | None) -> None:
        node_id = ident.decode("ascii", "replace")
        if self.keys is not None and not isinstance(msg, Hello) and self.keys.accepted_node(key) != node_id:
            # SEC-3: a pending key's (or a key speaking for another node's) messages are dropped.
            self.count_bad(ident, dropped=True, reason="message from a key not accepted for this node")
            return
        if isinstance(msg, Heartbeat):
            ack = self.reg.heartbeat(node_id, msg)
            if ack is None:
                self.send(HeartbeatAck.plain_frames(ident, msg.msg_id))
            else:
                self.reply(ident, ack)
        elif isinstance(msg, Hello):
            if msg.node_id != node_id:
                raise MalformedMessage("HELLO node_id must equal the DEALER identity",
                                       {"field": "node_id", "reason": "identity_mismatch"})
            self.spawn(ident, msg.msg_id, self._hello(msg, key))
        elif isinstance(msg, Versions):
            self.spawn(ident, msg.msg_id, self.reg.versions(node_id, msg))
        elif isinstance(msg, CatalogSnapshot):
            self.spawn(ident, msg.msg_id, self.mirrors.snapshot_page(node_id, msg))
        elif isinstance(msg, CatalogDelta):
            self.spawn(ident, msg.msg_id, self.mirrors.delta(node_id, msg))
        elif isinstance(msg, RuntimeRefs):
            # Pending at once: the heartbeat right behind this report must not ask for it again.
            self.reg.session(node_id, msg.session_id).refs_pending = msg.digest
            self.spawn(ident, msg.msg_id, self._runtime_refs(node_id, msg))
        elif isinstance(msg, (TaskAccepted, TaskProgress, TaskResult)):
            self.reg.touch(node_id)
            if self.tasks is not None:
                self.tasks.on_message(node_id, msg)
            else:
                log.info("node %s: %s for unknown task %s ignored", node_id, msg.TYPE, msg.task_id)
        elif isinstance(msg, GrantAck):
            self.reg.touch(node_id)
            if self.grants is not None:
                self.grants.on_ack(node_id, msg)
        elif isinstance(msg, TokenRequest):
            self.reg.touch(node_id)
            if self.grants is None:
                raise UnsupportedMessage("transfers are not served here", {"type": msg.TYPE})
            self.spawn(ident, msg.msg_id, self.grants.on_token_request(node_id, msg))
        elif isinstance(msg, Error):
            self.reg.touch(node_id)
            log.info("node %s: error %s %s", node_id, msg.name, msg.message)
        else:
            raise UnsupportedMessage(f"{msg.TYPE} is not accepted on the agent endpoint",
                                     {"field": "type", "type": msg.TYPE})
