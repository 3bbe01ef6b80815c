"""The catalog's change journal and the delta feed (CAT-2, CAT-4, CAT-5) against a real
Catalog on a tmp SQLite file."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agent import catalog as catalog_mod
from agent.catalog import TASK_KIND, Catalog, CatalogFeed
from protocol.canonical import catalog_digest


@pytest.fixture
def cat(tmp_path: Path):
    c = Catalog.open(str(tmp_path))
    yield c
    c.close()


def apply_to(mirror: dict[tuple[str, str], dict], delta) -> None:  # type: ignore[no-untyped-def]
    for e in delta.deletes:
        mirror.pop((e["kind"], e["id"]), None)
    for e in delta.upserts:
        mirror[(e["kind"], e["id"])] = e


def digest_of(mirror: dict[tuple[str, str], dict]) -> str:
    return catalog_digest(list(mirror.values()))


def test_merged_delta_carries_last_write_and_digest_at_to_seq(cat: Catalog) -> None:
    """CAT-4: changes after the cursor merge (last write per key wins); the digest is the catalog's."""
    feed = CatalogFeed(cat)
    feed.start(cat.identity().seq)
    cat.put("artifact", "art-1", {"state": "partial"})
    cat.put("artifact", "art-1", {"state": "verified"})
    cat.put("layer", "sha256:" + "a" * 64, {"size": 3})
    cat.delete("layer", "sha256:" + "a" * 64)
    d = feed.pending()
    assert d is not None and (d.from_seq, d.to_seq) == (0, 4)
    assert d.upserts == [{"kind": "artifact", "id": "art-1", "body": {"state": "verified"}}]
    assert d.deletes == [{"kind": "layer", "id": "sha256:" + "a" * 64}]
    assert d.digest == cat.identity().digest
    mirror: dict[tuple[str, str], dict] = {}
    apply_to(mirror, d)
    assert digest_of(mirror) == d.digest
    feed.sent(d)
    assert feed.cursor == 4 and feed.pending() is None  # nothing new


def test_task_records_move_seq_with_empty_deltas(cat: Catalog) -> None:
    """CAT-2/CAT-4: task records bump seq but are not mirrored — the delta moves the seq only."""
    feed = CatalogFeed(cat)
    feed.start(0)
    cat.put(TASK_KIND, "tsk-" + "a" * 24, {"status": "running"})
    cat.put(TASK_KIND, "tsk-" + "a" * 24, {"status": "done"})
    d = feed.pending()
    assert d is not None and (d.from_seq, d.to_seq) == (0, 2) and d.upserts == [] and d.deletes == []
    assert d.digest == catalog_digest([])


def test_unchanged_writes_are_not_changes(cat: Catalog) -> None:
    """CAT-2: an upsert of the same body or a delete of nothing commits no change and no journal record."""
    cat.put("replica", "tpl-1", {"a": 1})
    feed = CatalogFeed(cat)
    feed.start(1)
    assert cat.put("replica", "tpl-1", {"a": 1}) == 1
    assert cat.delete("replica", "tpl-none") == 1
    assert feed.pending() is None


def test_a_new_process_has_lost_the_old_changes(tmp_path: Path) -> None:
    """CAT-4/CAT-5: after a restart the journal starts empty; older changes are lost (snapshot)."""
    c = Catalog.open(str(tmp_path))
    c.put("artifact", "art-1", {"x": 1})
    c.close()
    c = Catalog.open(str(tmp_path))
    try:
        feed = CatalogFeed(c)
        feed.start(0)
        assert feed.pending() is None and feed.lost
        snap = feed.snapshot()  # what the coordinator asks for next
        assert feed.cursor == snap.identity.seq == 1 and not feed.lost
        c.put("artifact", "art-2", {"x": 2})
        d = feed.pending()
        assert d is not None and (d.from_seq, d.to_seq) == (1, 2)
    finally:
        c.close()


def test_overflow_loses_changes_and_a_snapshot_restarts(cat: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    """CAT-4: the journal is bounded; past it the feed sends nothing until a snapshot."""
    monkeypatch.setattr(catalog_mod, "JOURNAL_MAX_ENTRIES", 5)
    feed = CatalogFeed(cat)
    feed.start(0)
    for i in range(6):
        cat.put("artifact", f"art-{i}", {"i": i})
    assert feed.pending() is None and feed.lost
    feed.snapshot()
    cat.put("artifact", "art-9", {"i": 9})
    d = feed.pending()
    assert d is not None and (d.from_seq, d.to_seq) == (6, 7) and len(d.upserts) == 1


def test_byte_bound_and_forget(cat: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    """CAT-4: sent changes are forgotten (the journal holds only what the mirror lacks); a big
    body alone can overflow the byte bound."""
    monkeypatch.setattr(catalog_mod, "JOURNAL_MAX_BYTES", 100)
    feed = CatalogFeed(cat)
    feed.start(0)
    cat.put("artifact", "art-1", {"x": "y" * 10})
    d = feed.pending()
    assert d is not None
    feed.sent(d)
    assert len(cat._journal) == 0
    cat.put("artifact", "art-2", {"x": "y" * 200})
    assert feed.pending() is None and feed.lost


def test_a_send_that_failed_is_sent_again_merged(cat: Catalog) -> None:
    """CAT-4: without ``sent`` the cursor stays, so the next delta covers the unsent changes too."""
    feed = CatalogFeed(cat)
    feed.start(0)
    cat.put("artifact", "art-1", {"x": 1})
    first = feed.pending()
    cat.put("artifact", "art-2", {"x": 2})
    second = feed.pending()
    assert first is not None and second is not None
    assert (second.from_seq, second.to_seq) == (0, 2) and len(second.upserts) == 2
    feed.sent(first)  # a stale acknowledgement moves the cursor only from where it is
    assert feed.cursor == 1
    feed.sent(second)
    assert feed.cursor == 1


def test_watchers_hear_every_change_from_any_thread(cat: Catalog) -> None:
    """CAT-4: the session is woken after each committed change, whichever thread made it."""
    heard: list[int] = []
    cat.watch(lambda: heard.append(1))
    threads = [threading.Thread(target=cat.put, args=("artifact", f"art-{i}", {"i": i})) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cat.put("artifact", "art-0", {"i": 0})  # unchanged: no change, no wake-up
    assert len(heard) == 8
    feed = CatalogFeed(cat)
    feed.start(0)
    d = feed.pending()
    assert d is not None and d.to_seq == 8 and len(d.upserts) == 8
