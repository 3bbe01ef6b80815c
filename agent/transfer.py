"""Artifact transfer, target side, plus VERIFY_ARTIFACT and REMOVE_ARTIFACT (SPEC WIRE-15 to WIRE-17,
DIST-4, DIST-5, CAT-8).

FETCH_ARTIFACT args ``{artifact_id, files: [{name, size, sha256}], sha256, size,
source: {node, endpoint, key}, token}``. The handler (a worker thread, like every task) opens a
DEALER to the source's blob endpoint — a CURVE client with this node's key pair and
``source.key`` when CURVE is on; with CURVE off its identity is ``<node id>/<random>``, which
is what the source's grant matches (``agent/grants.py``) — and pulls each file in turn:

* credit-based (zguide fileio3): at most ``transfer.window`` FETCHes of ``transfer.chunk``
  bytes in flight; each CHUNK returns one credit (:class:`ChunkPlan` is the pure logic);
* every CHUNK's sha256 is checked; a bad one is asked again, ``transfer.chunk_retries`` tries
  in all, then ArtifactChecksumMismatch;
* data goes to ``store/artifacts/<id>.partial/<file>`` at its offset; zero ranges (CHUNK
  ``zero``, or 4 KiB blocks of zeros inside a chunk) are not written, so a sparse ext4 stays
  sparse;
* a running sha256 follows the contiguous verified prefix (chunks ahead of it wait in memory,
  ≤ window × chunk), so the whole-file digest needs no second read;
* **resume** (WIRE-17): ``<id>.partial/.progress.json`` records each file's contiguous
  verified byte count, rewritten atomically at most once a second. A rerun — after a failed
  attempt or an agent restart — keeps that prefix (re-reading it once for the running digest),
  drops anything past it and fetches only the rest. The record is not fsynced: after a power
  loss a record may claim bytes that never reached the disk, and the whole-file check below
  then fails the attempt (the partial file is deleted and the next attempt starts over);
* the whole-file sha256 is checked against ``files[i].sha256`` before anything is
  registered; a mismatch deletes the partial directory and its ``partial`` catalog entry
  (ArtifactChecksumMismatch). On success: fsync, rename ``<id>.partial`` → ``<id>``, fsync the
  directory, then the catalog entry (kind ``artifact``, state ``verified``; CAT-8);
* TransferTokenExpired from the source → a TOKEN_REQUEST through the session
  (:class:`TokenBroker`); the FETCHes go on with the new token. TransferTokenInvalid ends the
  task (DIST-5). No reply for ``transfer.stall_timeout`` (10 s) → NodeUnavailable naming the source;
  a cancel is noticed within half a second.

While a fetch runs the artifact has a catalog entry in state ``partial`` (CAT-1), so the
coordinator's mirror and a later startup reconcile can see it; the blob endpoint serves only
``verified`` entries. An artifact already held verified with the same sha256 succeeds at once.

VERIFY_ARTIFACT ``{artifact_id}`` re-hashes the files against the catalog: ``{ok, sha256,
files}``, or ArtifactChecksumMismatch after marking the entry ``state: "corrupt"`` (kept, not
removed: the node stops serving it, the coordinator sees it is no longer verified, and
REMOVE_ARTIFACT cleans it up). REMOVE_ARTIFACT ``{artifact_id}`` follows CAT-8: mark
``removing``, delete the files, delete the entry; already gone is success (WIRE-15).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import zmq

from protocol.errors import ArtifactChecksumMismatch, ArtifactNotFound, InsufficientStorage, InvalidRequest
from protocol.keys import KeyPair
from protocol.message import Message
from protocol.messages import (CURVE_KEY, ENDPOINT, FILE_NAME, HEX64, NODE_ID, TOKEN, Error, Grant, GrantAck, Revoke,
                               TokenGrant, U64)
from protocol.schema import List, SchemaError, Struct

from .catalog import ARTIFACT_KIND, Catalog
from .config import AgentConfig
from .grants import Grant as GrantEntry, GrantTable, short
from .image.store import Store, check_artifact_id, fsync_dir
from .fetchstate import ChunkPlan, ResumeRecord, Send, TokenBroker
from .storage import check_writable
from .tasks import TaskContext
# The attempt on the wire and the file sink live in their own modules; ``_write_sparse`` keeps
# its old name here for tests/unit/test_transfer_logic.py.
from .transfer_link import FetchArgs, Link, Progress
from .transfer_sink import FileSink, write_sparse as _write_sparse  # noqa: F401

log = logging.getLogger("transfer")

PARTIAL = ".partial"
RECORD = ".progress.json"  # starts with a dot: no artifact file name can collide with it

_FILE = Struct({"name": FILE_NAME, "size": U64, "sha256": HEX64})
_SOURCE = Struct({"node": NODE_ID, "endpoint": ENDPOINT}, {"key": CURVE_KEY})
_ARGS = Struct({"files": List(_FILE, 16), "sha256": HEX64, "size": U64, "source": _SOURCE, "token": TOKEN})


# --- the service ------------------------------------------------------------------------

class TransferService:
    """FETCH_ARTIFACT, VERIFY_ARTIFACT and REMOVE_ARTIFACT, and the session hooks for GRANT,
    REVOKE and TOKEN (``on_message``) and for the ERROR answering a TOKEN_REQUEST (``on_error``)."""

    def __init__(self, cfg: AgentConfig, catalog: Catalog, grants: GrantTable, zctx: zmq.Context[Any],
                 pair: KeyPair | None = None, store: Store | None = None, *,
                 broker: TokenBroker | None = None) -> None:
        self.cfg = cfg
        self.catalog = catalog
        self.grants = grants
        self.store = store or Store.under(cfg.agent.state_dir)
        self.broker = broker or TokenBroker()
        self._zctx = zctx
        self._pair = pair
        self._stall = float(cfg.transfer.stall_timeout)
        self._limits = cfg.codec.limits()
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._send: Send | None = None

    def handlers(self) -> dict[str, Callable[[TaskContext], dict[str, Any]]]:
        return {"FETCH_ARTIFACT": self.fetch_task, "VERIFY_ARTIFACT": self.verify_task,
                "REMOVE_ARTIFACT": self.remove_task}

    # --- session hooks -------------------------------------------------------------------

    def attach(self, send: Send | None) -> None:
        """The session's send coroutine while a session is live (None when it ends)."""
        self._send = send
        self.broker.attach(send, asyncio.get_running_loop() if send is not None else None)

    async def on_message(self, msg: Message) -> bool:
        """GRANT, REVOKE or TOKEN from the coordinator; False for any other message."""
        if isinstance(msg, Grant):
            self.grants.add(GrantEntry(msg.artifact_id, msg.token, msg.expires, msg.target_node, msg.target_key))
            log.info("grant: %s to %s, token %s, expires in %.0fs", msg.artifact_id, msg.target_node,
                     short(msg.token), (msg.expires - time.time() * 1000) / 1000)
            if self._send is not None:
                await self._send(GrantAck(parent_id=msg.msg_id))
            return True
        if isinstance(msg, Revoke):
            n = self.grants.revoke(msg.artifact_id, msg.target_node)
            log.info("revoke: %d grant(s) for %s dropped", n, msg.artifact_id)
            return True
        if isinstance(msg, TokenGrant):
            if not self.broker.on_token(msg):
                log.info("TOKEN for %s answers no pending request: ignored", msg.artifact_id)
            return True
        return False

    def on_error(self, err: Error) -> bool:
        """True if ``err`` answers one of our TOKEN_REQUESTs (it then ends that wait)."""
        return self.broker.on_error(err)

    # --- FETCH_ARTIFACT ------------------------------------------------------------------

    def fetch_task(self, ctx: TaskContext) -> dict[str, Any]:
        args = self._parse(ctx.args)
        check_writable(self.cfg, "incoming transfers")  # SNAP-16, the agent's own gate
        with self._lock(args.artifact_id):
            ctx.check()
            return self.fetch(ctx, args)

    def _parse(self, raw: dict[str, Any]) -> FetchArgs:
        artifact_id = check_artifact_id(raw.get("artifact_id"))
        try:
            a = _ARGS(raw, "args")
        except SchemaError as exc:
            field = exc.field.removeprefix("args.")
            raise InvalidRequest(f"FETCH_ARTIFACT {field}: {exc.reason}", {"field": field, "reason": exc.reason}) from None
        names = [f["name"] for f in a["files"]]
        if not names or len(set(names)) != len(names):
            raise InvalidRequest("files must list each file of the artifact once", {"field": "files", "reason": "names"})
        src = a["source"]
        key = src.get("key") or ""
        if self._pair is not None and not key:
            raise InvalidRequest("source.key is required with CURVE on (SEC-1)", {"field": "source.key", "reason": "required"})
        return FetchArgs(artifact_id, a["files"], a["sha256"], a["size"], src["node"], src["endpoint"], key, a["token"])

    def fetch(self, ctx: TaskContext, args: FetchArgs) -> dict[str, Any]:
        aid = args.artifact_id
        final = self.store.artifact_dir(aid)
        existing = self.catalog.get(ARTIFACT_KIND, aid)
        if existing is not None and existing["body"].get("state") == "verified":
            body = existing["body"]
            if body.get("sha256") != args.sha256:
                raise InvalidRequest(f"artifact {aid} is held here with another sha256",
                                     {"field": "sha256", "reason": "differs from the held copy"})
            if all((final / f["name"]).is_file() and (final / f["name"]).stat().st_size == f["size"]
                   for f in args.files):
                log.info("artifact %s is already held (sha256 %s): nothing to fetch", aid, args.sha256[:12])
                return self._result(args, body, fetched=0, wire=0, resumed=args.size, seconds=0.0)
        partial = self.store.artifacts / f"{aid}{PARTIAL}"
        partial.mkdir(mode=0o700, exist_ok=True)
        record = ResumeRecord.load(partial / RECORD, args.files)
        total = sum(f["size"] for f in args.files)
        resumed = sum(record.verified(f["name"]) for f in args.files)
        need = total - resumed
        free = psutil.disk_usage(str(self.store.root)).free
        if free < need:
            raise InsufficientStorage(f"fetching {aid} needs {need >> 20} MiB free in the agent store, "
                                      f"{free >> 20} MiB are", {"need": need, "free": free})
        body = {"state": "partial", "sha256": args.sha256, "size": args.size, "files": args.files,
                "source": args.node, "task_id": ctx.task_id}
        self.catalog.put(ARTIFACT_KIND, aid, body)  # CAT-1: a partial artifact is listed as such
        if resumed:
            log.info("artifact %s: resuming with %d of %d bytes already verified", aid, resumed, total)
        progress = Progress(ctx, total, resumed)
        started = time.monotonic()
        try:
            with Link(self, args, ctx) as link:
                for f in args.files:
                    self._fetch_file(link, f, partial, record, progress)
        except ArtifactChecksumMismatch:
            shutil.rmtree(partial, ignore_errors=True)
            self.catalog.delete(ARTIFACT_KIND, aid)
            raise
        progress.emit(force=True)
        (partial / RECORD).unlink(missing_ok=True)
        fsync_dir(partial)
        if final.exists():  # a stale copy without a verified entry
            shutil.rmtree(final)
        os.rename(partial, final)
        fsync_dir(self.store.artifacts)
        body = {"state": "verified", "sha256": args.sha256, "size": args.size, "files": args.files,
                "source": args.node}
        self.catalog.put(ARTIFACT_KIND, aid, body)
        seconds = time.monotonic() - started
        log.info("artifact %s fetched from %s: %d bytes (%d on the wire, %d resumed) in %.2fs", aid, args.node,
                 progress.fetched, progress.wire, resumed, seconds)
        return self._result(args, body, fetched=progress.fetched, wire=progress.wire, resumed=resumed,
                            seconds=seconds)

    @staticmethod
    def _result(args: FetchArgs, body: dict[str, Any], *, fetched: int, wire: int, resumed: int,
                seconds: float) -> dict[str, Any]:
        return {"artifact_id": args.artifact_id, "sha256": body["sha256"], "size": body["size"],
                "files": body["files"], "source": args.node, "fetched_bytes": fetched, "wire_bytes": wire,
                "resumed_bytes": resumed, "seconds": round(seconds, 3)}

    def _fetch_file(self, link: Link, f: dict[str, Any], partial: Path, record: ResumeRecord,
                    progress: Progress) -> None:
        name, size = f["name"], f["size"]
        start = record.verified(name)
        fd = os.open(partial / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # Past the verified prefix nothing can be trusted (out-of-order chunks of a killed
            # attempt): cut it off, so skipped zero ranges read back as holes.
            os.ftruncate(fd, start)
            os.ftruncate(fd, size)
            plan = ChunkPlan(size, start, int(self.cfg.transfer.chunk), self.cfg.transfer.window,
                             self.cfg.transfer.chunk_retries)
            with FileSink(fd, plan) as sink:
                link.record = record
                link.pull(name, plan, sink, progress)
                digest = sink.digest()
            if digest != f["sha256"]:
                raise ArtifactChecksumMismatch(
                    f"{name} of {link.args.artifact_id} from {link.args.node} has sha256 {digest[:16]}…, "
                    f"expected {f['sha256'][:16]}…", {"artifact_id": link.args.artifact_id, "file": name,
                                                      "source": link.args.node})
            os.fsync(fd)
            record.set(name, size)
            record.save()
        finally:
            os.close(fd)

    # --- VERIFY_ARTIFACT / REMOVE_ARTIFACT -----------------------------------------------

    def verify_task(self, ctx: TaskContext) -> dict[str, Any]:
        aid = check_artifact_id(ctx.args.get("artifact_id"))
        with self._lock(aid):
            entry = self.catalog.get(ARTIFACT_KIND, aid)
            if entry is None or entry["body"].get("state") not in ("verified", "corrupt"):
                raise ArtifactNotFound(f"artifact {aid} has no complete copy on this node", {"artifact_id": aid})
            body = entry["body"]
            files = [f for f in body.get("files") or () if isinstance(f, dict)]
            total = sum(int(f.get("size", 0)) for f in files)
            progress = Progress(ctx, total, 0)
            bad: list[str] = []
            for f in files:
                path = self.store.artifact_dir(aid) / FILE_NAME(f.get("name"), "files.name")
                digest = _hash_file(path, ctx, progress)
                if not digest or digest != f.get("sha256") or path.stat().st_size != f.get("size"):
                    bad.append(f["name"])
            if bad:
                self.catalog.put(ARTIFACT_KIND, aid, {**body, "state": "corrupt", "corrupt_files": bad})
                raise ArtifactChecksumMismatch(f"artifact {aid} on this node is corrupt: {', '.join(bad)} "
                                               "do not match the catalog; it is no longer served",
                                               {"artifact_id": aid, "files": bad})
            if body.get("state") != "verified":
                self.catalog.put(ARTIFACT_KIND, aid, {k: v for k, v in body.items() if k != "corrupt_files"}
                                 | {"state": "verified"})
            return {"ok": True, "artifact_id": aid, "sha256": body.get("sha256"), "files": files}

    def remove_task(self, ctx: TaskContext) -> dict[str, Any]:
        aid = check_artifact_id(ctx.args.get("artifact_id"))
        with self._lock(aid):
            self.grants.revoke(aid)
            entry = self.catalog.get(ARTIFACT_KIND, aid)
            if entry is not None:  # CAT-8: mark, delete the files, then the entry
                self.catalog.put(ARTIFACT_KIND, aid, {**entry["body"], "state": "removing"})
            for path in (self.store.artifact_dir(aid), self.store.artifacts / f"{aid}{PARTIAL}"):
                shutil.rmtree(path, ignore_errors=True)
            fsync_dir(self.store.artifacts)
            if entry is not None:
                self.catalog.delete(ARTIFACT_KIND, aid)
            log.info("artifact %s removed%s", aid, "" if entry else " (it was already gone)")
            return {"artifact_id": aid, "removed": entry is not None}

    def _lock(self, artifact_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(artifact_id, threading.Lock())


# --- file helpers ---------------------------------------------------------------------

def _hash_file(path: Path, ctx: TaskContext, progress: Progress) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb", buffering=0) as fh:
            while data := fh.read(1 << 20):
                h.update(data)
                progress.add(len(data), 0)
                ctx.check()
    except FileNotFoundError:
        return ""
    return h.hexdigest()


__all__ = ["ChunkPlan", "ResumeRecord", "TokenBroker", "TransferService", "PARTIAL", "RECORD"]
