"""The startup reconcile (CAT-3, CAT-8, WIRE-17) on a real Catalog and real files in a tmp
state dir."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent.catalog import Catalog
from agent.reconcile import startup_reconcile

ART = "art-" + "1" * 24
ART2 = "art-" + "2" * 24
HEX = "ab" * 32


@pytest.fixture
def state(tmp_path: Path) -> Path:
    for d in ("store/artifacts", "store/layers/sha256", "store/layers/tmp", "store/work", "store/chains/x"):
        (tmp_path / d).mkdir(parents=True)
    return tmp_path


def artifact(state: Path, cat: Catalog, aid: str, files: dict[str, bytes], **body: object) -> None:
    d = state / "store" / "artifacts" / aid
    d.mkdir()
    for name, data in files.items():
        (d / name).write_bytes(data)
    cat.put("artifact", aid, {"state": "verified", "files": [
        {"name": n, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in files.items()], **body})


def test_consistent_store_changes_nothing(state: Path) -> None:
    """CAT-3: entries whose files are there with their sizes stay; nothing moves; seq unchanged."""
    cat = Catalog.open(str(state))
    artifact(state, cat, ART, {"rootfs.ext4": b"x" * 10, "config.json": b"{}"})
    (state / "store/layers/sha256" / HEX).write_bytes(b"abc")
    cat.put("layer", "sha256:" + HEX, {"size": 3})
    (state / "store/work/leftover").write_bytes(b"w")  # the image service's business
    before = cat.identity()
    report = startup_reconcile(cat, state)
    assert report.to_wire() == {"missing": [], "orphans": []}
    assert cat.identity() == before
    assert not (state / "quarantine").exists() and (state / "store/work/leftover").exists()


def test_missing_and_wrong_size_entries_are_removed_and_reported(state: Path) -> None:
    """CAT-3: a deleted file or a wrong size removes the entry (listed in missing); the files
    left of that artifact become orphans in quarantine — nothing is deleted."""
    cat = Catalog.open(str(state))
    artifact(state, cat, ART, {"rootfs.ext4": b"x" * 10, "config.json": b"{}"})
    artifact(state, cat, ART2, {"rootfs.ext4": b"y" * 10})
    (state / "store/artifacts" / ART / "rootfs.ext4").unlink()
    (state / "store/artifacts" / ART2 / "rootfs.ext4").write_bytes(b"short")
    cat.put("layer", "sha256:" + HEX, {"size": 3})  # no blob at all
    report = startup_reconcile(cat, state, now_ms=5)
    assert sorted((e["kind"], e["id"]) for e in report.missing) == [
        ("artifact", ART), ("artifact", ART2), ("layer", "sha256:" + HEX)]
    assert report.orphans == [f"store/artifacts/{ART}", f"store/artifacts/{ART2}"]
    assert (state / "quarantine/store/artifacts" / ART / "config.json").read_bytes() == b"{}"
    assert (state / "quarantine/store/artifacts" / ART2 / "rootfs.ext4").read_bytes() == b"short"
    assert [e["kind"] for e in cat.entries()] == ["orphan", "orphan"]
    assert cat.get("orphan", f"store/artifacts/{ART2}")["body"] == {
        "path": f"quarantine/store/artifacts/{ART2}", "original": f"store/artifacts/{ART2}", "size": 5,
        "found_ms": 5}


def test_strays_are_quarantined_with_their_relative_path(state: Path) -> None:
    """CAT-3: unknown files in store/artifacts and store/layers/sha256, and a file an artifact
    does not list, move to quarantine/<same path> as orphan entries with the same bytes."""
    cat = Catalog.open(str(state))
    artifact(state, cat, ART, {"rootfs.ext4": b"x"})
    (state / "store/artifacts/stray.bin").write_bytes(b"stray")
    (state / "store/artifacts" / ART / "extra").write_bytes(b"e")
    (state / "store/layers/sha256" / HEX).write_bytes(b"blob")
    (state / "quarantine/store/artifacts").mkdir(parents=True)
    (state / "quarantine/store/artifacts/stray.bin").write_bytes(b"older")  # an earlier stray of that name
    report = startup_reconcile(cat, state)
    assert report.missing == []
    assert report.orphans == [f"store/artifacts/{ART}/extra", "store/artifacts/stray.bin",
                              f"store/layers/sha256/{HEX}"]
    assert (state / "quarantine/store/artifacts/stray.bin.1").read_bytes() == b"stray"
    assert (state / "quarantine/store/artifacts/stray.bin").read_bytes() == b"older"
    assert (state / "quarantine/store/layers/sha256" / HEX).read_bytes() == b"blob"
    assert not (state / "store/artifacts/stray.bin").exists()
    assert (state / "store/artifacts" / ART / "rootfs.ext4").exists()
    ids = [e["id"] for e in cat.entries("orphan")]
    assert ids == [f"store/artifacts/{ART}/extra", "store/artifacts/stray.bin.1", f"store/layers/sha256/{HEX}"]
    # A second start finds nothing new, and keeps the orphan entries while their files are there.
    again = startup_reconcile(cat, state)
    assert again.missing == [] and again.orphans == []
    (state / "quarantine/store/artifacts/stray.bin.1").unlink()  # an operator purged it
    assert [e["id"] for e in startup_reconcile(cat, state).missing] == ["store/artifacts/stray.bin.1"]


def test_partial_fetches(state: Path) -> None:
    """CAT-3, WIRE-17: a partial artifact's entry goes (no task is live at start); its partial
    directory stays if it holds a resume record (a re-sent fetch resumes), else it is quarantined."""
    cat = Catalog.open(str(state))
    for aid, record in ((ART, True), (ART2, False)):
        d = state / "store/artifacts" / f"{aid}.partial"
        d.mkdir()
        (d / "rootfs.ext4").write_bytes(b"half")
        if record:
            (d / ".progress.json").write_text(json.dumps({"version": 1, "files": {}}))
        cat.put("artifact", aid, {"state": "partial", "files": [{"name": "rootfs.ext4", "size": 8, "sha256": HEX}]})
    report = startup_reconcile(cat, state)
    assert sorted(e["id"] for e in report.missing) == [ART, ART2]
    assert report.orphans == [f"store/artifacts/{ART2}.partial"]
    assert (state / "store/artifacts" / f"{ART}.partial/rootfs.ext4").read_bytes() == b"half"
    assert (state / "quarantine/store/artifacts" / f"{ART2}.partial/rootfs.ext4").exists()
    assert cat.entries("artifact") == []


def test_unprintable_names_get_a_hashed_id(state: Path) -> None:
    """CAT-3: an orphan id is its path under quarantine/, or sha256-<hex> when that is not printable ASCII."""
    cat = Catalog.open(str(state))
    (state / "store/artifacts/caf\u00e9 file").write_bytes(b"c")
    startup_reconcile(cat, state)
    [entry] = cat.entries("orphan")
    path = "store/artifacts/caf\u00e9 file"
    assert entry["id"] == "sha256-" + hashlib.sha256(path.encode()).hexdigest()
    assert entry["body"]["path"] == "quarantine/" + path
    assert (state / "quarantine" / path).read_bytes() == b"c"


def test_snapshots_with_missing_or_resized_files_are_removed(state: Path) -> None:
    """CAT-3, RT-12: a sandbox snapshot entry whose files are intact stays; one with a file gone,
    one with a file of another size and one whose removal was interrupted are reported missing;
    their directories, and an interrupted snapshot's ``<id>.new``, no entry lists: quarantined,
    nothing deleted."""
    cat = Catalog.open(str(state))
    for sid in ("snap-" + "1" * 24, "snap-" + "2" * 24, "snap-" + "3" * 24, "snap-" + "4" * 24):
        d = state / "snapshots" / sid
        d.mkdir(parents=True)
        (d / "memory.img").write_bytes(b"m" * 8)
        (d / "state.mig").write_bytes(b"s" * 4)
        cat.put("snapshot", sid, {"sandbox_id": "sbx-" + "0" * 24,
                                  "files": [{"name": "memory.img", "size": 8}, {"name": "state.mig", "size": 4}]})
    (state / "snapshots" / ("snap-" + "2" * 24) / "state.mig").unlink()
    (state / "snapshots" / ("snap-" + "3" * 24) / "memory.img").write_bytes(b"m")
    cat.put("snapshot", "snap-" + "4" * 24, {**cat.get("snapshot", "snap-" + "4" * 24)["body"], "state": "removing"})
    leftover = state / "snapshots" / ("snap-" + "5" * 24 + ".new")
    leftover.mkdir()
    (leftover / "memory.img").write_bytes(b"half")
    report = startup_reconcile(cat, state, now_ms=5)
    assert sorted(e["id"] for e in report.missing) == ["snap-" + "2" * 24, "snap-" + "3" * 24, "snap-" + "4" * 24]
    assert [e["id"] for e in cat.entries("snapshot")] == ["snap-" + "1" * 24]
    assert (state / "snapshots" / ("snap-" + "1" * 24) / "memory.img").exists()
    assert sorted(report.orphans) == sorted(f"snapshots/snap-{c * 24}" for c in "234") + [
        "snapshots/snap-" + "5" * 24 + ".new"]
    # Nothing deleted: the files are under quarantine/ with their relative paths.
    assert (state / "quarantine" / "snapshots" / ("snap-" + "3" * 24) / "memory.img").read_bytes() == b"m"
    assert (state / "quarantine" / "snapshots" / ("snap-" + "5" * 24 + ".new") / "memory.img").read_bytes() == b"half"
