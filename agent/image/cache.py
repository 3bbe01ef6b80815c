"""The content-addressed layer cache (SPEC IMG-9, IMG-10, CAT-7, CAT-8).

Layout, all on one filesystem under the agent store::

    store_dir/layers/sha256/<hex>   one verified compressed blob per layer digest
    store_dir/layers/tmp/           downloads in progress (removed by ``reconcile``)

Each cached layer has one catalog entry, kind ``"layer"``, id = the digest, body
``{"size", "media_type", "last_used"}`` (``last_used`` in integer Unix seconds).

Crash-safe order (CAT-8): a blob is written to a temp file by the source's ``fetch_blob``
(which verifies size and sha256), fsynced, renamed into place, the directory fsynced, and
only then is the entry committed. Removal marks the entry ``"removing": true``, deletes the
file, then deletes the entry. Eviction batches this: one catalog change marks every victim
of an eviction pass, one deletes them all, so a pass is two catalog changes (two deltas at
most), whatever the number of layers.

Choices documented here:

* ``low_water`` accepts a fraction (0 < x <= 1) or a percent (1 < x <= 100): 0.9 and 90 both
  mean 90 %. ``1`` means 100 %.
* ``last_used`` is bumped on a cache hit only when the stored value is at least
  :data:`TOUCH_INTERVAL` (60 s) old, so a busy builder does not churn the catalog (each
  change is a delta to the coordinator); LRU needs no finer resolution.
* The budget is a cache *target*, not a hard cap (IMG-10 only evicts): when everything
  evictable is gone and a pull still does not fit, the pull proceeds over budget; the next
  eviction pass brings the cache back down once those layers are no longer in use. Free
  disk space is checked by the builder (IMG-22), not here.
* A blob file without an entry (a crash between rename and commit) is not adopted: it is
  simply overwritten by the next fetch of that digest. An entry whose file is missing or has
  the wrong size counts as absent and is refetched.
* In-use protection: :meth:`LayerCache.use` holds digests (refcounted). A pull holds the
  layers it needs from before the download until its unpack ends; ``ensure``/``fetch_all``
  also hold their layers while writing. Eviction never removes a held layer. A layer must
  be held *before* ``ensure`` for the hold to protect it from a concurrent eviction pass;
  a layer evicted between a hold and ``ensure`` is simply fetched again.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.errors import ImageDigestMismatch, JobCancelled

from ..catalog import LAYER_KIND
from .model import Descriptor, ImageSource, Layer, check_digest
from .store import fsync_dir

if TYPE_CHECKING:
    from agent.catalog import Catalog

__all__ = ["KIND", "TOUCH_INTERVAL", "LayerCache", "Progress"]

KIND = LAYER_KIND
TOUCH_INTERVAL = 60
# (bytes_done, bytes_total, layers_done, layers_total)
Progress = Callable[[int, int, int, int], None]


class _Cancelled(Exception):
    """Raised inside a worker's progress callback to abort its download."""


