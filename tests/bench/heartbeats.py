#!/usr/bin/env python3
"""Heartbeat benchmark: one real coordinator, N simulated nodes (NODE-2, NODE-7, NODE-9, WIRE-6..WIRE-11).

Not a pytest test and not run by CI. Run from the repository root::

    .venv/bin/python tests/bench/heartbeats.py [--nodes N] [--interval S] [--procs P] [--duration S]
                                               [--db sqlite|postgresql] [--max] [--py-spy FILE]

What it does (README.md next to this file explains every number):

0. starts a real ``python -m coordinator.main --migrate`` (plain TCP on 127.0.0.1, SQLite in a temp
   dir, ipc admin/events sockets in a short /tmp dir, ``heartbeat.failover_grace=0s``) and waits for
   ``tcctl node list --json`` to answer; then measures an **idle baseline** (no simulated nodes):
   ``node list`` latency and the coordinator's idle CPU;
1. **ramp**: P worker processes each own N/P DEALER sockets (identity = node id ``sim-000123``) and
   HELLO them with a bounded number in flight; a node that is asked for its catalog sends one empty
   CATALOG_SNAPSHOT page; the phase ends when ``node list`` shows all N nodes READY;
2. **steady**: every node beats once per interval, phase-spread so the load is smooth. Two windows of
   ``--duration`` s each: *b1* heartbeats only (absorbed rate, coordinator CPU, heartbeat round trip),
   *b2* the same plus ~50 ``node list`` requests spread over it (their latency; their CPU cost shows
   as the difference between the two windows) and one ``tcctl node list --json`` for reference;
3. **lost**: 1 % of the nodes stop beating; time until ``node list`` shows all of them LOST, next to
   the threshold max(lease_ttl_min, 5 H) (NODE-2);
4. prints one JSON line with the figures and the ratios against the same run's baseline.

``--pin`` gives the coordinator the first CPU to itself and the simulator the others, so "one core"
means one core. ``--py-spy FILE`` profiles the coordinator during window b1.

``--max`` measures the hot path's capacity instead: by default 2000 nodes at 0.05 s (40,000 beats/s
offered) with at most ``--window`` (2) unanswered beats per node, against a coordinator whose own
interval stays 2 s so that health does not flap at 20 Hz. The coordinator then always has a queue;
what it answers per second, divided by the CPU it used, is "heartbeats/s sustained on one core".

The simulator shares the machine with the coordinator (2 cores here), so every CPU figure is the
coordinator process's own (psutil, all its threads), never the machine's; the workers' CPU and the
machine's total are printed next to it so a starved run can be recognised.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import heapq
import json
import math
import multiprocessing as mp
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import msgpack  # noqa: E402
import psutil  # noqa: E402
import zmq  # noqa: E402

from protocol.canonical import catalog_digest, digest  # noqa: E402
from protocol.envelope import parse  # noqa: E402
from protocol.message import decode_message  # noqa: E402
from protocol.messages import (CatalogSnapshot, Error, Heartbeat, Hello, RuntimeRefs, Versions,  # noqa: E402
                               Welcome)
from tests.support import Cluster, wait_for  # noqa: E402

MACHINE_NOTE = ("simulator workers share the machine's {cores} cores with the coordinator; CPU figures are "
                "the coordinator process's own (all threads), not the machine's")
EPOCH = "be0c" * 8                      # fixed catalog epoch of every simulated node
EMPTY_DIGEST = catalog_digest([])       # CAT-2 digest of an empty catalog
VERSIONS_MAP = {"agent": "bench-sim", "guest_image": "none", "host_kernel": "bench", "hypervisor": "none"}
VERSIONS_DIGEST = digest(VERSIONS_MAP)
HELLO_TIMEOUT = 5.0                     # WIRE-7: an unanswered HELLO is sent again after 5 s
RTT_SAMPLE_EVERY = 4                    # one heartbeat round trip in 4 is recorded
PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: deliver ``sig`` to this process when its parent dies, so nothing outlives a killed bench."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except Exception:  # noqa: BLE001 — best effort; the normal clean-up path still runs
        pass


def _dur(seconds: float) -> str:
    """A CFG-3 duration for --set: whole milliseconds."""
    return f"{max(1, int(round(seconds * 1000)))}ms"


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no samples."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def rnd(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


# =====================================================================================
# Simulated nodes: one worker process owns a slice of them
# =====================================================================================

@dataclass(frozen=True)
class SimConfig:
    endpoint: str
    nodes: int              # total nodes (for the phase spread)
    interval: float         # beat interval until an ACK says otherwise
    window: int             # max unanswered beats per node; 0 = unlimited (a real agent)
    hello_inflight: int     # this worker's share of the bounded HELLO window
    base: float             # shared CLOCK_MONOTONIC origin of the phase spread
    tick: float             # loop period in s; 0 = wake up for every message
    cpus: tuple[int, ...] | None = None   # CPU affinity of the worker (--pin)


class SimNode:
    __slots__ = ("idx", "pos", "node_id", "ident", "sock", "fd", "state", "alive", "session", "tail", "seq",
                 "interval", "next_due", "outstanding", "blocked_since", "last_send", "hello_id", "hello_at", "catalog_at")

    def __init__(self, idx: int, pos: int) -> None:
        self.idx = idx
        self.pos = pos              # position in its worker's list
        self.node_id = f"sim-{idx:06d}"
        self.ident = self.node_id.encode()
        self.sock: zmq.Socket | None = None
        self.fd = -1
        self.state = "idle"         # idle → hello → live
        self.alive = True           # False once "killed" (stops sending, keeps its socket)
        self.session = ""
        self.tail = b""             # pre-encoded constant part of this node's HEARTBEAT body
        self.seq = 0
        self.interval = 0.0
        self.next_due = 0.0
        self.outstanding = 0
        self.blocked_since = -1.0   # >= 0: window full since then, waiting for an ACK
        self.last_send = 0.0
        self.hello_id = ""
        self.hello_at = 0.0
        self.catalog_at = -1e9


def _pk(x: Any) -> bytes:
    return msgpack.packb(x, use_bin_type=True)


K_MSG_ID, K_SEQ = _pk("msg_id"), _pk("seq")
HB_TYPE, ACK_TYPE, PROTO = b"HEARTBEAT", b"HEARTBEAT_ACK", b"TC1"
HB_MAP_HEADER = b"\x8a"   # fixmap of the 10 HEARTBEAT fields


def heartbeat_tail(session_id: str, idx: int) -> bytes:
    """Everything of a HEARTBEAT body but msg_id and seq, encoded once per session."""
    fields = {"session_id": session_id, "catalog_seq": 0, "catalog_digest": EMPTY_DIGEST,
              "versions_digest": VERSIONS_DIGEST, "refs_digest": "",
              "storage": {"total": 100 << 30, "used": (10 + idx % 50) << 30, "free": (90 - idx % 50) << 30},
              "mem_free": 8 << 30, "sandboxes": 0}
    return b"".join(_pk(k) + _pk(v) for k, v in fields.items())


def heartbeat_body(tail: bytes, msg_id: str, seq: int) -> bytes:
    return HB_MAP_HEADER + K_MSG_ID + _pk(msg_id) + K_SEQ + _pk(seq) + tail


class Worker:
    """One process: its nodes' DEALERs driven from one poll loop (no asyncio, no threads).

    ``zmq.Poller`` over 3,334 DEALERs measured 11.9 ms per ``poll(0)`` here (zmq_poll asks every
    socket for ZMQ_FD and ZMQ_EVENTS on every call), which would make the simulator the
    bottleneck; so the loop registers the sockets' ZMQ_FD descriptors (and the control pipe) in
    one epoll, whose cost follows the number of ready sockets. ZMQ_FD only says "look at the
    socket": a ready fd is followed by reads until EAGAIN, every send by a ZMQ_EVENTS check
    (a send may consume the signal of a reply that already arrived), and once a second every
    socket is checked as a safety net. With ``tick`` > 0 the loop wakes once per tick and
    handles everything that came due or arrived since, instead of once per message.
    """

    def __init__(self, wid: int, indices: list[int], cfg: SimConfig, conn: Any) -> None:
        self.wid = wid
        self.cfg = cfg
        self.conn = conn
        self.ctx = zmq.Context(io_threads=1)
        self.ctx.set(zmq.MAX_SOCKETS, len(indices) + 64)
        self.nodes = [SimNode(i, pos) for pos, i in enumerate(indices)]
        self.by_fd: dict[int, SimNode] = {}
        self.ep = select.epoll()
        self.ep.register(conn.fileno(), select.EPOLLIN)
        self.heap: list[tuple[float, int]] = []   # (due, position in self.nodes)
        self.pending: collections.deque[int] = collections.deque()
        self.inflight = 0
        self.c: collections.Counter[str] = collections.Counter()
        self.rtt: list[float] = []
        self.last_welcome = 0.0
        self.running = True
        self.validated = False

    # --- sends -----------------------------------------------------------------------
    def _send(self, n: SimNode, frames: list[bytes]) -> bool:
        try:
            n.sock.send_multipart(frames, zmq.NOBLOCK)  # type: ignore[union-attr]
        except zmq.Again:
            self.c["send_again"] += 1
            return False
        if n.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # type: ignore[union-attr]
            self._drain(n)
        return True

    def _send_msg(self, n: SimNode, msg: Any) -> bool:
        return self._send(n, msg.to_frames())

    def _hello(self, n: SimNode, now: float) -> None:
        if n.sock is None:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IDENTITY, n.ident)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(self.cfg.endpoint)
            n.sock, n.fd = s, s.getsockopt(zmq.FD)
            self.by_fd[n.fd] = n
            self.ep.register(n.fd, select.EPOLLIN)
        self.c["hello"] += 1
        n.hello_id = f"h{self.c['hello']}.{int(now * 1e6)}"
        n.hello_at = now
        if n.state != "hello":
            n.state = "hello"
            self.inflight += 1
        self._send_msg(n, Hello(
            msg_id=n.hello_id, node_id=n.node_id, address="127.0.0.1",
            blob_endpoint="tcp://127.0.0.1:7713",
            facts={"hostname": n.node_id, "address": "127.0.0.1", "cores": 2, "memory": 8 << 30,
                   "cpu_model": "bench", "boot_id": f"boot-{n.idx}"},
            versions=VERSIONS_MAP, labels={"bench": "heartbeats"},
            capabilities={"build": False, "sandbox": False},
            catalog={"epoch": EPOCH, "seq": 0, "digest": EMPTY_DIGEST}, boot_ms=int(time.time() * 1000)))

    def _catalog(self, n: SimNode, now: float) -> None:
        """One empty CATALOG_SNAPSHOT page (CAT-5); re-asks within 1 s are answered once."""
        if now - n.catalog_at < 1.0:
            self.c["catalog_ask_ignored"] += 1
            return
        n.catalog_at = now
        self.c["catalog_sent"] += 1
        self._send_msg(n, CatalogSnapshot(msg_id=f"c{self.c['catalog_sent']}.{n.idx}", session_id=n.session,
                                          epoch=EPOCH, seq=0, page=0, last=True, entries=[],
                                          digest=EMPTY_DIGEST))

    def _send_beat(self, n: SimNode, now: float) -> None:
        n.seq += 1
        body = heartbeat_body(n.tail, f"{n.seq}.{int(now * 1e6)}", n.seq)
        if self._send(n, [PROTO, HB_TYPE, body]):
            n.outstanding += 1
            n.last_send = now
            self.c["beats"] += 1

    def _beat(self, n: SimNode, due: float, now: float) -> None:
        if n.alive and n.state == "live":
            if self.cfg.window and n.outstanding >= self.cfg.window:
                # closed loop: the timer stops and the ACK that frees the window sends the next beat
                n.blocked_since = due
                n.next_due = -1.0
                return
            self._send_beat(n, now)
        # next slot in phase; slots already past are skipped, never sent in a burst (like the agent)
        nxt = due + n.interval
        if nxt <= now:
            missed = math.floor((now - nxt) / n.interval) + 1
            self.c["skipped_behind"] += missed
            nxt += missed * n.interval
        n.next_due = nxt
        heapq.heappush(self.heap, (nxt, n.pos))

    def _unblock(self, n: SimNode, now: float) -> None:
        self.c["skipped_window"] += int((now - n.blocked_since) / n.interval)
        n.blocked_since = -1.0
        if n.alive and n.state == "live":
            self._send_beat(n, now)
        n.next_due = now + n.interval
        heapq.heappush(self.heap, (n.next_due, n.pos))

    def _schedule_first(self, n: SimNode, now: float) -> None:
        phase = (n.idx / self.cfg.nodes) * n.interval
        k = math.floor((now - self.cfg.base - phase) / n.interval) + 1
        due = self.cfg.base + phase + k * n.interval
        n.next_due = due
        heapq.heappush(self.heap, (due, n.pos))

    # --- receives --------------------------------------------------------------------
    def _drain(self, n: SimNode) -> None:
        sock = n.sock
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)  # type: ignore[union-attr]
            except zmq.Again:
                return
            if len(frames) == 3 and frames[1] == ACK_TYPE:
                self._ack(n, frames[2])
            else:
                self._other(n, frames)

    def _ack(self, n: SimNode, body: bytes) -> None:
        self.c["acks"] += 1
        if n.outstanding:
            n.outstanding -= 1
        if n.blocked_since >= 0 and n.outstanding < self.cfg.window:
            self._unblock(n, time.monotonic())
        if body[:1] != b"\x81" or self.c["acks"] % RTT_SAMPLE_EVERY == 0:
            b = msgpack.unpackb(body, raw=False)
            pid = b.get("parent_id", "")
            if self.c["acks"] % RTT_SAMPLE_EVERY == 0 and "." in pid:
                self.rtt.append(time.monotonic() - int(pid.rpartition(".")[2]) / 1e6)
            iv = b.get("interval")
            if iv is not None and iv / 1000 != n.interval:
                self.c["interval_changes"] += 1
                last = n.next_due - n.interval
                n.interval = iv / 1000
                n.next_due = max(last + n.interval, time.monotonic())
                heapq.heappush(self.heap, (n.next_due, n.pos))
            for want in b.get("wants") or ():
                self.c[f"want_{want}"] += 1
                if want == "versions":
                    self._send_msg(n, Versions(msg_id=f"v{n.seq}.{n.idx}", session_id=n.session,
                                               versions=VERSIONS_MAP, digest=VERSIONS_DIGEST))
                elif want == "catalog":
                    self._catalog(n, time.monotonic())
                elif want == "refs":
                    self._send_msg(n, RuntimeRefs(msg_id=f"r{n.seq}.{n.idx}", session_id=n.session,
                                                  refs=[], digest=""))

    def _other(self, n: SimNode, frames: list[bytes]) -> None:
        try:
            msg = decode_message(parse(frames, router=False))
        except Exception as exc:  # noqa: BLE001 — count it, keep going
            self.c[f"bad_frame:{type(exc).__name__}"] += 1
            return
        now = time.monotonic()
        if isinstance(msg, Welcome) and n.state == "hello" and msg.parent_id == n.hello_id:
            self.c["welcome"] += 1
            self.last_welcome = now
            self.inflight -= 1
            n.state, n.session, n.seq, n.outstanding, n.blocked_since = "live", msg.session_id, 0, 0, -1.0
            n.interval = n.interval or self.cfg.interval
            n.tail = heartbeat_tail(n.session, n.idx)
            if not self.validated:  # the pre-encoded body must be a valid HEARTBEAT (WIRE-3)
                hb = Heartbeat.from_body(msgpack.unpackb(heartbeat_body(n.tail, "1.1", 1), raw=False))
                assert hb.session_id == n.session and hb.versions_digest == VERSIONS_DIGEST, hb
                self.validated = True
            if msg.want_full_catalog:
                self._catalog(n, now)
            self._schedule_first(n, now)
        elif isinstance(msg, Error):
            self.c[f"error:{msg.name}"] += 1
            if msg.name == "SessionUnknown" and n.alive:   # WIRE-11: HELLO again at once
                self.c["rehello"] += 1
                self._hello(n, now)
            elif n.state == "hello" and msg.parent_id == n.hello_id:
                n.state = "idle"
                self.inflight -= 1
        else:
            self.c[f"unexpected:{msg.TYPE}"] += 1

    # --- control from the parent -------------------------------------------------------
    def _control(self) -> None:
        while self.conn.poll():
            try:
                cmd, arg = self.conn.recv()
            except EOFError:
                self.running = False
                return
            if cmd == "hello":
                self.pending.extend(range(len(self.nodes)))
            elif cmd == "stats":
                out = {"wid": self.wid, "counters": dict(self.c), "rtt": self.rtt,
                       "last_welcome": self.last_welcome, "cpu": sum(os.times()[:2]),
                       "live": sum(1 for n in self.nodes if n.state == "live")}
                if arg:
                    self.rtt = []
                self.conn.send(("stats", out))
            elif cmd == "kill":
                wanted = set(arg)
                k = 0
                for n in self.nodes:
                    if n.idx in wanted:
                        n.alive = False
                        k += 1
                self.conn.send(("killed", k))
            elif cmd == "stop":
                self.running = False
                return

    def run(self) -> None:
        self.conn.send(("ready", {"wid": self.wid, "pid": os.getpid(), "nodes": len(self.nodes)}))
        next_sweep = time.monotonic() + 1.0
        next_retry_check = time.monotonic() + 0.5
        while self.running:
            now = time.monotonic()
            heap = self.heap
            while heap and heap[0][0] <= now:
                due, pos = heapq.heappop(heap)
                n = self.nodes[pos]
                if due != n.next_due:
                    continue  # superseded by an interval change
                self._beat(n, due, now)
            while self.pending and self.inflight < self.cfg.hello_inflight:
                self._hello(self.nodes[self.pending.popleft()], time.monotonic())
            if now >= next_retry_check:
                next_retry_check = now + 0.5
                for n in self.nodes:
                    if n.state == "hello" and now - n.hello_at >= HELLO_TIMEOUT:
                        self.c["hello_retry"] += 1
                        self._hello(n, now)
            if now >= next_sweep:
                # safety net for a missed ZMQ_FD edge: look at every socket once a second
                next_sweep = now + 1.0
                for n in self.nodes:
                    if n.sock is not None and n.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        self.c["sweep_found"] += 1
                        self._drain(n)
                    if n.blocked_since >= 0 and now - n.last_send > 5.0:
                        n.outstanding = 0   # an ACK got lost: do not stall this node forever
                        self.c["window_reset"] += 1
                        self._unblock(n, now)
            if self.cfg.tick > 0:
                # Fixed tick: one wake-up handles every ACK that arrived and every beat that came
                # due since the last one, instead of one wake-up per message (a beat leaves at
                # most one tick late; an ACK is read at most one tick late).
                self._dispatch(self.ep.poll(0))
                delay = now + self.cfg.tick - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                continue
            timeout = 0.05
            if heap:
                timeout = min(timeout, max(0.0, heap[0][0] - time.monotonic()))
            if self.pending and self.inflight < self.cfg.hello_inflight:
                timeout = 0.0
            self._dispatch(self.ep.poll(timeout))

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        for fd, _ in events:
            n = self.by_fd.get(fd)
            if n is None:
                self._control()
            else:
                self._drain(n)

    def close(self) -> None:
        for n in self.nodes:
            if n.sock is not None:
                n.sock.close(linger=0)
        self.ctx.term()


def worker_main(wid: int, indices: list[int], cfg: SimConfig, conn: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent owns Ctrl-C and stops us
    _die_with_parent()
    if cfg.cpus:
        os.sched_setaffinity(0, cfg.cpus)
    w: Worker | None = None
    try:
        w = Worker(wid, indices, cfg, conn)
        w.run()
    except Exception:  # noqa: BLE001 — tell the parent, then leave
        try:
            conn.send(("fatal", traceback.format_exc()))
        except Exception:  # noqa: BLE001
            pass
    finally:
        if w is not None:
            w.close()


# =====================================================================================
# The benchmark driver (parent process)
# =====================================================================================

@dataclass
class Bench:
    args: argparse.Namespace
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tc-bench-")))
    cluster: Cluster | None = None
    coord: subprocess.Popen[bytes] | None = None
    coord_log: Any = None
    pg: Any = None
    procs: list[Any] = field(default_factory=list)
    conns: list[Any] = field(default_factory=list)
    spy: subprocess.Popen[bytes] | None = None
    out: dict[str, Any] = field(default_factory=dict)
    coord_cpus: tuple[int, ...] | None = None
    sim_cpus: tuple[int, ...] | None = None

    # --- plumbing ---------------------------------------------------------------------
    def say(self, msg: str) -> None:
        print(msg, flush=True)

    def start_coordinator(self) -> None:
        a = self.args
        if a.db == "postgresql":
            from tests.pg import PgCluster
            self.pg = PgCluster().start()
            db_url = self.pg.new_database()
        else:
            db_url = f"sqlite:///{self.root}/coordinator.db"
        extra = [f"heartbeat.max_rate={a.max_rate}"] + list(a.set)
        self.cluster = Cluster(root=self.root, db_url=db_url, heartbeat=_dur(a.coord_interval),
                               lease_ttl_min=_dur(a.lease_ttl_min), grace="0s", coord_extra=extra)
        argv = self.cluster.coordinator_argv(migrate=True) + ["--log-level", a.coord_log_level]
        self.coord_log = open(self.root / "coordinator.log", "ab")
        cpus = sorted(os.sched_getaffinity(0))
        if a.pin and len(cpus) > 1:
            # the coordinator (every thread: set before exec, inherited) gets the first CPU to itself;
            # the simulator and this driver share the others
            self.coord_cpus, self.sim_cpus = (cpus[0],), tuple(cpus[1:])
            os.sched_setaffinity(0, self.sim_cpus)
        coord_cpus = self.coord_cpus

        def prepare() -> None:
            _die_with_parent()
            if coord_cpus:
                os.sched_setaffinity(0, coord_cpus)
        self.coord = subprocess.Popen(argv, stdout=self.coord_log, stderr=subprocess.STDOUT, cwd=REPO,
                                      env=self.cluster.env(), start_new_session=True, preexec_fn=prepare)
        t0 = time.monotonic()
        wait_for(lambda: self.cluster.tcctl("node", "list", timeout=2)[0] == 0 or self.coord.poll() is not None,
                 60, "the coordinator to answer tcctl node list --json")
        if self.coord.poll() is not None:
            raise RuntimeError(f"coordinator exited with {self.coord.returncode}:\n{self.coord_tail()}")
        self.say(f"coordinator pid {self.coord.pid} up in {time.monotonic() - t0:.1f}s "
                 f"(db {a.db}, agents tcp://127.0.0.1:{self.cluster.agent_port}, H {a.coord_interval:g}s, "
                 f"lease_ttl_min {a.lease_ttl_min:g}s, failover_grace 0s"
                 + (f"; pinned: coordinator CPU {self.coord_cpus}, simulator CPUs {self.sim_cpus}" if self.coord_cpus
                    else "") + ")")

    def coord_tail(self, n: int = 3000) -> str:
        p = self.root / "coordinator.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else ""

    def coord_alive(self) -> None:
        if self.coord is None or self.coord.poll() is not None:
            raise RuntimeError(f"the coordinator died (exit {self.coord.returncode if self.coord else '?'}):\n"
                               f"{self.coord_tail()}")

    def client(self, timeout: float = 30.0) -> Any:
        from coordinator.cli.client import AdminClient
        return AdminClient([self.cluster.admin], timeout=timeout)  # type: ignore[union-attr]

    def node_list(self, **args: Any) -> tuple[float, dict[str, Any]]:
        """One ``node list`` over the admin protocol; (seconds, result)."""
        c = self.client()
        t = time.perf_counter()
        res = c.request("node list", {k: v for k, v in args.items() if v is not None})
        return time.perf_counter() - t, res

    def tcctl_once(self) -> float:
        t = time.perf_counter()
        rc, doc = self.cluster.tcctl("node", "list", timeout=60)  # type: ignore[union-attr]
        dt = time.perf_counter() - t
        if rc != 0:
            raise RuntimeError(f"tcctl node list failed: {str(doc)[:500]}")
        return dt

    def cpu(self) -> dict[str, Any]:
        """CPU seconds so far: the coordinator (total and per thread), the workers, the machine."""
        p = psutil.Process(self.coord.pid)  # type: ignore[union-attr]
        ct = p.cpu_times()
        threads: dict[str, float] = collections.Counter()
        for th in p.threads():
            try:
                name = Path(f"/proc/{p.pid}/task/{th.id}/comm").read_text().strip()
            except OSError:
                name = "?"
            if th.id == p.pid:
                name = "main (event loop)"
            threads[name] += th.user_time + th.system_time
        sim = 0.0
        for proc in self.procs:
            try:
                t = psutil.Process(proc.pid).cpu_times()
                sim += t.user + t.system
            except psutil.Error:
                pass
        me = psutil.Process().cpu_times()
        m = psutil.cpu_times()
        return {"t": time.monotonic(), "coord": ct.user + ct.system, "threads": dict(threads), "sim": sim,
                "bench": me.user + me.system,
                "machine_busy": m.user + m.system + m.nice + getattr(m, "irq", 0) + getattr(m, "softirq", 0)}

    @staticmethod
    def cpu_delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        wall = b["t"] - a["t"]
        th = {k: (b["threads"].get(k, 0) - a["threads"].get(k, 0)) / wall for k in b["threads"]}
        coord, sim = (b["coord"] - a["coord"]) / wall, (b["sim"] - a["sim"]) / wall
        machine, bench = (b["machine_busy"] - a["machine_busy"]) / wall, (b["bench"] - a["bench"]) / wall
        return {"wall": wall, "coord": coord, "sim": sim, "machine": machine, "bench": bench,
                "others": max(0.0, machine - coord - sim - bench),
                "threads": {k: v for k, v in sorted(th.items(), key=lambda kv: -kv[1]) if v >= 0.005}}

    def fmt_cpu(self, d: dict[str, Any]) -> str:
        th = ", ".join(f"{k} {v:.3f}" for k, v in d["threads"].items())
        return (f"coordinator {d['coord']:.3f} cores [{th}]; simulator {d['sim']:.3f}; bench driver "
                f"{d['bench']:.3f}; other processes {d['others']:.2f}; machine busy {d['machine']:.2f} of "
                f"{psutil.cpu_count()} cores")

    # --- workers ----------------------------------------------------------------------
    def start_workers(self) -> None:
        a = self.args
        ctx = mp.get_context("spawn")
        base = time.monotonic() + 1.0
        per = [a.nodes // a.procs + (1 if i < a.nodes % a.procs else 0) for i in range(a.procs)]
        start = 0
        for wid, count in enumerate(per):
            if count == 0:
                continue
            parent, child = ctx.Pipe()
            cfg = SimConfig(endpoint=f"tcp://127.0.0.1:{self.cluster.agent_port}", nodes=a.nodes,  # type: ignore[union-attr]
                            interval=a.interval, window=a.window,
                            hello_inflight=max(1, a.hello_inflight // a.procs), base=base, tick=a.tick,
                            cpus=self.sim_cpus)
            p = ctx.Process(target=worker_main, args=(wid, list(range(start, start + count)), cfg, child),
                            name=f"sim-worker-{wid}", daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
            start += count
        for c in self.conns:
            kind, info = self._recv(c, 60)
            if kind != "ready":
                raise RuntimeError(f"worker failed to start: {info}")
        self.say(f"{len(self.procs)} simulator workers up ({', '.join(str(p.pid) for p in self.procs)}), "
                 f"{a.nodes} nodes, {per[0]} per worker")

    def _recv(self, conn: Any, timeout: float) -> tuple[str, Any]:
        if not conn.poll(timeout):
            raise RuntimeError(f"a simulator worker did not answer within {timeout:g}s")
        kind, info = conn.recv()
        if kind == "fatal":
            raise RuntimeError(f"a simulator worker failed:\n{info}")
        return kind, info

    def broadcast(self, cmd: str, arg: Any = None) -> None:
        for c in self.conns:
            c.send((cmd, arg))

    def stats(self, reset_rtt: bool = False) -> dict[str, Any]:
        self.broadcast("stats", reset_rtt)
        total: collections.Counter[str] = collections.Counter()
        rtt: list[float] = []
        last_welcome, live = 0.0, 0
        for c in self.conns:
            kind, info = self._recv(c, 30)
            assert kind == "stats", kind
            total.update(info["counters"])
            rtt += info["rtt"]
            last_welcome = max(last_welcome, info["last_welcome"])
            live += info["live"]
        return {"c": total, "rtt": rtt, "last_welcome": last_welcome, "live": live, "t": time.monotonic()}

    # --- phases -----------------------------------------------------------------------
    def phase_idle(self) -> None:
        a = self.args
        self.say("\n== baseline: idle coordinator, no simulated nodes ==")
        lat = []
        c0 = self.cpu()
        for _ in range(a.samples):
            dt, _res = self.node_list()
            lat.append(dt)
            time.sleep(0.02)
        idle_cpu_window = 3.0
        c1 = self.cpu()
        time.sleep(idle_cpu_window)
        c2 = self.cpu()
        tc = self.tcctl_once()
        self.out.update(idle_node_list_p50_ms=rnd(pct(lat, 50) * 1000), idle_node_list_p99_ms=rnd(pct(lat, 99) * 1000),
                        idle_coordinator_cpu_cores=rnd(self.cpu_delta(c1, c2)["coord"], 4),
                        idle_tcctl_node_list_s=rnd(tc))
        self.say(f"node list (admin protocol, {len(lat)} requests): p50 {pct(lat, 50) * 1000:.2f} ms, "
                 f"p99 {pct(lat, 99) * 1000:.2f} ms; during those: {self.fmt_cpu(self.cpu_delta(c0, c1))}")
        self.say(f"idle {idle_cpu_window:g}s: {self.fmt_cpu(self.cpu_delta(c1, c2))}")
        self.say(f"tcctl node list --json (subprocess, idle): {tc:.3f} s")

    def phase_ramp(self) -> None:
        a = self.args
        self.say(f"\n== (a) ramp: HELLO {a.nodes} nodes, at most {a.hello_inflight} in flight ==")
        c0 = self.cpu()
        t0 = time.monotonic()
        self.broadcast("hello")
        deadline = t0 + a.ramp_timeout
        next_print = t0
        last_cpu: dict[str, Any] | None = None
        health: collections.Counter[str] = collections.Counter()
        while True:
            self.coord_alive()
            now = time.monotonic()
            st = self.stats()
            if st["c"]["welcome"] >= a.nodes:
                # node list costs the coordinator O(N): ask it only once every node has its WELCOME
                _dt, res = self.node_list()
                health = collections.Counter(n["health"] for n in res["nodes"])
                if health.get("READY", 0) >= a.nodes:
                    break
            if now >= next_print:
                cp = self.cpu()
                self.say(f"  +{now - t0:5.1f}s welcomed {st['c']['welcome']:>6}/{a.nodes}, hello retries "
                         f"{st['c']['hello_retry']}, ACKs {st['c']['acks']}"
                         + (f", node list: {dict(sorted(health.items()))}" if health else "")
                         + (f"; last 5 s: {self.fmt_cpu(self.cpu_delta(last_cpu, cp))}" if last_cpu else ""))
                last_cpu = cp
                next_print = now + 5.0
            if now > deadline:
                raise RuntimeError(f"ramp: not all {a.nodes} nodes READY within {a.ramp_timeout:g}s: "
                                   f"welcomed {st['c']['welcome']}, {dict(health)}\n{self.coord_tail()}")
            time.sleep(0.25)
        t_ready = time.monotonic() - t0
        c1 = self.cpu()
        st = self.stats()
        t_welcome = st["last_welcome"] - t0 if st["last_welcome"] else None
        c = st["c"]
        self.out.update(ramp_s=rnd(t_ready, 2), ramp_welcome_s=rnd(t_welcome, 2),
                        ramp_coordinator_cpu_cores=rnd(self.cpu_delta(c0, c1)["coord"], 3))
        self.say(f"all {a.nodes} READY after {t_ready:.2f} s (last WELCOME at {t_welcome:.2f} s, "
                 f"{a.nodes / t_ready:.0f} nodes/s); hello {c['hello']}, retries {c['hello_retry']}, "
                 f"catalog pages {c['catalog_sent']}, errors "
                 f"{ {k: v for k, v in c.items() if k.startswith('error:')} or 0}")
        self.say(f"during the ramp: {self.fmt_cpu(self.cpu_delta(c0, c1))}")

    def _window(self, label: str, seconds: float, reads: int) -> dict[str, Any]:
        """Run ``seconds`` of steady load; ``reads`` node list requests spread evenly over it."""
        _, r0 = self.node_list()
        tr0 = time.monotonic()
        s0 = self.stats(reset_rtt=True)
        c0 = self.cpu()
        spy = self.start_spy(seconds) if (self.args.py_spy and reads == 0) else None
        lat: list[float] = []
        start = time.monotonic()
        for i in range(reads):
            target = start + (i + 0.5) * seconds / reads
            time.sleep(max(0.0, target - time.monotonic()))
            dt, _ = self.node_list()
            lat.append(dt)
        time.sleep(max(0.0, start + seconds - time.monotonic()))
        c1 = self.cpu()
        s1 = self.stats(reset_rtt=True)
        _, r1 = self.node_list()
        tr1 = time.monotonic()
        self.coord_alive()
        cpu = self.cpu_delta(c0, c1)
        wall = s1["t"] - s0["t"]
        acks = s1["c"]["acks"] - s0["c"]["acks"]
        beats = s1["c"]["beats"] - s0["c"]["beats"]
        hb_counter = (r1["heartbeats"] - r0["heartbeats"]) / (tr1 - tr0)
        health = collections.Counter(n["health"] for n in r1["nodes"])
        res = {"wall": wall, "absorbed": acks / wall, "sent": beats / wall, "counter": hb_counter,
               "cpu": cpu, "lat": lat, "rtt": s1["rtt"], "health": dict(health),
               "skipped_window": (s1["c"]["skipped_window"] - s0["c"]["skipped_window"]) / wall,
               "skipped_behind": (s1["c"]["skipped_behind"] - s0["c"]["skipped_behind"]) / wall,
               "errors": {k: v - s0["c"].get(k, 0) for k, v in s1["c"].items()
                          if k.startswith(("error:", "bad_frame", "unexpected", "send_again", "want_",
                                           "window_reset", "rehello")) and v - s0["c"].get(k, 0)}}
        rtt = res["rtt"]
        self.say(f"[{label}] {wall:.1f}s: sent {res['sent']:.0f}/s, absorbed (ACKs) {res['absorbed']:.0f}/s, "
                 f"coordinator counter {hb_counter:.0f}/s; ACK round trip p50 "
                 f"{(pct(rtt, 50) or 0) * 1000:.2f} ms p99 {(pct(rtt, 99) or 0) * 1000:.2f} ms")
        self.say(f"[{label}] {self.fmt_cpu(cpu)}")
        if res["skipped_window"] or res["skipped_behind"]:
            self.say(f"[{label}] beats not sent: {res['skipped_window']:.0f}/s window full, "
                     f"{res['skipped_behind']:.0f}/s simulator behind schedule")
        if lat:
            self.say(f"[{label}] node list ({len(lat)} requests, {len(r1['nodes'])} nodes): p50 "
                     f"{pct(lat, 50) * 1000:.1f} ms, p99 {pct(lat, 99) * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms")
        self.say(f"[{label}] health at the end: {dict(sorted(health.items()))}"
                 + (f"; protocol events: {res['errors']}" if res["errors"] else ""))
        if spy is not None:
            self.finish_spy(spy)
        return res

    def phase_steady(self) -> None:
        a = self.args
        offered = a.nodes / a.interval
        settle = max(2.0, 2 * a.interval)
        self.say(f"\n== (b) steady state: {a.nodes} nodes every {a.interval:g}s = {offered:.0f} beats/s offered"
                 f"{f', window {a.window}' if a.window else ''} ({settle:g}s settle) ==")
        time.sleep(settle)
        b1 = self._window("b1 heartbeats only", a.duration, 0)
        tc = None
        if a.reads:
            b2 = self._window("b2 + node list reads", a.duration, a.samples)
            tc = self.tcctl_once()
            self.say(f"[b2] tcctl node list --json (subprocess, {a.nodes} nodes, under load): {tc:.3f} s")
        else:
            b2 = None
        cores = b1["cpu"]["coord"]
        rtt50 = pct(b1["rtt"], 50) or 0.0
        saturated = rtt50 > min(1.0, a.interval) or b1["absorbed"] < 0.95 * b1["sent"]
        if saturated:
            self.say(f"coordinator SATURATED: ACK round trip p50 {rtt50 * 1000:.0f} ms (a queue in front of it); the "
                     f"absorbed rate {b1['absorbed']:.0f}/s is its capacity here, not the offered load")
        p99 = pct(b2["lat"], 99) if b2 else None
        p50 = pct(b2["lat"], 50) if b2 else None
        idle99 = self.out.get("idle_node_list_p99_ms")
        self.out.update(
            saturated=saturated, offered_per_s=rnd(offered, 1), sent_per_s=rnd(b1["sent"], 1), absorbed_per_s=rnd(b1["absorbed"], 1),
            coordinator_counter_per_s=rnd(b1["counter"], 1), coordinator_cpu_cores=rnd(cores, 4),
            coordinator_threads_cores={k: rnd(v, 4) for k, v in b1["cpu"]["threads"].items()},
            per_core_rate=rnd(b1["absorbed"] / cores, 1) if cores > 0 else None,
            cpu_fraction_of_half_core=rnd(cores / 0.5, 3),
            sim_cpu_cores=rnd(b1["cpu"]["sim"], 3), machine_busy_cores=rnd(b1["cpu"]["machine"], 3),
            other_processes_cpu_cores=rnd(b1["cpu"]["others"], 3),
            heartbeat_rtt_p50_ms=rnd((pct(b1["rtt"], 50) or 0) * 1000), heartbeat_rtt_p99_ms=rnd((pct(b1["rtt"], 99) or 0) * 1000),
            beats_skipped_window_per_s=rnd(b1["skipped_window"], 1), beats_skipped_behind_per_s=rnd(b1["skipped_behind"], 1),
            health_after_steady=b1["health"],
            node_list_p50_ms=rnd(p50 * 1000) if p50 is not None else None,
            node_list_p99_ms=rnd(p99 * 1000) if p99 is not None else None,
            node_list_requests=len(b2["lat"]) if b2 else 0,
            node_list_p99_ratio_vs_idle=rnd(p99 * 1000 / idle99, 2) if (p99 is not None and idle99) else None,
            coordinator_cpu_cores_with_reads=rnd(b2["cpu"]["coord"], 4) if b2 else None,
            absorbed_per_s_with_reads=rnd(b2["absorbed"], 1) if b2 else None,
            tcctl_node_list_s=rnd(tc), tcctl_node_list_ratio_vs_idle=rnd(tc / self.out["idle_tcctl_node_list_s"], 2)
            if tc and self.out.get("idle_tcctl_node_list_s") else None)

    def phase_lost(self) -> None:
        a = self.args
        h = max(a.coord_interval, a.nodes / a.max_rate)   # NODE-7 effective interval
        threshold = max(a.lease_ttl_min, 5 * h)
        k = max(1, a.nodes // 100)
        victims = [i * (a.nodes // k) for i in range(k)]   # spread over every worker and phase slot
        vid = {f"sim-{i:06d}" for i in victims}
        self.say(f"\n== (c) lost: {k} nodes (1%) stop beating; threshold max(lease_ttl_min {a.lease_ttl_min:g}s, "
                 f"5H {5 * h:g}s) = {threshold:g}s ==")
        sub = self.subscribe_events()
        self.broadcast("kill", victims)
        killed = sum(self._recv(c, 30)[1] for c in self.conns)
        t_kill = time.monotonic()
        assert killed == k, (killed, k)
        # a backlog in the coordinator's queue delays detection by about its depth (the ACK round trip)
        backlog = (self.out.get("heartbeat_rtt_p99_ms") or 0) / 1000
        deadline = t_kill + 2 * threshold + 30 + 3 * backlog
        polls = 0
        lost: dict[str, Any] = {}
        first_all: float | None = None
        lost_times: dict[str, float] = {}
        silent: list[int] = []
        false_pos: collections.Counter[str] = collections.Counter()
        while time.monotonic() < deadline:
            self.coord_alive()
            self.drain_events(sub, vid, lost_times)
            now = time.monotonic()
            # coarse polls while far from the threshold, fine ones near it
            gap = 2.0 if now - t_kill < threshold - 2.0 else a.lost_poll
            _dt, res = self.node_list()
            polls += 1
            lost = {n["node_id"]: n for n in res["nodes"] if n["health"] == "LOST"}
            if all(v in lost for v in vid):
                first_all = time.monotonic() - t_kill
                silent = [lost[v]["silent_ms"] for v in vid]
                false_pos = collections.Counter(n["health"] for n in res["nodes"]
                                                if n["node_id"] not in vid and n["health"] != "READY")
                break
            early = [lost[v]["silent_ms"] for v in vid if v in lost and lost[v]["silent_ms"] < threshold * 1000]
            if early:   # LOST before the threshold of silence would be a bug (NODE-2)
                self.say(f"  warning: {len(early)} victims LOST after only {min(early)} ms of silence")
            time.sleep(gap)
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end and len(lost_times) < k:
            self.drain_events(sub, vid, lost_times)
            time.sleep(0.05)
        sub.close(linger=0)
        ev = sorted(t - t_kill for t in lost_times.values())
        if first_all is None:
            got = sum(1 for v in vid if v in lost)
            self.out.update(lost_nodes=k, lost_detect_s=None, lost_threshold_s=threshold,
                            lost_detected_by_deadline=got, lost_deadline_s=rnd(deadline - t_kill, 1))
            self.say(f"NOT all {k} killed nodes LOST within {deadline - t_kill:.0f} s: {got} were "
                     f"(ACK round trip p99 before the kill: {backlog:.1f} s — queued heartbeats keep a dead "
                     f"node's last_seen fresh until the coordinator has worked through them)")
            return
        self.out.update(lost_nodes=k, lost_detect_s=rnd(first_all, 2), lost_threshold_s=threshold,
                        lost_detect_ratio_vs_threshold=rnd(first_all / threshold, 3),
                        lost_event_first_s=rnd(ev[0], 2) if ev else None, lost_event_last_s=rnd(ev[-1], 2) if ev else None,
                        lost_silent_ms_min=min(silent), lost_silent_ms_max=max(silent),
                        lost_false_positives=dict(false_pos))
        self.say(f"all {k} LOST in node list after {first_all:.2f} s (threshold {threshold:g} s; poll every "
                 f"{a.lost_poll:g}s near it, {polls} polls); their silent_ms {min(silent)}..{max(silent)}")
        if ev:
            self.say(f"node.<id> health events (lease loop): first LOST at {ev[0]:.2f} s, last at {ev[-1]:.2f} s "
                     f"({len(ev)}/{k} seen)")
        self.say(f"other nodes not READY at that moment: {dict(false_pos) or 'none'}")

    def subscribe_events(self) -> zmq.Socket:
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SUBSCRIBE, b"node.")
        s.connect(f"ipc://{self.cluster.run_dir}/events.sock")  # type: ignore[union-attr]
        time.sleep(0.2)   # PUB/SUB join: events before the subscription reaches the PUB are lost anyway
        return s

    @staticmethod
    def drain_events(sub: zmq.Socket, vid: set[str], lost_times: dict[str, float]) -> None:
        while True:
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 4:
                continue
            body = msgpack.unpackb(frames[3], raw=False)
            data = body.get("data") or {}
            if body.get("kind") == "health" and data.get("new") == "LOST" and data.get("node") in vid:
                lost_times.setdefault(data["node"], time.monotonic())

    # --- py-spy (optional) ----------------------------------------------------------
    def start_spy(self, seconds: float) -> subprocess.Popen[bytes] | None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).exists():
            self.say("py-spy not found (.venv/bin/pip install py-spy); no profile")
            return None
        out = Path(self.args.py_spy).resolve()
        fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(out.suffix, "raw")
        argv = [exe, "record", "--pid", str(self.coord.pid), "--duration", str(max(1, int(seconds))),  # type: ignore[union-attr]
                "--rate", "200", "--nonblocking", "--threads", "--format", fmt, "-o", str(out)]
        self.say(f"py-spy recording the coordinator for {int(seconds)} s → {out} ({fmt})")
        self.spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(self.root / "py-spy.log", "wb"))
        return self.spy

    def finish_spy(self, spy: subprocess.Popen[bytes]) -> None:
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
        out = Path(self.args.py_spy)
        if out.suffix not in (".svg", ".json") and out.exists():
            self.say(summarise_collapsed(out.read_text()))

    # --- clean-up ---------------------------------------------------------------------
    def cleanup(self) -> None:
        for c in self.conns:
            try:
                c.send(("stop", None))
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + 10
        for p in self.procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=3)
            if p.is_alive():
                p.kill()
                p.join(timeout=3)
        if self.spy is not None and self.spy.poll() is None:
            self.spy.kill()
            self.spy.wait(timeout=5)
        if self.coord is not None and self.coord.poll() is None:
            self.coord.send_signal(signal.SIGTERM)
            try:
                rc = self.coord.wait(timeout=20)
                self.say(f"coordinator stopped (exit {rc})")
            except subprocess.TimeoutExpired:
                self.coord.kill()
                self.coord.wait(timeout=10)
                self.say("coordinator did not stop within 20 s: killed")
        if self.coord_log is not None:
            self.coord_log.close()
        if self.pg is not None:
            self.pg.stop()
        if self.cluster is not None:
            shutil.rmtree(self.cluster.run_dir, ignore_errors=True)
        if self.args.keep:
            self.say(f"kept {self.root} (coordinator.log)")
        else:
            shutil.rmtree(self.root, ignore_errors=True)


# Leaf frames that are a thread waiting, not working. py-spy's idle detection does not work on every
# kernel (on the Firecracker VM these figures come from, sleeping threads are sampled as active), so
# these are counted apart and the shares below are of the busy samples only.
WAIT_LEAVES = ("EpollSelector.select (selectors.py", "Poller.poll (zmq/sugar/poll.py",
               "_worker (concurrent/futures/thread.py:81)", "wait (threading.py", "get (queue.py",
               "_wait_for_tstate_lock", "select.epoll.poll", "time.sleep")


def summarise_collapsed(text: str, top: int = 25) -> str:
    """Self and inclusive shares per function from py-spy's collapsed ('raw') output."""
    total = waits = 0
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        cnt = int(n)
        frames = stack.split(";")
        thread = ""
        if frames and frames[0].startswith(("thread (", "process ")):
            thread = frames[0]
            frames = [f for f in frames if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        if frames[-1].startswith(WAIT_LEAVES):
            waits += cnt
            continue
        total += cnt
        threads[thread] += cnt
        self_c[frames[-1]] += cnt
        for f in set(frames):
            incl[f] += cnt
    if not total:
        return "py-spy: no busy samples"
    lines = [f"py-spy: {total} busy samples ({waits} more in select/poll/queue waits left out); shares of busy:"]
    lines += [f"  {t or 'all threads'}: {c * 100 / total:.1f}%" for t, c in threads.most_common(6)]
    lines.append("  top self time:")
    lines += [f"    {c * 100 / total:5.1f}%  {f}" for f, c in self_c.most_common(top)]
    lines.append("  top inclusive time:")
    lines += [f"    {c * 100 / total:5.1f}%  {f}" for f, c in incl.most_common(top)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="templatecenter heartbeat benchmark (see tests/bench/README.md)")
    p.add_argument("--nodes", type=int, help="simulated nodes (default 10000; 2000 with --max)")
    p.add_argument("--interval", type=float, help="heartbeat interval in s (default 2; 0.05 with --max)")
    p.add_argument("--procs", type=int, default=3, help="simulator worker processes (default 3)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per steady-state window (default 20)")
    p.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite",
                   help="coordinator database: SQLite in the temp dir (default) or a throwaway PostgreSQL "
                        "cluster (tests/pg.py; its server CPU is not counted as the coordinator's)")
    p.add_argument("--max", action="store_true", help="max-throughput mode (see the module docstring)")
    p.add_argument("--window", type=int, help="max unanswered beats per node, 0 = unlimited "
                                              "(default 0; 2 with --max)")
    p.add_argument("--coord-interval", type=float, help="coordinator heartbeat.interval in s "
                                                        "(default --interval; 2 with --max)")
    p.add_argument("--lease-ttl-min", type=float, default=15.0, help="heartbeat.lease_ttl_min in s (default 15)")
    p.add_argument("--max-rate", type=int, default=20_000, help="heartbeat.max_rate (NODE-7 cap, default 20000)")
    p.add_argument("--hello-inflight", type=int, default=256, help="HELLOs in flight over all workers (default 256)")
    p.add_argument("--samples", type=int, default=50, help="node list requests per measurement (default 50)")
    p.add_argument("--no-reads", dest="reads", action="store_false", help="skip the b2 node list window")
    p.add_argument("--kill", dest="kill", action="store_true", default=None, help="run phase (c) (default: "
                                                                                   "yes, no with --max)")
    p.add_argument("--no-kill", dest="kill", action="store_false")
    p.add_argument("--lost-poll", type=float, default=0.25, help="node list poll period near the LOST threshold "
                                                                  "(default 0.25 s)")
    p.add_argument("--ramp-timeout", type=float, help="seconds (default 60 + nodes/50)")
    p.add_argument("--py-spy", metavar="FILE", help="profile the coordinator during window b1 "
                                                    "(.svg flamegraph, .json speedscope, else collapsed text)")
    p.add_argument("--tick", type=float, default=0.005, help="simulator loop period in s (default 0.005; "
                                                              "0 = wake up per message)")
    p.add_argument("--pin", action="store_true", help="coordinator on the first CPU alone, simulator on the rest")
    p.add_argument("--coord-log-level", default="INFO", help="coordinator --log-level (default INFO)")
    p.add_argument("--set", action="append", default=[], metavar="K=V", help="extra coordinator --set")
    p.add_argument("--keep", action="store_true", help="keep the temp dir with coordinator.log")
    a = p.parse_args(argv)
    a.nodes = a.nodes if a.nodes is not None else (2000 if a.max else 10_000)
    a.interval = a.interval if a.interval is not None else (0.05 if a.max else 2.0)
    a.window = a.window if a.window is not None else (2 if a.max else 0)
    a.coord_interval = a.coord_interval if a.coord_interval is not None else (2.0 if a.max else a.interval)
    a.kill = a.kill if a.kill is not None else not a.max
    a.ramp_timeout = a.ramp_timeout if a.ramp_timeout is not None else 60 + a.nodes / 50
    if a.nodes < 1 or a.procs < 1 or a.interval <= 0 or a.duration <= 0:
        p.error("--nodes, --procs, --interval and --duration must be positive")
    return a


