"""One FETCH_ARTIFACT attempt on the wire (SPEC WIRE-16, WIRE-17, DIST-5; agent/transfer.py):
the parsed task arguments, the task's progress reports, and the DEALER to the source's blob
endpoint that runs the credit window, checks each CHUNK and renews an expired token."""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from protocol.daemon import configure_socket
from protocol.envelope import FrameDropped, parse
from protocol.errors import ArtifactChecksumMismatch, NodeUnavailable, TCError, from_wire
from protocol.message import decode_message
from protocol.messages import Chunk, Error, Fetch

from .fetchstate import POLL_SLICE, ChunkPlan, ResumeRecord
from .grants import short
from .tasks import TaskContext
from .transfer_sink import FileSink

if TYPE_CHECKING:
    from .transfer import TransferService

log = logging.getLogger("transfer")  # the service's logger: one log name for the whole transfer

RECORD_EVERY = 1.0         # s between progress-record rewrites
PROGRESS_EVERY = 1.0       # s between ctx.progress calls


@dataclass
class FetchArgs:
    """FETCH_ARTIFACT's arguments once checked (TransferService._parse)."""

    artifact_id: str
    files: list[dict[str, Any]]
    sha256: str
    size: int
    node: str
    endpoint: str
    key: str
    token: str


class Progress:
    """The task's progress reports of a fetch or a verify, at most one per PROGRESS_EVERY."""

    def __init__(self, ctx: TaskContext, total: int, done: int) -> None:
        self.ctx, self.total, self.done = ctx, total, done
        self.fetched = 0      # range bytes received and verified in this attempt
        self.wire = 0         # data bytes that crossed the wire in this attempt
        self.started = time.monotonic()
        self._last = 0.0

    def add(self, n: int, wire: int) -> None:
        self.done += n
        self.fetched += n
        self.wire += wire
        self.emit()

    def emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < PROGRESS_EVERY:
            return
        self._last = now
        speed = int(self.fetched / max(now - self.started, 1e-6))
        self.ctx.progress({"phase": "FETCHING", "bytes_done": self.done, "bytes_total": self.total,
                           "fetched_bytes": self.fetched, "speed": speed,
                           "percent": round(100.0 * self.done / self.total, 1) if self.total else 100.0})


