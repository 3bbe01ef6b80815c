"""The coordinator process: binds the endpoints and runs the loops (GC-13).

Start order: check the schema (HA-1) → load nodes → bind agent, admin and event endpoints
→ READY=1 to systemd → serve. The failover grace (NODE-8) starts with the process.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Awaitable, Callable

import zmq
import zmq.asyncio

from protocol import daemon

from .admin import commands as _commands  # noqa: F401 — registers every admin command
from .admin.context import AdminContext
from .admin.endpoint import AdminEndpoint, prepare_ipc_dir, secure_ipc_socket
from .agents import AgentEndpoint
from .compat.scanner import CompatScanner
from .config import CoordinatorConfig
from .db.engine import ensure_schema, make_engine
from .events import EventBus
from .health import Thresholds
from .keys import KeyRegistry
from .lease import FlushLoop, LeaseLoop
from .nodes import NodeRegistry
from .storage import StorageProbe
from .presence import PresenceChecker
from .resolve import RegistryNodes, ResolveIndex
from .sandboxes import Sandboxes
from .snapshots.refs_reconcile import run_refs_reconciler
from protocol.peers import PeerTable
from .security import CurveServer
from .grants import Grants
from .jobs.runner import JobRunner
from .jobs.store import JobStore
from .tasks import TaskDispatcher
from .snapshots import jobs as snapshot_jobs
from .snapshots.service import SnapshotOps
from .templates.commit_job import bind_commit
from .templates.create_job import CreateJob, Services, bind
from .templates.delete_job import DeleteJob
from .templates.redo_job import RedoJob
from .templates.fleet import Fleet, StorageLimits
from .templates.rows import Rows

log = logging.getLogger(__name__)


def thresholds(cfg: CoordinatorConfig) -> Thresholds:
    hb = cfg.heartbeat
    return Thresholds(interval=hb.interval, max_rate=hb.max_rate, suspect_missed=hb.suspect_missed,
                      lease_missed=hb.lease_missed, lease_ttl_min=hb.lease_ttl_min,
                      failover_grace=hb.failover_grace)


def runner_owner(cfg: CoordinatorConfig) -> str:
    """A stable job owner per coordinator installation (host + state dir): after a restart the
    same owner resumes its RUNNING jobs at once instead of waiting for their lease (TPL-31)."""
    import hashlib
    import socket
    where = f"{socket.gethostname()}:{os.path.realpath(cfg.coordinator.state_dir)}"
    return "coord-" + hashlib.sha256(where.encode()).hexdigest()[:16]


class Coordinator:
    def __init__(self, cfg: CoordinatorConfig, *, migrate: bool = False) -> None:
        self.cfg = cfg
        self.migrate = migrate
        self.zctx = zmq.asyncio.Context()
        self.engine = make_engine(cfg.db.url)
        self.sockets: list[zmq.Socket] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.bound: dict[str, str] = {}
        # The tombstone finaliser (SNAP-14), set by whoever owns it: called with the snapshot ids
        # whose runtime refs were released by a node's report or the reconciler (SNAP-19 to SNAP-21).
        self.on_refs_released: Callable[[list[str]], Awaitable[None]] | None = None

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        s = self.zctx.socket(kind)
        daemon.configure_socket(s, hwm=self.cfg.zmq.hwm, linger=self.cfg.zmq.linger,
                                max_frame=self.cfg.codec.max_frame)
        self.sockets.append(s)
        return s

    async def start(self) -> None:
        cfg = self.cfg
        daemon.check_plain_tcp([cfg.coordinator.agent_endpoint, cfg.coordinator.admin_endpoint,
                                cfg.coordinator.events_endpoint], cfg.security.curve)
        rev = await asyncio.to_thread(ensure_schema, self.engine, migrate_now=self.migrate)
        log.info("database %s at schema %s", self.engine.url.render_as_string(hide_password=True), rev)

        self.keys: KeyRegistry | None = None
        self.curve: CurveServer | None = None
        if cfg.security.curve:
            self.keys = KeyRegistry(self.engine, cfg.security.max_pending_keys)
            await asyncio.to_thread(self.keys.load)
            await asyncio.to_thread(self.keys.seed, cfg.coordinator.accepted_keys_dir)
            self.curve = CurveServer(self.zctx, cfg, self.keys)

        ev_sock = self._socket(zmq.PUB)
        self._protect(ev_sock, cfg.coordinator.events_endpoint, "admin")
        gid_ev = prepare_ipc_dir(cfg.coordinator.events_endpoint, cfg.coordinator.admin_group)
        ev_sock.bind(cfg.coordinator.events_endpoint)
        secure_ipc_socket(cfg.coordinator.events_endpoint, gid_ev)
        self.events = EventBus(zmq.Socket.shadow(ev_sock.underlying))

        self.registry = NodeRegistry(self.engine, thresholds(cfg), self.events)
        await asyncio.to_thread(self.registry.load)
        self.peers = PeerTable(cfg.security.max_bad_msgs, cfg.security.bad_peer_cooldown)
        admin_peers = PeerTable(cfg.security.max_bad_msgs, cfg.security.bad_peer_cooldown)

        agent_sock = self._socket(zmq.ROUTER)
        # No ROUTER_HANDOVER: with it any peer claiming a node id would steal that node's route
        # (a rejected key could knock a node off the air). A reconnecting agent closed its old
        # socket, so its old pipe is gone; ZMTP heartbeats reap pipes whose peer vanished silently.
        agent_sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        agent_sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
        if self.curve:
            self.curve.serve(agent_sock, "agents")
        agent_sock.bind(cfg.coordinator.agent_endpoint)
        self.agents = AgentEndpoint(agent_sock, self.registry, cfg.codec.limits(), self.peers, self.keys)
        self.dispatcher = TaskDispatcher(self.registry, accept_timeout=float(cfg.task.accept_timeout),
                                         resend=cfg.task.resend)
        self.dispatcher.attach(self.agents)
        self.agents.tasks = self.dispatcher
        self.grants = Grants(self.agents.reply, self.keys, ttl_s=float(cfg.transfer.token_ttl))
        self.agents.grants = self.grants
        self.agents.on_refs_released = self._refs_released
        # Templates and jobs (issue 5): the store, the template services and the step runner.
        self.jobs = JobStore(self.engine, progress_flush=float(cfg.job.progress_flush))
        st = cfg.storage
        self.template_services = Services(
            fleet=Fleet(self.registry, self.engine, StorageLimits(st.warn, st.reject, st.delete_only)),
            rows=Rows(self.engine, self.jobs.now_ms), grant=self.grants.grant,
            per_source=cfg.dist.per_source, max_attempts=cfg.dist.max_attempts,
            space_reserve=int(cfg.dist.space_reserve))
        self.runner = JobRunner(self.jobs, self.dispatcher, owner=runner_owner(cfg),
                                crash_after_step=cfg.job.test_crash_after_step,
                                types=[bind(CreateJob, self.template_services),
                                       bind(DeleteJob, self.template_services),
                                       bind(RedoJob, self.template_services),
                                       bind_commit(self.template_services,  # TPL-23 to TPL-25
                                                   rpc_timeout=float(cfg.commit.rpc_timeout),
                                                   cleanup_timeout=float(cfg.cleanup.rpc_timeout)),
                                       *snapshot_jobs.types(snapshot_jobs.SnapshotServices(
                                           self.engine, lambda n: n in self.registry.nodes,
                                           gen_scan=cfg.snapshot.rollback_gen_scan,
                                           cleanup_timeout=float(cfg.cleanup.rpc_timeout)))])

        # Catalog presence and strays (GC-10 to GC-12): after each catalog change, and swept.
        self.presence = PresenceChecker(self.registry, self.engine, self.dispatcher,
                                        grace=float(cfg.reconcile.presence_grace),
                                        stray_grace=float(cfg.gc.stray_grace), interval=float(cfg.reconcile.interval))
        self.events.listen(self.presence.on_event)

        # Compat scans (COMPAT-4): debounced per node, driven by node events.
        self.compat = CompatScanner(self.registry, self.engine, debounce=float(cfg.compat.debounce),
                                    scan_timeout=float(cfg.compat.scan_timeout))
        self.events.listen(self.compat.on_event)

        # The resolve index (RES-1, RES-4): fully built before resolve is served, then kept
        # current by events. Replica and template rows are written in worker threads, so their
        # change notices reach the event bus through the loop.
        loop = asyncio.get_running_loop()
        self.template_services.rows.on_change = (
            lambda topic, kind, data: loop.call_soon_threadsafe(self.events.publish, topic, kind, data))
        self.resolve_index = ResolveIndex(self.engine, RegistryNodes(self.registry, cfg.storage),
                                          backstop=float(cfg.resolve.backstop_interval))
        self.events.listen(self.resolve_index.on_event)
        await self.resolve_index.start()
        self.sandboxes = Sandboxes(self.engine, self.registry, self.resolve_index, self.dispatcher,
                                   publish=self.events.publish, schedule_scan=self.compat.schedule)
        # Snapshots (SNAP-1 to SNAP-21): operations, the tombstone finaliser and GC-9.
        self.snapshots = SnapshotOps(self.engine, self.jobs, self.resolve_index, wake=self.runner.wake,
                                     op_timeout=float(cfg.snapshot.op_timeout),
                                     stuck_after=float(cfg.snapshot.stuck_after), list_limit=cfg.snapshot.list_limit,
                                     list_max=cfg.snapshot.list_max, interval=float(cfg.reconcile.interval))
        self.sandboxes.snapshots = self.snapshots
        self.on_refs_released = self.snapshots.on_refs_released

        admin_sock = self._socket(zmq.ROUTER)
        self._protect(admin_sock, cfg.coordinator.admin_endpoint, "admin")
        gid = prepare_ipc_dir(cfg.coordinator.admin_endpoint, cfg.coordinator.admin_group)
        admin_sock.bind(cfg.coordinator.admin_endpoint)
        secure_ipc_socket(cfg.coordinator.admin_endpoint, gid)
        ctx = AdminContext(config=cfg, engine=self.engine, nodes=self.registry, events=self.events,
                           peers=self.peers, keys=self.keys, jobs=self.jobs, templates=self.template_services,
                           wake_jobs=self.runner.wake, compat=self.compat,
                           storage=StorageProbe(self.registry, self.dispatcher, cfg.storage,
                                                timeout=float(cfg.storage.refresh_timeout)),
                           resolve=self.resolve_index, sandboxes=self.sandboxes, snapshots=self.snapshots)
        self.admin = AdminEndpoint(admin_sock, ctx, cfg.codec.limits(), cfg.admin.progress_every, admin_peers)

        self.bound = {"agent": agent_sock.getsockopt_string(zmq.LAST_ENDPOINT),
                      "admin": admin_sock.getsockopt_string(zmq.LAST_ENDPOINT),
                      "events": ev_sock.getsockopt_string(zmq.LAST_ENDPOINT)}
        self.lease = LeaseLoop(self.registry)
        await self.runner.start()  # RUNNING jobs resume at their persisted step, PENDING ones start (TPL-31)
        for coro in (self.agents.run(), self.admin.run(), self.lease.run(), self.presence.run(),
                     self.snapshots.run(),  # GC-9 and the tombstone pass (SNAP-14)
                     self.compat.run(),  # compat scans (COMPAT-4)
                     run_refs_reconciler(self.engine, self.registry, interval=float(cfg.reconcile.interval),
                                         ttl_ms=int(float(cfg.refs.orphan_ttl) * 1000),
                                         on_released=self._refs_released),  # GC-10, SNAP-19 to SNAP-21
                     FlushLoop(self.registry, cfg.heartbeat.last_seen_flush).run()):
            self.tasks.append(asyncio.ensure_future(coro))
        log.info("coordinator serving: agents %s, admin %s, events %s (%d nodes known, grace %.0fs)",
                 self.bound["agent"], self.bound["admin"], self.bound["events"], len(self.registry.nodes),
                 cfg.heartbeat.failover_grace)
        daemon.sd_notify(f"READY=1\nSTATUS=serving {len(self.registry.nodes)} nodes")

    async def _refs_released(self, snapshot_ids: list[str]) -> None:
        if self.on_refs_released is not None:
            await self.on_refs_released(snapshot_ids)

    def _protect(self, sock: zmq.Socket, endpoint: str, domain: str) -> None:
        """CURVE on TCP admin and event endpoints; ipc ones are guarded by file permissions."""
        if self.curve and endpoint.startswith("tcp://"):
            self.curve.serve(sock, domain)

    async def stop(self) -> None:
        daemon.sd_notify("STOPPING=1")
        if getattr(self, "runner", None) is not None:
            await self.runner.stop()
        if getattr(self, "presence", None) is not None:
            self.presence.stop()
        if getattr(self, "resolve_index", None) is not None:
            self.resolve_index.stop()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.curve:
            self.curve.stop()
        try:
            await self.registry.flush()
        except Exception:  # noqa: BLE001
            log.exception("final flush failed")
        linger = int(self.cfg.zmq.linger * 1000)
        for s in self.sockets:
            s.close(linger=linger)
        self.zctx.term()
        self.engine.dispose()


async def serve(cfg: CoordinatorConfig, *, migrate: bool) -> None:
    coord = Coordinator(cfg, migrate=migrate)
    stop = asyncio.Event()
    daemon.install_signal_handlers(asyncio.get_running_loop(), lambda _sig: stop.set())
    await coord.start()
    every = daemon.watchdog_interval()
    watchdog = asyncio.ensure_future(daemon.watchdog_loop(every)) if every else None
    try:
        await stop.wait()
    finally:
        if watchdog:
            watchdog.cancel()
        await coord.stop()
