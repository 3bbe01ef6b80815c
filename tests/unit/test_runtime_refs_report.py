"""The agent's runtime-ref report (WIRE-8, WIRE-9, SNAP-19, SNAP-20): which sandbox entries hold
a ref, its shape and order, the digest, and the per-catalog-change cache. Pure logic: the
catalog is a real one in a temporary state dir."""
from __future__ import annotations

from pathlib import Path

from agent.catalog import SANDBOX_KIND, Catalog
from agent.runtime_refs import BINDING, RefsReport, refs_digest, refs_from_entries
from protocol import canonical

SNAP = "snap-" + "ab" * 12
OTHER = "snap-" + "cd" * 12


def _entry(sid: str, **body: object) -> dict[str, object]:
    return {"kind": SANDBOX_KIND, "id": sid, "body": dict(body)}


def test_refs_come_from_sandbox_entries_with_a_snapshot() -> None:
    """SNAP-19: every sandbox entry naming a snapshot (any state but destroyed) is a ref
    {snapshot_id, sandbox_id, binding, generation}, sorted by sandbox id; a sandbox booted from
    a template holds none; a missing or odd generation reads 0."""
    entries = [
        _entry("sbx-3", snapshot_id=SNAP, generation=4, state="RUNNING"),
        _entry("sbx-1", snapshot_id=OTHER, generation=None, state="FAILED"),
        _entry("sbx-2", template_id="tpl-x", state="RUNNING"),
        _entry("sbx-4", snapshot_id=SNAP, generation="x", state="EXITED"),
        _entry("sbx-5", snapshot_id=SNAP, generation=1, state="DESTROYED"),
        _entry("sbx-6", snapshot_id="", state="RUNNING"),
        {"kind": "replica", "id": "tpl-x", "body": {"snapshot_id": SNAP}},
    ]
    assert refs_from_entries(entries) == [
        {"snapshot_id": OTHER, "sandbox_id": "sbx-1", "binding": BINDING, "generation": 0},
        {"snapshot_id": SNAP, "sandbox_id": "sbx-3", "binding": BINDING, "generation": 4},
        {"snapshot_id": SNAP, "sandbox_id": "sbx-4", "binding": BINDING, "generation": 0},
    ]
    assert BINDING == "memory_backing"


def test_digest_is_canonical_and_empty_for_no_refs() -> None:
    """WIRE-8: the heartbeat's refs_digest is the canonical digest of the sorted list, "" without
    refs; it changes with the snapshot or the generation."""
    one = refs_from_entries([_entry("sbx-1", snapshot_id=SNAP, generation=1)])
    assert refs_digest([]) == ""
    assert refs_digest(one) == canonical.digest(one) and len(refs_digest(one)) == 64
    assert refs_digest(one) != refs_digest(refs_from_entries([_entry("sbx-1", snapshot_id=SNAP, generation=2)]))
    assert refs_digest(one) != refs_digest(refs_from_entries([_entry("sbx-1", snapshot_id=OTHER, generation=1)]))


def test_report_follows_the_catalog(tmp_path: Path) -> None:
    """WIRE-9: the report is re-read when the catalog changed, and only then; destroy (the entry
    deleted) empties it again."""
    cat = Catalog.open(str(tmp_path))
    try:
        report = RefsReport(cat)
        assert report.current() == ([], "")
        cat.put(SANDBOX_KIND, "sbx-1", {"template_id": "tpl-x", "state": "RUNNING"})
        assert report.current() == ([], "")
        cat.put(SANDBOX_KIND, "sbx-1", {"template_id": "tpl-x", "state": "RUNNING", "snapshot_id": SNAP,
                                        "generation": 2})
        refs, digest = report.current()
        assert refs == [{"snapshot_id": SNAP, "sandbox_id": "sbx-1", "binding": BINDING, "generation": 2}]
        assert digest == canonical.digest(refs)
        assert report.current()[0] is refs  # unchanged catalog: the cached report
        cat.delete(SANDBOX_KIND, "sbx-1")
        assert report.current() == ([], "")
    finally:
        cat.close()