class Link:
    """One DEALER to the source's blob endpoint for one FETCH_ARTIFACT attempt."""

    def __init__(self, svc: TransferService, args: FetchArgs, ctx: TaskContext) -> None:
        self.svc, self.args, self.ctx = svc, args, ctx
        self.token = args.token
        self._ids = (f"f{n}" for n in itertools.count(1))
        cfg = svc.cfg
        self.sock: zmq.Socket[Any] = svc._zctx.socket(zmq.DEALER)
        configure_socket(self.sock, hwm=cfg.zmq.hwm, linger=0, max_frame=cfg.codec.max_frame)
        self.sock.setsockopt(zmq.IDENTITY, f"{cfg.node_id}/{secrets.token_hex(4)}".encode())
        if svc._pair is not None:
            self.sock.setsockopt(zmq.CURVE_SECRETKEY, svc._pair.secret.encode())
            self.sock.setsockopt(zmq.CURVE_PUBLICKEY, svc._pair.public.encode())
            self.sock.setsockopt(zmq.CURVE_SERVERKEY, args.key.encode())
        self.sock.connect(args.endpoint)
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="fetch-check")

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *_: Any) -> None:
        self.sock.close(linger=0)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def pull(self, name: str, plan: ChunkPlan, sink: "FileSink", progress: Progress) -> None:
        """Run the credit window until every byte of ``name`` is verified and written.

        This thread only sends, receives and keeps the books; chunk digests and writes run on
        two pool threads and the running file digest on the sink's own thread (hashlib and
        pwrite release the GIL), so receiving, checking, writing and hashing overlap."""
        args = self.args
        pending: dict[str, tuple[int, str]] = {}  # msg_id -> (offset, token used)
        checking: dict[concurrent.futures.Future[bool], tuple[int, int, int]] = {}  # -> offset, length, wire
        last_heard = time.monotonic()
        while not plan.done:
            for offset, length in plan.take():
                mid = next(self._ids)
                pending[mid] = (offset, self.token)
                self.sock.send_multipart(Fetch(msg_id=mid, artifact_id=args.artifact_id, file=name, offset=offset,
                                               length=length, token=self.token).to_frames())
            self.ctx.check()
            for fut in [f for f in checking if f.done()]:
                offset, length, wire = checking.pop(fut)
                if fut.result():
                    sink.extend(offset)
                    progress.add(length, wire)
                    self._maybe_save(name, plan)
                elif not plan.bad(offset):
                    raise ArtifactChecksumMismatch(
                        f"chunk {name}@{offset} of {args.artifact_id} from {args.node} failed its digest "
                        f"{plan.retries} times", {"artifact_id": args.artifact_id, "file": name,
                                                  "offset": offset, "source": args.node})
                else:
                    log.info("chunk %s@%d of %s from %s failed its digest: asking again (try %d of %d)", name,
                             offset, args.artifact_id, args.node, plan.tries(offset) + 1, plan.retries)
            if plan.done:
                break
            if not self.sock.poll(1 if checking else int(POLL_SLICE * 1000)):
                if not checking and time.monotonic() - last_heard >= self.svc._stall:
                    raise NodeUnavailable(f"source node {args.node} ({args.endpoint}) sent nothing for "
                                          f"{self.svc._stall:g}s", {"node": args.node})
                continue
            last_heard = time.monotonic()
            msg = self._receive()
            if msg is None:
                continue
            parent = msg.parent_id
            if parent not in pending:
                continue  # an answer to a request already given up (asked again under a new token)
            offset, used = pending.pop(parent)
            if isinstance(msg, Error):
                self._refused(msg, plan, offset, used)
                continue
            assert isinstance(msg, Chunk)
            length = plan.length(offset)
            fits = msg.offset == offset and msg.file == name and msg.length == length and (
                msg.zero or len(msg.data) == length)
            checking[self._pool.submit(sink.check_and_write, msg, offset, length, fits)] = (
                offset, length, len(msg.data))
        self._save(name, plan)

    _saved_at = 0.0
    record: ResumeRecord | None = None

    def _maybe_save(self, name: str, plan: ChunkPlan) -> None:
        now = time.monotonic()
        if now - self._saved_at >= RECORD_EVERY:
            self._save(name, plan)
            self._saved_at = now

    def _save(self, name: str, plan: ChunkPlan) -> None:
        if self.record is not None:
            self.record.set(name, plan.verified)
            self.record.save()

    def _refused(self, err: Error, plan: ChunkPlan, offset: int, used: str) -> None:
        args = self.args
        if err.name == "TransferTokenExpired":
            if used == self.token:  # the first refusal under this token: renew it once
                log.info("token %s for %s expired: asking the coordinator for a new one", short(used),
                         args.artifact_id)
                self.token, _ = self.svc.broker.request(args.artifact_id, args.node, self.ctx.task_id,
                                                        self.ctx.check)
                log.info("new token %s for %s", short(self.token), args.artifact_id)
            plan.requeue(offset)
            return
        exc = from_wire({"code": err.code, "name": err.name, "message": err.message, "details": err.details})
        exc.message = f"source node {args.node} refused FETCH: {exc.message}"
        exc.details = {**exc.details, "source": args.node}
        raise exc

    def _receive(self) -> Chunk | Error | None:
        frames = self.sock.recv_multipart()
        try:
            msg = decode_message(parse(frames, router=False, limits=self.svc._limits), self.svc._limits)
        except (FrameDropped, TCError) as exc:
            log.warning("bad message from source %s: %s", self.args.node, exc)
            return None
        return msg if isinstance(msg, (Chunk, Error)) else None