def code_state() -> dict[str, Any]:
    """The commit under test and any uncommitted changes to the code the coordinator runs."""
    def git(*argv: str) -> str:
        r = subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else ""
    dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "coordinator", "protocol").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "uncommitted": dirty}


def raise_fd_limit(nodes: int, procs: int) -> None:
    """Each simulated node is one TCP connection on both sides; children inherit the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = nodes + 2048
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft < need or soft < 2 * (nodes // procs) + 2048:
        print(f"warning: open-file limit {soft} may be too low for {nodes} nodes ({need} needed by the "
              f"coordinator, ~{2 * (nodes // procs)} per worker)", flush=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    raise_fd_limit(a.nodes, a.procs)
    bench = Bench(a)

    def on_term(_sig: int, _frm: Any) -> None:
        raise KeyboardInterrupt

    # explicit, because a shell starting us in the background hands us SIGINT ignored
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    cores = psutil.cpu_count() or 0
    note = MACHINE_NOTE.format(cores=cores)
    bench.say(f"heartbeat bench {time.strftime('%Y-%m-%d %H:%M:%S')}: mode {'max' if a.max else 'fleet'}, "
              f"{a.nodes} nodes, interval {a.interval:g}s, {a.procs} workers, {a.duration:g}s windows, db {a.db}; "
              f"{cores} cores ({note})")
    rc = 0
    try:
        bench.start_coordinator()
        bench.phase_idle()
        bench.start_workers()
        bench.phase_ramp()
        bench.phase_steady()
        if a.kill:
            bench.phase_lost()
    except KeyboardInterrupt:
        bench.say("\ninterrupted: cleaning up")
        rc = 130
    except Exception as exc:  # noqa: BLE001 — report, clean up, exit non-zero
        bench.say(f"\nbenchmark failed: {exc}")
        traceback.print_exc()
        rc = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.cleanup()
    o = bench.out
    summary = {"mode": "max" if a.max else "fleet", "nodes": a.nodes, "interval": a.interval, "procs": a.procs,
               "window": a.window, "coord_interval": a.coord_interval, "duration": a.duration, "db": a.db,
               "machine_cores": cores, "note": note, "ok": rc == 0, "code": code_state(),
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for k in ("absorbed_per_s", "offered_per_s", "coordinator_cpu_cores", "per_core_rate", "node_list_p50_ms",
              "node_list_p99_ms", "lost_detect_s", "lost_threshold_s", "node_list_p99_ratio_vs_idle",
              "cpu_fraction_of_half_core"):
        summary[k] = o.get(k)
    summary.update({k: v for k, v in o.items() if k not in summary})
    if rc == 0 and o.get("coordinator_cpu_cores") is not None:
        if not a.max:
            bench.say(f"\ntarget 10,000 nodes at 2 s on < 0.5 core: {o['coordinator_cpu_cores']:.3f} cores "
                      f"({o['cpu_fraction_of_half_core']:.2f} of half a core) → "
                      f"{'met' if o['cpu_fraction_of_half_core'] < 1 else 'NOT met'}"
                      + ("" if (a.nodes, a.interval) == (10_000, 2.0) else " (this run used other N/interval)"))
        bench.say(f"heartbeats/s sustained on one core (absorbed ÷ coordinator cores): {o['per_core_rate']:.0f}"
                  + (f" → target ≥ 20,000: {'met' if o['per_core_rate'] >= 20_000 else 'NOT met'}" if o.get("saturated")
                     else " (coordinator not saturated, so this is not its capacity: use --max, or more "
                          "nodes / a shorter interval)"))
    print(json.dumps(summary, sort_keys=True), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
