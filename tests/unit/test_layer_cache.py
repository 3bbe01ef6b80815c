"""The content-addressed layer cache (SPEC IMG-9, IMG-10, CAT-7, CAT-8).

Pure-logic unit tests: the image source is an in-test fake serving blobs from a dict and
counting fetches; the catalog is the real SQLite one.
"""
from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import pytest

from agent.catalog import Catalog
from agent.image.cache import KIND, LayerCache
from agent.image.model import OCI_LAYER_GZIP, Descriptor, Layer
from protocol.errors import ImageDigestMismatch, ImageInvalid, JobCancelled

WAIT = 10.0  # generous bound on event waits; never a fixed sleep


def blob(n: int, tag: str) -> bytes:
    return (tag.encode() * (n // len(tag) + 1))[:n]


def make_layer(data: bytes) -> Layer:
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    return Layer(Descriptor(OCI_LAYER_GZIP, d, len(data)), "gzip", "sha256:" + "0" * 64)


class FakeSource:
    """Serves blobs from a dict; optional per-digest gates and failures."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.fetches: Counter[str] = Counter()
        self.started: dict[str, threading.Event] = {}
        self.gates: dict[str, threading.Event] = {}
        self.fail: dict[str, Exception] = {}
        self.partial_then_fail: set[str] = set()
        self.lock = threading.Lock()

    def fetch_blob(self, desc: Descriptor, out: BinaryIO, progress: Callable[[int], None] | None = None) -> None:
        with self.lock:
            self.fetches[desc.digest] += 1
        if desc.digest in self.started:
            self.started[desc.digest].set()
        if desc.digest in self.gates:
            assert self.gates[desc.digest].wait(WAIT)
        data = self.blobs[desc.digest]
        half = len(data) // 2
        out.write(data[:half])
        if progress:
            progress(half)
        if desc.digest in self.fail:
            raise self.fail[desc.digest]
        out.write(data[half:])
        if progress:
            progress(len(data))

    def resolve(self):  # pragma: no cover - not used
        raise NotImplementedError

    def close(self) -> None:
        pass


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    (tmp_path / "state").mkdir()
    cat = Catalog.open(str(tmp_path / "state"))
    yield cat
    cat.close()


def new_cache(tmp_path: Path, catalog: Catalog, budget: int = 1 << 30, low_water: float = 90,
              clock: Clock | None = None) -> LayerCache:
    return LayerCache(tmp_path / "store", catalog, budget=budget, low_water=low_water, clock=clock or Clock())


def setup(n: int, size: int = 1000) -> tuple[list[Layer], FakeSource]:
    datas = [blob(size, f"layer{i}-") for i in range(n)]
    layers = [make_layer(d) for d in datas]
    return layers, FakeSource({l.digest: d for l, d in zip(layers, datas)})


def test_ensure_stores_blob_and_entry_and_does_not_refetch(tmp_path: Path, catalog: Catalog) -> None:
    """IMG-9: one file per digest under layers/sha256, one catalog entry (size, media type, last used)."""
    clock = Clock()
    cache = new_cache(tmp_path, catalog, clock=clock)
    (lay,), src = setup(1)
    path = cache.ensure(src, lay)
    assert path == tmp_path / "store/layers/sha256" / lay.digest[7:]
    assert path.read_bytes() == src.blobs[lay.digest]
    entry = catalog.get(KIND, lay.digest)
    assert entry["body"] == {"size": 1000, "media_type": OCI_LAYER_GZIP, "last_used": int(clock.t)}
    seq = catalog.identity().seq
    assert cache.ensure(src, lay) == path
    assert src.fetches[lay.digest] == 1
    assert catalog.identity().seq == seq  # a hit within 60 s does not touch the catalog
    clock.t += 61
    cache.ensure(src, lay)
    assert catalog.get(KIND, lay.digest)["body"]["last_used"] == int(clock.t)
    assert src.fetches[lay.digest] == 1
    assert cache.has(lay.digest) and cache.usage() == 1000
    assert list((tmp_path / "store/layers/tmp").iterdir()) == []


def test_entry_with_missing_file_is_refetched(tmp_path: Path, catalog: Catalog) -> None:
    cache = new_cache(tmp_path, catalog)
    (lay,), src = setup(1)
    cache.ensure(src, lay).unlink()
    assert not cache.has(lay.digest)
    cache.ensure(src, lay)
    assert src.fetches[lay.digest] == 2


def test_concurrent_ensure_downloads_once(tmp_path: Path, catalog: Catalog) -> None:
    """IMG-9: two builds needing the same layer download it once; the second waits and sees it present."""
    cache = new_cache(tmp_path, catalog)
    (lay,), src = setup(1)
    src.started[lay.digest] = threading.Event()
    src.gates[lay.digest] = threading.Event()
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(cache.ensure, src, lay) for _ in range(3)]
        assert src.started[lay.digest].wait(WAIT)
        src.gates[lay.digest].set()
        results = [f.result(WAIT) for f in futures]
    assert len(set(results)) == 1
    assert src.fetches[lay.digest] == 1


def test_fetch_all_order_progress_and_duplicates(tmp_path: Path, catalog: Catalog) -> None:
    """IMG-9: layers fetched concurrently, paths returned in layer order; aggregate progress."""
    cache = new_cache(tmp_path, catalog)
    layers, src = setup(5)
    cache.ensure(src, layers[2])  # already cached: counts as done at once
    calls: list[tuple[int, int, int, int]] = []
    order = layers + [layers[0]]  # a repeated layer is fetched once
    paths = cache.fetch_all(src, order, concurrency=3, progress=lambda *a: calls.append(a))
    assert paths == [cache.path(l.digest) for l in order]
    assert all(p.read_bytes() == src.blobs[l.digest] for p, l in zip(paths, order))
    assert all(src.fetches[l.digest] == 1 for l in layers)
    assert calls[0] == (1000, 5000, 1, 5)
    assert calls[-1] == (5000, 5000, 5, 5)
    assert all(0 <= c[0] <= 5000 and c[1] == 5000 and c[3] == 5 for c in calls)
    assert [c[2] for c in calls] == sorted(c[2] for c in calls)


def test_fetch_all_concurrency_limit(tmp_path: Path, catalog: Catalog) -> None:
    """IMG-9: at most `concurrency` downloads run at once (4 by default)."""
    cache = new_cache(tmp_path, catalog)
    layers, src = setup(6)
    active = [0]
    peak = [0]
    lock = threading.Lock()
    four = threading.Barrier(4, timeout=WAIT)
    inner = src.fetch_blob

    def fetch(desc, out, progress=None):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            if desc.digest in {l.digest for l in layers[:4]}:
                four.wait()  # the first four really run together
            inner(desc, out, progress)
        finally:
            with lock:
                active[0] -= 1

    src.fetch_blob = fetch
    cache.fetch_all(src, layers)
    assert peak[0] == 4


def test_fetch_all_first_failure_cancels_the_rest(tmp_path: Path, catalog: Catalog) -> None:
    """IMG-9/CAT-8: a failing download raises; nothing of it stays in the store or the catalog."""
    cache = new_cache(tmp_path, catalog)
    layers, src = setup(4)
    src.fail[layers[1].digest] = ImageDigestMismatch("bad blob", {"digest": layers[1].digest})
    src.gates[layers[0].digest] = threading.Event()  # layer 0 blocks until the failure is in
    src.started[layers[0].digest] = threading.Event()
    seen: list[tuple] = []

    def progress(*a):
        seen.append(a)
        if src.fetches[layers[1].digest]:
            src.gates[layers[0].digest].set()

    with pytest.raises(ImageDigestMismatch):
        cache.fetch_all(src, layers, concurrency=2, progress=progress)
    assert catalog.get(KIND, layers[1].digest) is None
    assert not cache.path(layers[1].digest).exists()
    assert list((tmp_path / "store/layers/tmp").iterdir()) == []
    # the queued layers never started; the running one finished or was aborted, cleanly
    assert src.fetches[layers[2].digest] + src.fetches[layers[3].digest] == 0
    for lay in layers:
        present = catalog.get(KIND, lay.digest) is not None
        assert present == cache.path(lay.digest).exists()


def test_fetch_all_honours_cancel(tmp_path: Path, catalog: Catalog) -> None:
    cache = new_cache(tmp_path, catalog)
    layers, src = setup(3)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(JobCancelled):
        cache.fetch_all(src, layers, cancel=cancel)
    assert sum(src.fetches.values()) == 0
    assert catalog.entries(KIND) == []


def test_failed_fetch_leaves_no_file_and_no_entry(tmp_path: Path, catalog: Catalog) -> None:
    """CAT-8: the file enters the store (temp, fsync, rename) before the entry; a failure leaves neither."""
    cache = new_cache(tmp_path, catalog)
    (lay,), src = setup(1)
    src.fail[lay.digest] = OSError("connection reset")
    with pytest.raises(OSError):
        cache.ensure(src, lay)
    assert catalog.entries(KIND) == []
    assert list((tmp_path / "store/layers/sha256").iterdir()) == []
    assert list((tmp_path / "store/layers/tmp").iterdir()) == []
    assert catalog.identity().seq == 0


def test_entry_committed_only_after_file_in_place(tmp_path: Path, catalog: Catalog) -> None:
    """CAT-8: when the entry is committed the blob is already at its final path."""
    cache = new_cache(tmp_path, catalog)
    (lay,), src = setup(1)
    seen = []
    real_put = catalog.put

    def put(kind, id_, body):
        seen.append(cache.path(id_).exists())
        return real_put(kind, id_, body)

    catalog.put = put  # type: ignore[method-assign]
    cache.ensure(src, lay)
    assert seen == [True]


@pytest.mark.parametrize("bad", ["sha256:../../x", "sha256:" + "A" * 64, "sha512:" + "a" * 128,
                                 "sha256:" + "a" * 63 + "/", "../" + "a" * 64])
def test_path_tricks_rejected(tmp_path: Path, catalog: Catalog, bad: str) -> None:
    """IMG-9: blob paths are built only from validated sha256 digests."""
    cache = new_cache(tmp_path, catalog)
    lay = Layer(Descriptor(OCI_LAYER_GZIP, bad, 3), "gzip", "sha256:" + "0" * 64)
    src = FakeSource({bad: b"abc"})
    with pytest.raises(ImageInvalid):
        cache.ensure(src, lay)
    with pytest.raises(ImageInvalid):
        cache.path(bad)
    with pytest.raises(ImageInvalid):
        cache.fetch_all(src, [lay])
    assert src.fetches[bad] == 0
    assert not (tmp_path / "x").exists()


def fill(cache: LayerCache, clock: Clock, layers: list[Layer], src: FakeSource) -> None:
    for lay in layers:  # distinct last_used, oldest first
        cache.ensure(src, lay)
        clock.t += 100


def test_eviction_lru_to_low_water(tmp_path: Path, catalog: Catalog) -> None:
    """IMG-10: over budget, LRU layers are evicted until usage + need <= 90 % of the budget."""
    clock = Clock()
    cache = new_cache(tmp_path, catalog, budget=10_000, low_water=90, clock=clock)
    layers, src = setup(10)
    fill(cache, clock, layers, src)
    assert cache.usage() == 10_000
    assert cache.evict() == []  # at the budget is not over it
    cache.ensure(src, layers[0])  # a hit refreshes layer 0 (older than 60 s)
    evicted = cache.evict(need=1500)
    # 10000 + 1500 > 10000: evict until <= 9000 - 1500 -> 3 layers, oldest first, skipping layer 0
    assert evicted == [l.digest for l in layers[1:4]]
    assert cache.usage() == 7000
    for lay in layers[1:4]:
        assert catalog.get(KIND, lay.digest) is None
        assert not cache.path(lay.digest).exists()
    assert cache.has(layers[0].digest)


def test_eviction_ties_break_by_digest(tmp_path: Path, catalog: Catalog) -> None:
    clock = Clock()
    cache = new_cache(tmp_path, catalog, budget=3000, low_water=0.5, clock=clock)
    layers, src = setup(4)
    for lay in layers:
        cache.ensure(src, lay)  # same last_used; the fourth evicts afterwards
    remaining = sorted(e["id"] for e in catalog.entries(KIND))
    assert len(remaining) == 1
    assert layers[3].digest in remaining  # the one just fetched was in use


def test_eviction_never_removes_layers_in_use(tmp_path: Path, catalog: Catalog) -> None:
    """IMG-10: a layer held by a pull or unpack is never evicted, even when that leaves the cache over budget."""
    clock = Clock()
    cache = new_cache(tmp_path, catalog, budget=5000, low_water=0.9, clock=clock)
    layers, src = setup(5)
    fill(cache, clock, layers, src)
    with cache.use([l.digest for l in layers[:3]]):
        cache.budget = 2000
        evicted = cache.evict()
        assert evicted == [layers[3].digest, layers[4].digest]
        assert cache.usage() == 3000  # over budget: the budget is a target, not a cap
    assert cache.evict() == [layers[0].digest, layers[1].digest]


def test_pull_over_budget_proceeds_and_evicts_before_and_after(tmp_path: Path, catalog: Catalog) -> None:
    """IMG-10: eviction runs before a pull that needs room and after it; the pull's own layers are safe."""
    clock = Clock()
    cache = new_cache(tmp_path, catalog, budget=4000, low_water=0.75, clock=clock)
    old, src = setup(3)
    fill(cache, clock, old, src)
    new = [make_layer(blob(1000, f"new{i}-")) for i in range(3)]
    src.blobs.update({l.digest: blob(1000, f"new{i}-") for i, l in enumerate(new)})
    cache.fetch_all(src, new)
    # before: 3000 + 3000 > 4000 -> evict until <= 3000 - 3000: all three old layers go
    assert {e["id"] for e in catalog.entries(KIND)} == {l.digest for l in new}
    assert cache.usage() == 3000
    # a pull bigger than the budget still proceeds
    big = [make_layer(blob(3000, f"big{i}-")) for i in range(2)]
    src.blobs.update({l.digest: blob(3000, f"big{i}-") for i, l in enumerate(big)})
    paths = cache.fetch_all(src, big)
    assert all(p.exists() for p in paths)
    assert {e["id"] for e in catalog.entries(KIND)} == {l.digest for l in big}
    assert cache.usage() == 6000  # over budget while the pull held its layers
    # once the pull has ended, the next pass brings the cache down to the low water (3000)
    assert cache.evict() == [min(l.digest for l in big)]  # equal last_used: by digest
    assert cache.usage() == 3000


def test_removal_marks_entry_then_deletes_file_then_entry(tmp_path: Path, catalog: Catalog) -> None:
    """CAT-8: removal marks the entry `removing`, deletes the file, then the entry."""
    clock = Clock()
    cache = new_cache(tmp_path, catalog, budget=2000, low_water=0.9, clock=clock)
    layers, src = setup(2)
    fill(cache, clock, layers, src)
    steps = []
    real_apply = catalog.apply

    def apply(upserts=(), deletes=()):
        upserts, deletes = list(upserts), list(deletes)
        for e in upserts:
            steps.append(("mark", e["id"], e["body"].get("removing"), cache.path(e["id"]).exists()))
        for _, id_ in deletes:
            steps.append(("delete", id_, None, cache.path(id_).exists()))
        return real_apply(upserts, deletes)

    catalog.apply = apply  # type: ignore[method-assign]
    cache.budget = 1500  # 2000 > 1500: evict down to 1350 -> one layer
    assert cache.evict() == [layers[0].digest]
    assert steps == [("mark", layers[0].digest, True, True), ("delete", layers[0].digest, None, False)]


def test_stale_removing_entry_is_finished(tmp_path: Path, catalog: Catalog) -> None:
    """CAT-8: an entry left `removing` by a crash is removed by the next eviction pass, and is not a hit."""
    cache = new_cache(tmp_path, catalog)
    (lay,), src = setup(1)
    cache.ensure(src, lay)
    body = catalog.get(KIND, lay.digest)["body"]
    catalog.put(KIND, lay.digest, {**body, "removing": True})
    assert not cache.has(lay.digest)
    cache.evict()
    assert catalog.get(KIND, lay.digest) is None and not cache.path(lay.digest).exists()


def test_reconcile_removes_temp_files(tmp_path: Path, catalog: Catalog) -> None:
    cache = new_cache(tmp_path, catalog)
    (tmp_path / "store/layers/tmp/abc.partial").write_bytes(b"x")
    assert cache.reconcile() == ["abc.partial"]
    assert list((tmp_path / "store/layers/tmp").iterdir()) == []


def test_low_water_fraction_or_percent(tmp_path: Path, catalog: Catalog) -> None:
    assert new_cache(tmp_path, catalog, low_water=90).low_water == pytest.approx(0.9)
    assert new_cache(tmp_path, catalog, low_water=0.9).low_water == pytest.approx(0.9)
    with pytest.raises(ValueError):
        new_cache(tmp_path, catalog, low_water=0)
