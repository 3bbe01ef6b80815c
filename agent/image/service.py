"""The RESOLVE_IMAGE and BUILD_ARTIFACT task handlers (WIRE-15, IMG-11, IMG-18 to IMG-23).

BUILD_ARTIFACT is a fixed sequence of phases, each reported as progress:

    PULLING          resolve, then every missing layer into the cache (4 at once, IMG-9)
    UNPACKING        layers applied strictly in order onto an empty root (IMG-12 to IMG-16)
    BUILDING_EXT4    sized sparse ext4, reproducible post-pass, e2fsck gate (IMG-17 to IMG-20)
    GENERATING_JSON  the normalised image config next to the image (IMG-21)

The artifact enters the store by one rename of a finished directory, and only then the
catalog (CAT-8). A rerun of the same task (WIRE-14) finds the artifact already there and
returns it, so reruns have the same end effects. Credentials are used for the registry and
dropped; they are in no result, record or log line (IMG-4).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil

from protocol import canonical
from protocol.errors import ImageDigestMismatch, InsufficientStorage, InvalidRequest

from ..catalog import ARTIFACT_KIND, Catalog
from ..config import AgentConfig
from ..storage import check_writable
from ..tasks import TaskContext
from . import ext4, imageconfig
from .cache import LayerCache
from .chains import Hit, OverlayUnavailable, TreeCache, overlay, unmount_under, upper_dirs
from .compression import open_layer
from .prefetch import Prefetch
from .model import Credentials, ImageSource, Layer, ResolvedImage
from .sources import open_source
from .store import CONFIG, ROOTFS, Store, check_artifact_id, fsync_dir
from .unpack import UnpackLimits, UnpackState, apply_layer, finish_dirs

log = logging.getLogger("image")



# --- arguments --------------------------------------------------------------------------

def _str_arg(args: dict[str, Any], name: str, *, required: bool = True, limit: int = 4096) -> str | None:
    value = args.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > limit:
        raise InvalidRequest(f"{name} must be a non-empty string of at most {limit} characters",
                             {"field": name, "reason": "type"})
    return value


def credentials_arg(args: dict[str, Any]) -> Credentials | None:
    raw = args.get("credentials")
    if raw is None:
        return None
    if (not isinstance(raw, dict) or not isinstance(raw.get("username"), str)
            or not isinstance(raw.get("password"), str)):
        raise InvalidRequest("credentials must be {username, password} strings",
                             {"field": "credentials", "reason": "type"})
    return Credentials(raw["username"], raw["password"])


# --- progress (IMG-23) ----------------------------------------------------------------

class BuildProgress:
    """Phase, bytes and layers (total, done), speed and percent; thread-safe."""

    def __init__(self, report: Callable[[dict[str, Any]], None], clock: Callable[[], float] = time.monotonic) -> None:
        self._report = report
        self._clock = clock
        self._lock = threading.Lock()
        self.phase = "PULLING"
        self.bytes_total = 0
        self.bytes_done = 0
        self.layers_total = 0
        self.layers_done = 0
        self._since = clock()
        self._since_bytes = 0
        self._marks: list[tuple[str, float]] = [("PULLING", self._since)]

    def enter(self, phase: str, *, layers_total: int | None = None, bytes_total: int | None = None) -> None:
        with self._lock:
            self._marks.append((phase, self._clock()))
            self.phase = phase
            self.layers_done = 0
            self.bytes_done = 0
            if layers_total is not None:
                self.layers_total = layers_total
            if bytes_total is not None:
                self.bytes_total = bytes_total
            self._since, self._since_bytes = self._clock(), 0
        self.emit()

    def bytes(self, done: int, total: int, layers_done: int, layers_total: int) -> None:
        with self._lock:
            self.bytes_done, self.bytes_total = done, total
            self.layers_done, self.layers_total = layers_done, layers_total
        self.emit()

    def layer_done(self) -> None:
        with self._lock:
            self.layers_done += 1
        self.emit()

    def timings(self) -> dict[str, float]:
        """Seconds spent in each phase so far (the last one up to now)."""
        with self._lock:
            marks = [*self._marks, ("", self._clock())]
        out: dict[str, float] = {}
        for (phase, start), (_, end) in zip(marks, marks[1:]):
            out[phase] = round(out.get(phase, 0.0) + end - start, 3)
        return out

    def emit(self) -> None:
        with self._lock:
            elapsed = max(self._clock() - self._since, 1e-6)
            speed = int((self.bytes_done - self._since_bytes) / elapsed)
            if self.bytes_total:
                percent = 100.0 * self.bytes_done / self.bytes_total
            elif self.layers_total:
                percent = 100.0 * self.layers_done / self.layers_total
            else:
                percent = 0.0
            body = {"phase": self.phase, "bytes_done": self.bytes_done, "bytes_total": self.bytes_total,
                    "layers_done": self.layers_done, "layers_total": self.layers_total,
                    "speed": speed, "percent": round(min(percent, 100.0), 1)}
        self._report(body)


# --- the service ----------------------------------------------------------------------

class ImageService:
    """The image handlers of one agent: a store, a layer cache and the catalog."""

    def __init__(self, cfg: AgentConfig, catalog: Catalog, store: Store | None = None) -> None:
        self.cfg = cfg
        self.catalog = catalog
        self.store = store or Store.under(cfg.agent.state_dir)
        self.cache = LayerCache(self.store.root, catalog, budget=int(cfg.image.cache_budget),
                                low_water=float(cfg.image.cache_low_water) / 100.0)
        self.trees = TreeCache(self.store.root, keep=max(0, cfg.build.tree_cache))
        self._builds = threading.BoundedSemaphore(max(1, cfg.build.max_builders))
        self._artifact_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def recover(self) -> list[str]:
        """At start, before any task runs: scratch of builds a crash interrupted goes (IMG-21),
        and so do half-written layer downloads. Returns what was removed, for the log."""
        unmount_under(self.store.work)  # a crash may have left an overlay mounted in a try
        removed = [str(p.relative_to(self.store.root)) for p in sorted(self.store.work.iterdir())]
        for path in self.store.work.iterdir():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        self.trees.probe(self.store.work)
        return removed + list(self.cache.reconcile()) + self.trees.recover()

    def handlers(self) -> dict[str, Callable[[TaskContext], dict[str, Any]]]:
        return {"RESOLVE_IMAGE": self.resolve_task, "BUILD_ARTIFACT": self.build_task}

    # --- RESOLVE_IMAGE (IMG-11) ---------------------------------------------------------

    def resolve_task(self, ctx: TaskContext) -> dict[str, Any]:
        image = _str_arg(ctx.args, "image")
        platform = _str_arg(ctx.args, "platform", required=False, limit=64)
        source = open_source(image, self.cfg.image, credentials=credentials_arg(ctx.args), platform=platform)
        try:
            resolved = source.resolve()
        finally:
            source.close()
        result = resolved.to_result()
        cached = [l.digest for l in resolved.layers if self.cache.has(l.digest)]
        result["cached_layers"] = cached
        return result

    # --- BUILD_ARTIFACT -----------------------------------------------------------------

    def build_task(self, ctx: TaskContext) -> dict[str, Any]:
        args = ctx.args
        artifact_id = check_artifact_id(args.get("artifact_id"))
        image = _str_arg(args, "image")
        platform = _str_arg(args, "platform", required=False, limit=64)
        pinned = _str_arg(args, "manifest_digest", required=False, limit=80)
        writable = args.get("writable_size", int(self.cfg.build.default_writable))
        if not isinstance(writable, int) or isinstance(writable, bool) or not (
                0 <= writable <= int(self.cfg.build.max_writable)):
            raise InvalidRequest(f"writable_size must be an integer from 0 to {int(self.cfg.build.max_writable)}",
                                 {"field": "writable_size", "reason": "range"})
        check_writable(self.cfg, "builds")  # SNAP-16, the agent's own gate
        progress = BuildProgress(ctx.progress)
        with self._artifact_lock(artifact_id), self._builds:
            ctx.check()
            return self.build(artifact_id, image, writable=writable, platform=platform, pinned=pinned,
                              credentials=credentials_arg(args), progress=progress, cancel=ctx)

    def build(self, artifact_id: str, image: str, *, writable: int, platform: str | None = None,
              pinned: str | None = None, credentials: Credentials | None = None,
              progress: BuildProgress | None = None, cancel: TaskContext | None = None) -> dict[str, Any]:
        """Build ``image`` into artifact ``artifact_id``; the catalog entry body is returned."""
        progress = progress or BuildProgress(lambda _p: None)
        stop = cancel.cancel if cancel is not None else threading.Event()
        progress.enter("PULLING")
        source = open_source(image, self.cfg.image, credentials=credentials, platform=platform)
        try:
            resolved = source.resolve()
            if pinned is not None and pinned != resolved.manifest_digest:
                raise ImageDigestMismatch(
                    f"{image} now resolves to {resolved.manifest_digest}, not the resolved {pinned}",
                    {"digest": resolved.manifest_digest, "expected": pinned})
            fingerprint = ext4.fingerprint(resolved.manifest_digest, writable)
            existing = self.catalog.get(ARTIFACT_KIND, artifact_id)
            if existing is not None and existing["body"].get("fingerprint") == fingerprint and \
                    (self.store.artifact_dir(artifact_id) / ROOTFS).exists():
                log.info("artifact %s already built (fingerprint %s)", artifact_id, fingerprint[:12])
                return self._result(artifact_id, existing["body"])
            self._check_space(resolved, writable)
            diff_ids = [l.diff_id for l in resolved.layers]
            with self.trees.longest(diff_ids) as hit:
                # Layers a cached tree already holds need no download (their diff_ids match).
                needed = list(resolved.layers[hit.layers if hit else 0:])
                with self.cache.use([l.digest for l in needed]):
                    paths = self.cache.fetch_all(
                        source, needed, concurrency=self.cfg.image.layer_concurrency,
                        progress=lambda d, t, ld, lt: progress.bytes(d, t, ld, lt), cancel=stop)
                    self._stop_if(cancel)
                    work = self.store.new_try(artifact_id)
                    try:
                        with self._root(source, resolved, hit, paths, work, progress, cancel) as (
                                root, state, fresh):
                            progress.enter("BUILDING_EXT4")
                            built = ext4.build_ext4(root, work / ROOTFS, writable=writable,
                                                    fingerprint=fingerprint, epoch=resolved.created_epoch,
                                                    cfg=self.cfg.build, cancel=stop, dir_times=state.dir_times)
                            if fresh:  # keep the tree for images built on this one (chains.py)
                                self.trees.save(diff_ids, root, state.dir_times)
                        progress.enter("GENERATING_JSON")
                        body = self._install(artifact_id, work, resolved, fingerprint, writable, built)
                    finally:
                        unmount_under(work)  # never delete through a mount left by a failure
                        self.store.end_try(work)
            self.cache.evict()
            timings = progress.timings()
            log.info("artifact %s: %s", artifact_id, ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
            return {**self._result(artifact_id, body), "timings": timings}
        finally:
            source.close()

    # --- steps ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _root(self, source: ImageSource, resolved: ResolvedImage, hit: Hit | None, paths: list[Path],
              work: Path, progress: BuildProgress,
              cancel: TaskContext | None) -> Iterator[tuple[Path, UnpackState, bool]]:
        """The tree ``mke2fs -d`` reads: (root, unpack state, whether it is a fresh full unpack)."""
        layers = list(resolved.layers)
        held = contextlib.ExitStack()
        if hit is not None and hit.layers == len(layers):
            progress.enter("UNPACKING", layers_total=0, bytes_total=0)
            log.info("all %d layers are in cached tree %s: nothing to unpack", len(layers), hit.chain_id[:19])
            yield hit.root, UnpackState(dir_times=dict(hit.dir_times)), False
            return
        if hit is not None:
            try:
                with overlay(hit.root, work) as (merged, upper):
                    log.info("layers 1-%d from cached tree %s; unpacking %d more over it", hit.layers,
                             hit.chain_id[:19], len(paths))
                    state = UnpackState(dir_times=dict(hit.dir_times))
                    self._apply(layers[hit.layers:], paths, merged, state, progress, cancel)
                    finish_dirs(merged, state, only=upper_dirs(upper))
                    yield merged, state, False
                    return
            except OverlayUnavailable as exc:
                # Rare (the start-up probe passed): fall back to the plain way, fetching the rest.
                log.warning("overlay over cached tree %s failed (%s): unpacking every layer", hit.chain_id, exc)
                held.enter_context(self.cache.use([l.digest for l in layers]))
                paths = self.cache.fetch_all(source, layers, concurrency=self.cfg.image.layer_concurrency,
                                             cancel=cancel.cancel if cancel is not None else None)
        with held:
            root = work / "root"
            root.mkdir(mode=0o755)
            os.chmod(root, 0o755)  # a header-less root is 0755 whatever the umask (IMG-20)
            state = UnpackState()
            try:
                self._apply(layers, paths, root, state, progress, cancel)
                finish_dirs(root, state)
            except BaseException:
                shutil.rmtree(root, ignore_errors=True)  # IMG-16: a failed unpack leaves nothing
                raise
            yield root, state, True

    def _apply(self, layers: list[Layer], paths: list[Path], root: Path, state: UnpackState,
               progress: BuildProgress, cancel: TaskContext | None) -> None:
        """Apply ``layers`` (their cached blobs at ``paths``) in order onto ``root``."""
        limits = UnpackLimits.from_config(self.cfg.unpack)
        progress.enter("UNPACKING", layers_total=len(paths), bytes_total=sum(l.size for l in layers))
        done = 0
        for layer, path in zip(layers, paths):
            self._stop_if(cancel)
            with open(path, "rb") as raw:
                reader = open_layer(raw, layer, max_bytes=max(0, limits.max_bytes - state.bytes))
                # Inflate and hash in a second thread; a cancel or deadline stops a big layer mid-way.
                with Prefetch(reader, check=cancel.check if cancel is not None else None) as ahead:
                    apply_layer(root, ahead, limits, state)
                reader.finish()  # the diff_id covers the whole stream (IMG-8)
            done += layer.size
            progress.bytes(done, progress.bytes_total, progress.layers_done + 1, len(paths))

    def _install(self, artifact_id: str, work: Path, resolved: ResolvedImage, fingerprint: str, writable: int,
                 built: ext4.Ext4Result) -> dict[str, Any]:
        """Move the finished files into ``artifacts/<id>/`` (one rename), then the catalog (CAT-8)."""
        config = imageconfig.normalise(resolved.config)
        config_bytes = canonical.canonical_json(config)
        (work / CONFIG).write_bytes(config_bytes)
        for name in (CONFIG, ROOTFS):
            with open(work / name, "rb") as fh:
                os.fsync(fh.fileno())
        staged = work / "artifact"
        staged.mkdir()
        os.rename(work / ROOTFS, staged / ROOTFS)
        os.rename(work / CONFIG, staged / CONFIG)
        final = self.store.artifact_dir(artifact_id)
        if final.exists():  # a stale copy from an interrupted older build of this id
            shutil.rmtree(final)
        os.rename(staged, final)
        fsync_dir(self.store.artifacts)
        body = {
            "kind": "image",
            "state": "verified",
            "fingerprint": fingerprint,
            "manifest_digest": resolved.manifest_digest,
            "config_digest": resolved.config_digest,
            "platform": str(resolved.platform),
            "writable_size": writable,
            "sha256": built.sha256,
            "size": built.size,
            "files": [
                {"name": ROOTFS, "size": built.size, "sha256": built.sha256},
                {"name": CONFIG, "size": len(config_bytes), "sha256": hashlib.sha256(config_bytes).hexdigest()},
            ],
            "config": config,
            "layers": [l.digest for l in resolved.layers],
            "build": {"fs": "ext4", "block_size": 4096, "layout": 1, "epoch": resolved.created_epoch,
                      "attempts": built.attempts},
        }
        self.catalog.put(ARTIFACT_KIND, artifact_id, body)
        log.info("artifact %s built: %s, %d MiB, sha256 %s", artifact_id, resolved.reference,
                 built.size >> 20, built.sha256[:16])
        return body

    def _check_space(self, resolved: ResolvedImage, writable: int) -> None:
        """IMG-22: free ≥ space_factor × uncached compressed layers + the writable size."""
        missing = sum(l.size for l in resolved.layers if not self.cache.has(l.digest))
        self.cache.evict(need=missing)
        need = int(self.cfg.build.space_factor) * missing + writable
        free = psutil.disk_usage(str(self.store.root)).free
        if free < need:
            raise InsufficientStorage(f"building {resolved.reference} needs {need >> 20} MiB free in the agent "
                                      f"store, {free >> 20} MiB are", {"need": need, "free": free})

    @staticmethod
    def _stop_if(cancel: TaskContext | None) -> None:
        if cancel is not None:
            cancel.check()

    def _result(self, artifact_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"artifact_id": artifact_id, **{k: body[k] for k in (
            "fingerprint", "manifest_digest", "config_digest", "platform", "writable_size", "sha256", "size",
            "files", "config", "layers")}}

    def _artifact_lock(self, artifact_id: str) -> threading.Lock:
        """Per-artifact lock: a re-sent or duplicate build of one id waits instead of racing."""
        with self._locks_guard:
            return self._artifact_locks.setdefault(artifact_id, threading.Lock())