class LayerCache:
    def __init__(self, store_dir: Path, catalog: Catalog, *, budget: int, low_water: float,
                 clock: Callable[[], float] = time.time) -> None:
        if budget < 0:
            raise ValueError("budget must not be negative")
        lw = float(low_water)
        if lw > 1:
            lw /= 100.0
        if not 0 < lw <= 1:
            raise ValueError(f"low_water {low_water!r} must be a fraction in (0, 1] or a percent in (1, 100]")
        self.store_dir = Path(store_dir)
        self.catalog = catalog
        self.budget = int(budget)
        self.low_water = lw
        self.clock = clock
        self.blob_dir = self.store_dir / "layers" / "sha256"
        self.tmp_dir = self.store_dir / "layers" / "tmp"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()               # guards _held and _digest_locks
        self._held: Counter[str] = Counter()
        self._digest_locks: dict[str, list] = {}    # digest -> [lock, users]
        self._evict_lock = threading.Lock()         # one eviction pass at a time

    # --- paths and queries ----------------------------------------------------------

    def path(self, digest: str) -> Path:
        """Where the blob of ``digest`` lives; the name comes only from a validated digest."""
        return self.blob_dir / check_digest(digest)[len("sha256:"):]

    def has(self, digest: str) -> bool:
        entry = self.catalog.get(KIND, check_digest(digest))
        return entry is not None and self._present(entry)

    def usage(self) -> int:
        """Bytes of cached layers: the sum of the catalog sizes."""
        return sum(int(e["body"].get("size", 0)) for e in self.catalog.entries(KIND))

    def in_use(self) -> set[str]:
        with self._lock:
            return {d for d, n in self._held.items() if n > 0}

    # --- in-use protection ------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, digests: Iterable[str]) -> Iterator[None]:
        """Hold ``digests`` (refcounted) so eviction leaves them alone until the block ends."""
        ds = [check_digest(d) for d in digests]
        with self._lock:
            self._held.update(ds)
        try:
            yield
        finally:
            with self._lock:
                self._held.subtract(ds)
                for d in ds:
                    if self._held[d] <= 0:
                        del self._held[d]

    @contextlib.contextmanager
    def _digest_lock(self, digest: str, blocking: bool = True) -> Iterator[bool]:
        with self._lock:
            slot = self._digest_locks.setdefault(digest, [threading.Lock(), 0])
            slot[1] += 1
        got = slot[0].acquire(blocking)
        try:
            yield got
        finally:
            if got:
                slot[0].release()
            with self._lock:
                slot[1] -= 1
                if slot[1] == 0:
                    del self._digest_locks[digest]

    # --- fetching (IMG-9) -------------------------------------------------------------

    def ensure(self, source: ImageSource, layer: Layer, progress: Callable[[int], None] | None = None) -> Path:
        """The cached blob of ``layer``, downloading it if needed. Concurrent calls for one
        digest download it once: the others wait, then find it present."""
        digest = check_digest(layer.digest)
        with self.use([digest]):
            if self.has(digest):
                return self._hit(digest)
            self.evict(need=layer.size)
            path, fetched = self._ensure(source, layer.descriptor, progress)
            if fetched:
                self.evict()
            return path

    def fetch_all(self, source: ImageSource, layers: Sequence[Layer], *, concurrency: int = 4,
                  progress: Progress | None = None, cancel: threading.Event | None = None) -> list[Path]:
        """Ensure every layer, ``concurrency`` downloads at once; paths in layer order.

        The first failure stops the rest (running downloads are aborted through their
        progress callback, queued ones never start) and is raised once every worker has
        ended. ``cancel`` set by the caller does the same and raises JobCancelled.
        ``progress`` gets aggregate ``(bytes_done, bytes_total, layers_done, layers_total)``
        over the distinct layers, already-cached ones counting as done; it is called from
        worker threads, serialised by a lock.
        """
        digests = [check_digest(l.digest) for l in layers]
        unique: dict[str, Layer] = {}
        for l in layers:
            unique.setdefault(l.digest, l)
        stop = threading.Event()
        plock = threading.Lock()
        done_bytes: dict[str, int] = {}
        state = {"layers": 0}
        bytes_total = sum(l.size for l in unique.values())

        def report() -> None:
            if progress is not None:
                progress(sum(done_bytes.values()), bytes_total, state["layers"], len(unique))

        def stopped() -> bool:
            return stop.is_set() or (cancel is not None and cancel.is_set())

        with self.use(unique):
            missing = [l for d, l in unique.items() if not self.has(d)]
            with plock:
                for d, l in unique.items():
                    if l not in missing:
                        done_bytes[d] = l.size
                        state["layers"] += 1
                report()
            for d, l in unique.items():
                if l not in missing:
                    self._hit(d)
            if missing:
                self.evict(need=sum(l.size for l in missing))

            def work(l: Layer) -> None:
                if stopped():
                    raise _Cancelled()

                def blob_progress(n: int) -> None:
                    if stopped():
                        raise _Cancelled()
                    with plock:
                        done_bytes[l.digest] = min(n, l.size)
                        report()

                try:
                    self._ensure(source, l.descriptor, blob_progress)
                except BaseException:
                    stop.set()  # before this worker can pick up a queued layer
                    raise
                with plock:
                    done_bytes[l.digest] = l.size
                    state["layers"] += 1
                    report()

            error: BaseException | None = None
            if missing:
                with ThreadPoolExecutor(max_workers=max(1, concurrency),
                                        thread_name_prefix="layer-fetch") as pool:
                    futures = [pool.submit(work, l) for l in missing]
                    done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                    for f in futures:  # first failure in completion order
                        if f in done and f.exception() is not None and not isinstance(f.exception(), _Cancelled):
                            error = f.exception()
                            break
                    stop.set()
                    for f in futures:
                        f.cancel()
                # the pool has joined: no worker writes after this point
                if error is None:
                    errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
                    real = [e for e in errors if not isinstance(e, _Cancelled)]
                    if real:
                        error = real[0]
                    elif errors or any(f.cancelled() for f in futures):
                        error = JobCancelled("layer download cancelled")
                self.evict()
            if error is not None:
                raise error
            if cancel is not None and cancel.is_set():
                raise JobCancelled("layer download cancelled")
            return [self.path(d) for d in digests]

    def _hit(self, digest: str) -> Path:
        """Bump ``last_used`` (at most once per TOUCH_INTERVAL) and return the path."""
        entry = self.catalog.get(KIND, digest)
        now = int(self.clock())
        if entry is not None and not entry["body"].get("removing") \
                and now - int(entry["body"].get("last_used", 0)) >= TOUCH_INTERVAL:
            self.catalog.put(KIND, digest, {**entry["body"], "last_used": now})
        return self.path(digest)

    def _ensure(self, source: ImageSource, desc: Descriptor,
                progress: Callable[[int], None] | None) -> tuple[Path, bool]:
        """Fetch under the digest lock unless present; the caller holds the digest."""
        digest = check_digest(desc.digest)
        final = self.path(digest)
        with self._digest_lock(digest):
            if self.has(digest):
                return self._hit(digest), False
            fd, tmp = tempfile.mkstemp(prefix=digest[7:23] + ".", dir=self.tmp_dir)
            try:
                with os.fdopen(fd, "w+b") as out:
                    source.fetch_blob(desc, out, progress)
                    out.flush()
                    size = out.tell()
                    os.fsync(out.fileno())
                if size != desc.size:  # fetch_blob verifies; a cheap guard against a broken source
                    raise ImageDigestMismatch(f"blob {digest} is {size} bytes, expected {desc.size}",
                                              {"digest": digest, "expected": desc.size, "actual": size})
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            fsync_dir(self.blob_dir)
            try:
                self.catalog.put(KIND, digest, {"size": size, "media_type": desc.media_type,
                                                "last_used": int(self.clock())})
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(final)  # no entry: do not leave an orphan behind
                raise
            return final, True

    # --- eviction (IMG-10, CAT-7, CAT-8) -----------------------------------------------

    def evict(self, need: int = 0) -> list[str]:
        """If ``usage() + need`` exceeds the budget, remove least recently used layers (by
        ``last_used``, then digest) that are not in use until ``usage() + need <= budget *
        low_water`` or nothing evictable is left. Returns the evicted digests in order.
        Entries left ``removing`` by a crash are finished first (they are not in the LRU
        order's way: they count as used until gone)."""
        with self._evict_lock:
            entries = self.catalog.entries(KIND)
            used = sum(int(e["body"].get("size", 0)) for e in entries)
            stale = [e for e in entries if e["body"].get("removing")]
            if used + need <= self.budget and not stale:
                return []
            target = self.budget * self.low_water
            evicted: list[str] = []
            with contextlib.ExitStack() as stack:
                victims: list[dict] = []
                for e in stale:
                    if self._claim(stack, e["id"]):
                        victims.append(e)
                        used -= int(e["body"].get("size", 0))
                if used + need > self.budget:
                    live = sorted((e for e in entries if not e["body"].get("removing")),
                                  key=lambda e: (int(e["body"].get("last_used", 0)), e["id"]))
                    for e in live:
                        if used + need <= target:
                            break
                        if self._claim(stack, e["id"]):
                            victims.append(e)
                            evicted.append(e["id"])
                            used -= int(e["body"].get("size", 0))
                if not victims:
                    return []
                marks = [{"kind": KIND, "id": e["id"], "body": {**e["body"], "removing": True}}
                         for e in victims if not e["body"].get("removing")]
                if marks:
                    self.catalog.apply(upserts=marks)
                for e in victims:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path(e["id"]))
                fsync_dir(self.blob_dir)
                self.catalog.apply(deletes=[(KIND, e["id"]) for e in victims])
            return evicted

    def _claim(self, stack: contextlib.ExitStack, digest: str) -> bool:
        """Take ``digest``'s lock without waiting (no deadlock with a fetch) if it is not held."""
        with self._lock:
            if self._held.get(digest, 0) > 0:
                return False
        if not stack.enter_context(self._digest_lock(digest, blocking=False)):
            return False
        with self._lock:  # a hold taken meanwhile wins; its ensure waits for our lock, then refetches
            return self._held.get(digest, 0) == 0

    # --- startup ----------------------------------------------------------------------

    def reconcile(self) -> list[str]:
        """Remove temp files left by a crash; returns their names. Entries with missing files
        and unlisted blobs are the catalog reconcile's business (CAT-3)."""
        removed = []
        for p in sorted(self.tmp_dir.iterdir()):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                p.unlink()
                removed.append(p.name)
        return removed

    # --- internals ----------------------------------------------------------------------

    def _present(self, entry: dict) -> bool:
        body = entry["body"]
        if body.get("removing"):
            return False
        try:
            return self.path(entry["id"]).stat().st_size == int(body.get("size", -1))
        except FileNotFoundError:
            return False
