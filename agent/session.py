"""The agent's link to the coordinator (SPEC WIRE-6 to WIRE-11, WIRE-20, HA-4, CAT-5).

One DEALER, identity = node id, is opened per connection attempt and thrown away when the
attempt ends (Paranoid Pirate style): a fresh socket cannot deliver anything queued for
the previous coordinator. The loop has three nested levels:

``run``         forever: open a DEALER to ``endpoints[i]``, ``_serve`` it, close it, pick the
                next endpoint (``Leave.goto``), sleep ``Backoff.next_delay()``, repeat.
``_serve``      on one socket: ``_hello`` → WELCOME → ``_live``; when ``_live`` ends with
                SessionUnknown it HELLOs again at once on the same socket (WIRE-11).
``_live``       the session: heartbeats every H, full reports on request, liveness watch,
                and CATALOG_DELTAs after catalog changes (CAT-4, coalesced ≤ 0.5 s; the
                :class:`~agent.catalog.CatalogFeed` keeps the seq the coordinator has).

Every send is non-blocking: with IMMEDIATE a DEALER without a live connection refuses to
queue, and a dropped beat is better than a wedged loop — liveness notices a dead link.

What a live session reports (heartbeats, versions, runtime refs, catalog snapshots and
deltas) is in :mod:`agent.session_sync`; its value types are in :mod:`agent.session_state`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Literal

import zmq
import zmq.asyncio

from zmq.utils.monitor import recv_monitor_message

from protocol import canonical
from protocol.keys import KeyPair, fingerprint
from protocol.daemon import configure_socket
from protocol.envelope import FrameDropped, parse
from protocol.errors import TCError, UnsupportedMessage
from protocol.message import Message, decode_message
from protocol.messages import (Error, Grant, HeartbeatAck, Hello, Revoke, Task, TaskAccepted, TaskCancel, TaskResult,
                               TokenGrant, Welcome)

from . import facts as host
from .backoff import Backoff
from .catalog import Catalog, CatalogFeed
from .config import AgentConfig
from .runtime_refs import RefsReport
from .session_state import Foreign, HelloInfo, Leave, MsgIds, _Live
from .session_sync import DELTA_COALESCE, MAX_PAGE, SessionSync
from .tasks import TaskRunner

if TYPE_CHECKING:
    from .transfer import TransferService

log = logging.getLogger("session")
# The value types and constants moved to session_state/session_sync stay importable from here.
__all__ = ["DELTA_COALESCE", "MAX_PAGE", "Foreign", "HelloInfo", "Leave", "MsgIds", "Session"]
_HANDSHAKE_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_EVENT_NAMES = {int(getattr(zmq, f"EVENT_{n}")): n for n in (
    "CONNECTED", "DISCONNECTED", "HANDSHAKE_SUCCEEDED", "HANDSHAKE_FAILED_AUTH", "HANDSHAKE_FAILED_PROTOCOL",
    "HANDSHAKE_FAILED_NO_DETAIL")}



class Session(SessionSync):
    """Runs until cancelled; cancellation closes the socket with the configured linger."""

    def __init__(self, cfg: AgentConfig, ctx: zmq.asyncio.Context, catalog: Catalog,
                 versions: host.VersionsCache, info: HelloInfo, backoff: Backoff | None = None,
                 pair: KeyPair | None = None, tasks: TaskRunner | None = None,
                 transfer: "TransferService | None" = None) -> None:
        self._cfg = cfg
        self._tasks = tasks
        self._transfer = transfer  # GRANT/REVOKE/TOKEN and TOKEN_REQUEST (DIST-4, DIST-5)
        self._ctx = ctx
        self._catalog = catalog
        self._feed = CatalogFeed(catalog)
        self._refs = RefsReport(catalog)  # runtime refs from sandbox entries (SNAP-19)
        self._changed: asyncio.Event | None = None  # set (thread-safe) after each catalog change
        self._versions = versions
        self._info = info
        self._endpoints = list(cfg.agent.coordinators)
        self._limits = cfg.codec.limits()
        self._backoff = backoff or Backoff(cfg.agent.backoff_initial, cfg.agent.backoff_max)
        self._ids = MsgIds()
        self._page_size = max(1, min(cfg.catalog.page_size, MAX_PAGE))
        self.counters: collections.Counter[str] = collections.Counter()
        self.session_id: str | None = None
        self._pair = pair  # CURVE (SEC-2): this node's key pair; None with security.curve = false
        self._monitor: zmq.Socket | None = None

    # --- level 1: endpoints and backoff ---------------------------------------------

    async def run(self) -> None:
        if self._changed is None:
            loop = asyncio.get_running_loop()
            changed = self._changed = asyncio.Event()

            def wake() -> None:  # from whichever thread committed the change
                try:
                    loop.call_soon_threadsafe(changed.set)
                except RuntimeError:
                    pass  # the loop is closed: the agent is stopping
            self._catalog.watch(wake)
        index = 0
        while True:
            endpoint = self._endpoints[index]
            sock = self._open(endpoint)
            linger = 0  # an abandoned attempt must not deliver stale messages later
            try:
                leave = await self._serve(sock, endpoint)
            except asyncio.CancelledError:
                linger = int(self._cfg.zmq.linger * 1000)  # shutdown: let the last beat out
                raise
            finally:
                self.session_id = None
                if self._monitor is not None:
                    sock.disable_monitor()
                    self._monitor.close(linger=0)
                    self._monitor = None
                sock.close(linger=linger)
            index = self._next_index(index, leave)
            delay = self._backoff.next_delay()
            self.counters["reconnects"] += 1
            log.info("left %s (%s); trying %s in %.2fs", endpoint, leave.reason, self._endpoints[index], delay)
            await asyncio.sleep(delay)

    def _open(self, endpoint: str) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self._info.node_id.encode())
        configure_socket(sock, hwm=self._cfg.zmq.hwm, linger=self._cfg.zmq.linger,
                         max_frame=self._cfg.codec.max_frame, immediate=True)
        if self._pair is not None:
            pins = self._cfg.agent.coordinator_keys
            server_key = pins[self._endpoints.index(endpoint)] if len(pins) > 1 else pins[0]
            sock.setsockopt(zmq.CURVE_SECRETKEY, self._pair.secret.encode())
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self._pair.public.encode())
            sock.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode())
            # A failed CURVE handshake raises nothing anywhere (TOOLS.md §4): the monitor is the only
            # way to tell "wrong key" from "coordinator down" in the log.
            self._monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        sock.connect(endpoint)
        return sock

    def _handshake_trouble(self, endpoint: str) -> str | None:
        """After a failed attempt: why, as far as the CURVE handshake events tell."""
        mon, self._monitor = self._monitor, None
        if mon is None:
            return None
        seen: collections.Counter[str] = collections.Counter()
        raw = zmq.Socket.shadow(mon.underlying)  # a plain socket: read what is queued, no waiting
        try:
            while True:
                try:
                    ev = recv_monitor_message(raw, zmq.NOBLOCK)
                except zmq.Again:
                    break
                seen[_EVENT_NAMES.get(ev["event"], str(ev["event"]))] += 1
        finally:
            mon.close(linger=0)
        if seen["HANDSHAKE_SUCCEEDED"]:
            return None
        if seen["HANDSHAKE_FAILED_AUTH"]:
            return "the coordinator refused this node's key (rejected with `tcctl node reject`?)"
        if seen["HANDSHAKE_FAILED_PROTOCOL"] or seen["HANDSHAKE_FAILED_NO_DETAIL"] or (
                seen["CONNECTED"] and seen["DISCONNECTED"]):
            return (f"the CURVE handshake with {endpoint} failed: agent.coordinator_keys does not match "
                    "the coordinator's public key (see its <state_dir>/keys/coordinator.key)")
        return None

    def _next_index(self, index: int, leave: Leave) -> int:
        if leave.goto == "same":
            return index
        if leave.goto in self._endpoints:
            return self._endpoints.index(leave.goto)
        return (index + 1) % len(self._endpoints)

    # --- level 2: one socket ----------------------------------------------------------

    async def _serve(self, sock: zmq.asyncio.Socket, endpoint: str) -> Leave:
        while True:
            answer = await self._hello(sock, endpoint)
            if isinstance(answer, Leave):
                return answer
            self._backoff.reset()  # WIRE-10: WELCOME resets the backoff
            leave = await self._live(sock, endpoint, *answer)
            if leave is not None:
                return leave
            self.counters["rehello"] += 1  # SessionUnknown: HELLO again now, same socket (WIRE-11)

    async def _hello(self, sock: zmq.asyncio.Socket, endpoint: str) -> tuple[Hello, Welcome] | Leave:
        loop = asyncio.get_running_loop()
        facts = await asyncio.to_thread(self._info.facts)
        versions = await self._current_versions()
        hello = Hello(msg_id=self._ids.next(), node_id=self._info.node_id, address=str(facts["address"]),
                      blob_endpoint=self._info.blob_endpoint, facts=facts, versions=versions,
                      labels=dict(self._cfg.agent.labels), capabilities=self._info.capabilities,
                      catalog=self._catalog.identity().to_wire(), reconcile=self._info.reconcile,
                      boot_ms=self._info.boot_ms)
        deadline = loop.time() + self._cfg.agent.hello_timeout
        # With IMMEDIATE the socket turns writable only once a connection is up, so an
        # endpoint that is down and one that is silent both end at the same deadline (WIRE-7).
        if not await _poll(sock, deadline - loop.time(), zmq.POLLOUT) or not await self._send(sock, hello):
            trouble = self._handshake_trouble(endpoint)
            if trouble:
                self.counters["handshake_failed"] += 1
                log.error("%s; this node's key is %s", trouble, fingerprint(self._pair.public) if self._pair else "-")
                return Leave("CURVE handshake failed")
            return Leave(f"no connection within {self._cfg.agent.hello_timeout:g}s")
        self.counters["hello"] += 1
        log.info("HELLO sent to %s (catalog seq %d)", endpoint, hello.catalog["seq"])
        while (left := deadline - loop.time()) > 0:
            msg = await self._receive(sock, left)
            if msg is None:
                continue
            if isinstance(msg, Foreign):
                log.error("coordinator %s speaks %s, not TC1: upgrade this agent or that coordinator",
                          endpoint, msg.got)
                return Leave(f"protocol {msg.got}")
            if isinstance(msg, Welcome) and msg.parent_id == hello.msg_id:
                return hello, msg
            if isinstance(msg, Error) and msg.parent_id in (hello.msg_id, None):
                return self._refused(endpoint, msg)
            if isinstance(msg, (HeartbeatAck, Error)):  # answers to the previous session's messages
                self.counters["stale"] += 1
                continue
            self._unexpected(msg, "waiting for WELCOME")
        return Leave(f"no WELCOME within {self._cfg.agent.hello_timeout:g}s")

    def _refused(self, endpoint: str, err: Error) -> Leave:
        """An ERROR that ends the connection (WIRE-6, SEC-3, HA-4)."""
        self.counters[f"error:{err.name}"] += 1
        if err.name == "NotLeader":
            leader = err.details.get("leader")
            known = leader if isinstance(leader, str) and leader in self._endpoints else "next"
            log.info("%s is not the leader (hint %r)", endpoint, leader)
            return Leave("not leader", known)
        if err.name == "NodeKeyPending":
            fp = fingerprint(self._pair.public) if self._pair else "-"
            log.warning("%s: this node's key %s awaits `tcctl node accept %s` (or accept %s)", endpoint, fp,
                        self._info.node_id, fp)
            return Leave("key pending", "same")
        if err.name == "Unauthorized":
            log.error("%s refused this node: %s", endpoint, err.message)
            return Leave("unauthorized", "same")
        if err.name == "UnsupportedProtocol":
            log.error("%s does not speak our protocol (%s): upgrade this agent or that coordinator",
                      endpoint, err.message)
            return Leave("unsupported protocol")
        log.error("%s refused HELLO with %s: %s", endpoint, err.name, err.message)
        return Leave(err.name)

    # --- level 3: the live session ------------------------------------------------------

    async def _live(self, sock: zmq.asyncio.Socket, endpoint: str, hello: Hello,
                    welcome: Welcome) -> Leave | None:
        """Run a session; None means SessionUnknown (re-HELLO), a Leave ends the connection."""
        loop = asyncio.get_running_loop()
        interval = welcome.heartbeat_interval / 1000
        live = _Live(welcome.session_id, interval, self._liveness(interval),
                     self._ids.number(hello.msg_id) or 0, canonical.digest(hello.versions))
        live.last_heard = loop.time()
        live.next_beat = live.last_heard  # beat at once: storage figures reach the coordinator now
        self.session_id = live.session_id
        self.counters["welcome"] += 1
        log.info("session %s with %s: heartbeat %gs, liveness %gs, lease %dms", live.session_id, endpoint,
                 live.interval, live.liveness, welcome.lease_ttl)
        if welcome.want_full_catalog:
            await self._send_catalog(sock, live)
        else:
            self._feed.start(hello.catalog["seq"])  # the mirror equals what HELLO said (NODE-3)

        async def task_send(msg: Message) -> bool:
            if isinstance(msg, TaskResult):
                await self._flush_catalog(sock, live)  # the task's catalog effects go out first
            return await self._send(sock, msg)
        if self._tasks is not None:
            # Task replies and progress go out on this session's socket until it ends (WIRE-12).
            self._tasks.attach(task_send)
        if self._transfer is not None:
            self._transfer.attach(lambda msg: self._send(sock, msg))
        pump = asyncio.create_task(self._pump_deltas(sock, live), name="catalog deltas")
        try:
            return await self._session_loop(sock, endpoint, live)
        except asyncio.CancelledError:
            await self._flush_catalog(sock, live)  # stopping: the last half second's changes still go
            raise
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            self._feed.stop()
            if self._tasks is not None:
                self._tasks.attach(None)
            if self._transfer is not None:
                self._transfer.attach(None)

    async def _session_loop(self, sock: zmq.asyncio.Socket, endpoint: str, live: _Live) -> Leave | None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if now - live.last_heard >= live.liveness:
                log.warning("nothing heard from %s for %gs", endpoint, live.liveness)
                return Leave("silence")
            if now >= live.next_beat:
                await self._beat(sock, live)
                live.next_beat += live.interval
                if live.next_beat <= now:  # fell behind (a stall): skip beats, never burst
                    live.next_beat = now + live.interval
            msg = await self._receive(sock, min(live.next_beat, live.last_heard + live.liveness) - loop.time())
            if msg is None or isinstance(msg, Foreign):
                continue  # counted and logged by _receive; a bad frame proves nothing about liveness
            live.last_heard = loop.time()  # any message resets liveness (WIRE-10)
            if isinstance(msg, Error):
                if self._transfer is not None and self._transfer.on_error(msg):
                    continue  # it answered a TOKEN_REQUEST; the waiting fetch takes it from here
                outcome = self._on_error(endpoint, live, msg)
                if outcome == "rehello":
                    return None
                if isinstance(outcome, Leave):
                    return outcome
            elif isinstance(msg, HeartbeatAck):
                await self._on_ack(sock, live, msg)
            elif isinstance(msg, Task):
                await self._on_task(sock, msg)
            elif isinstance(msg, TaskCancel):
                if self._tasks is not None:
                    await self._tasks.on_cancel(msg)
            elif isinstance(msg, (Grant, Revoke, TokenGrant)) and self._transfer is not None:
                await self._transfer.on_message(msg)
            else:
                self._unexpected(msg, "in session")

    def _on_error(self, endpoint: str, live: _Live, err: Error) -> Leave | Literal["rehello", "keep"]:
        """An ERROR during the session: keep going, HELLO again (WIRE-11) or leave."""
        if err.name == "SessionUnknown":
            n = self._ids.number(err.parent_id)
            if err.parent_id is None or (n is not None and n >= live.first_msg):
                log.info("%s does not know session %s: HELLO again", endpoint, live.session_id)
                return "rehello"
            self.counters["stale_error"] += 1  # answers a message of an older session
            return "keep"
        if err.name in ("NotLeader", "NodeKeyPending", "Unauthorized", "UnsupportedProtocol"):
            return self._refused(endpoint, err)
        self.counters[f"error:{err.name}"] += 1
        log.warning("%s sent ERROR %s (parent %s): %s", endpoint, err.name, err.parent_id, err.message)
        return "keep"

    async def _on_task(self, sock: zmq.asyncio.Socket, task: Task) -> None:
        if self._tasks is not None:
            self.counters["task"] += 1
            await self._tasks.on_task(task)
            return
        # No runner (a harness session): answer with the final shape (WIRE-12).
        self.counters["task_refused"] += 1
        err = UnsupportedMessage(f"task op {task.op} is not implemented on this agent", {"op": task.op})
        log.warning("TASK %s (%s) refused: not implemented", task.task_id, task.op)
        await self._send(sock, TaskAccepted(parent_id=task.msg_id, task_id=task.task_id))
        await self._send(sock, TaskResult(parent_id=task.msg_id, task_id=task.task_id, ok=False,
                                          error=err.to_wire()))

    # --- plumbing -------------------------------------------------------------------

    async def _send(self, sock: zmq.asyncio.Socket, msg: Message) -> bool:
        try:
            await sock.send_multipart(msg.to_frames(), flags=zmq.DONTWAIT)
            return True
        except zmq.ZMQError as exc:  # Again: no live connection (IMMEDIATE) or HWM reached
            self.counters["send_dropped"] += 1
            log.warning("%s not sent: %s", msg.TYPE, exc)
            return False

    async def _receive(self, sock: zmq.asyncio.Socket, timeout: float) -> Message | Foreign | None:
        """The next decoded message within ``timeout`` s; None on timeout or a bad frame (logged, counted)."""
        if not await _poll(sock, timeout, zmq.POLLIN):
            return None
        try:
            frames = await sock.recv_multipart(flags=zmq.DONTWAIT)
        except zmq.Again:
            return None
        try:
            return decode_message(parse(frames, router=False, limits=self._limits), self._limits)
        except FrameDropped as exc:
            self.counters[f"dropped:{exc.reason}"] += 1
            log.warning("dropped a frame from the coordinator: %s", exc.reason)
        except TCError as exc:
            self.counters[f"bad:{exc.name}"] += 1
            log.warning("bad message from the coordinator: %s: %s", exc.name, exc.message)
            if exc.name == "UnsupportedProtocol":
                return Foreign(str(exc.details.get("got", "?")))
        return None

    def _unexpected(self, msg: Message, when: str) -> None:
        self.counters[f"unexpected:{msg.TYPE}"] += 1
        log.warning("unexpected %s from the coordinator %s: ignored", msg.TYPE, when)


async def _poll(sock: zmq.asyncio.Socket, seconds: float, flags: int) -> bool:
    """Wait up to ``seconds`` for ``flags`` (POLLIN/POLLOUT) on ``sock``."""
    # pyzmq's _future.pyi declares poll(timeout) only; the implementation takes flags as well.
    return bool(await sock.poll(timeout=max(0, int(seconds * 1000 + 0.999)), flags=flags))  # type: ignore[call-arg]
