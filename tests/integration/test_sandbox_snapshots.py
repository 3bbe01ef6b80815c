"""Snapshots of a running sandbox in a real QEMU microVM under TCG, driven through a real
``tc-agent`` by a test ROUTER playing the coordinator (RT-12 to RT-14, CAT-1, CAT-8, SNAP-9).

The guest counts every 100 ms and prints, at each tick, whether ``/pre`` (written at count 2,
before the snapshot) and ``/post`` (written at count POST_AT, after it) are on its disk.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.fake_coordinator import Coordinator, hello_and_welcome, start_agent
from tests.integration.test_sandbox_runtime import (ART, TPL, Driver, build_template, catalog_body, counts,
                                                    qemu_reaper, sandbox_id, sha)
from tests.support import GUEST_KERNELS, HAVE_QEMU, NEEDS_QEMU, Proc, wait_for

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason=NEEDS_QEMU)
__all__ = ["qemu_reaper"]  # the fixture, used by name

POST_AT = 40
SCRIPT = ('i=0; while :; do p=n; q=n; [ -e /pre ] && p=y; [ -e /post ] && q=y; echo "count $i pre=$p post=$q"; '
          '[ $i = 2 ] && touch /pre && sync; [ $i = 5 ] && touch /ready && sync; '
          f'[ $i = {POST_AT} ] && touch /post && sync; i=$((i+1)); sleep 0.1; done')
RC = {"entrypoint": ["/bin/sh", "-c", SCRIPT], "cmd": [], "env": {"PATH": "/bin"}, "workdir": "/", "user": "0:0",
      "ports": []}
SNAP = "snap-" + "a" * 24
LINE = re.compile(r"^count (\d+) pre=([yn]) post=([yn])", re.M)


@pytest.mark.usefixtures("qemu_reaper")
def test_snapshot_rollback_and_remove(tmp_path: Path, coord: Coordinator, agents: list[Proc]) -> None:
    """RT-12, RT-13, RT-14, CAT-1, CAT-8, SNAP-9, COMPAT-7: a snapshot taken at count N is a
    catalog entry with its files; after the sandbox ran on and wrote /post, a rollback resumes
    the counter right after N with /pre there and /post gone; a re-sent snapshot returns the
    same info; removing the snapshot leaves the rolled-back sandbox running; a rollback to an
    unknown snapshot is SnapshotNotFound; an export is a verified artifact that boots with the
    guest's files (RT-14 export)."""
    state = tmp_path / "state"
    start_agent(agents, tmp_path, [coord.endpoint], f'image.local_roots=["{tmp_path / "import"}"]',
                "runtime.driver=qemu", f"runtime.guest_kernel={GUEST_KERNELS[-1]}", "runtime.kvm_canary_timeout=5s")
    ident, hello = hello_and_welcome(coord)
    assert hello.capabilities["sandbox"] is True
    tasks = Driver(coord, ident)
    build_template(tmp_path, tasks)
    sid = sandbox_id(0x51)
    res = tasks.run("CREATE_SANDBOX", {"sandbox_id": sid, "template_id": TPL, "artifact_id": ART,
                                       "runtime_config": RC, "vcpus": 1, "memory_mib": 256,
                                       "probe": "exec:test -e /ready", "restore": "cold"})
    assert res.ok and res.result["state"] == "RUNNING", res.error

    def console() -> str:
        r = tasks.run("CONSOLE_SANDBOX", {"sandbox_id": sid, "tail_bytes": 65536}, 10)
        assert r.ok, r.error
        return str(r.result["console"])

    def lines() -> list[tuple[int, str, str]]:
        return [(int(n), p, q) for n, p, q in LINE.findall(console().replace("\r", ""))]

    wait_for(lambda: len(lines()) and lines()[-1][0] >= 5 or None, 30, "count ≥ 5")
    lo = lines()[-1][0]
    snap = tasks.run("SNAPSHOT_SANDBOX", {"sandbox_id": sid, "snapshot_id": SNAP}, 60)
    assert snap.ok, snap.error
    hi = lines()[-1][0]
    info = snap.result
    assert lo < POST_AT - 5 and hi < POST_AT - 5, (lo, hi)  # the snapshot is well before /post
    assert {k: info[k] for k in ("snapshot_id", "sandbox_id", "template_id", "base_artifact_id")} == {
        "snapshot_id": SNAP, "sandbox_id": sid, "template_id": TPL, "base_artifact_id": ART}
    assert info["sizes"]["memory"] == 256 << 20 and info["sizes"]["disk"] > 0 and info["sizes"]["state"] > 0
    assert info["pins"]["guest_image"] == hello.versions["guest_image"] and info["facts"]["accelerator"] == "tcg"
    entry = catalog_body(state, "snapshot", SNAP)
    assert entry and entry["sandbox_id"] == sid and entry["base_artifact_id"] == ART and entry["created_ms"] > 0
    for f in entry["files"]:  # CAT-1/CAT-8: the entry lists files that are there, with their sizes
        assert (state / "snapshots" / SNAP / f["name"]).stat().st_size == f["size"]

    # The sandbox runs on and writes /post after the snapshot.
    wait_for(lambda: any(q == "y" for _, _, q in lines()) or None, 60, "/post written after the snapshot")
    later = lines()[-1][0]

    back = tasks.run("ROLLBACK_SANDBOX", {"sandbox_id": sid, "snapshot_id": SNAP, "generation": 1}, 60)
    assert back.ok, back.error
    assert back.result == {"sandbox_id": sid, "snapshot_id": SNAP, "generation": 1, "state": "RUNNING",
                           "restore_ms": back.result["restore_ms"]}
    after = wait_for(lambda: lines() or None, 20, "counter after the rollback")
    first, pre, post = after[0]
    # The counter resumes right after N: not from 0, not from the later value; /post is gone.
    assert lo < first <= hi + 3 < later, (lo, hi, first, later)
    assert (pre, post) == ("y", "n"), after[:3]
    body = catalog_body(state, "sandbox", sid)
    assert body and body["state"] == "RUNNING" and (body["snapshot_id"], body["generation"]) == (SNAP, 1)
    print(f"\nTCG snapshot pause {info['pause_ms']} ms at count {lo}..{hi}; rollback from count {later} "
          f"restore {back.result['restore_ms']} ms, resumed at {first}")

    # Idempotent by snapshot id (a re-sent task) and by generation (a re-sent rollback).
    again = tasks.run("SNAPSHOT_SANDBOX", {"sandbox_id": sid, "snapshot_id": SNAP}, 30)
    assert again.ok and again.result == info, again.error
    resent = tasks.run("ROLLBACK_SANDBOX", {"sandbox_id": sid, "snapshot_id": SNAP, "generation": 1}, 30)
    assert resent.ok and resent.result == back.result, resent.error

    # CAT-8: files then entry; the rolled-back sandbox keeps running on its own copies.
    removed = tasks.run("REMOVE_SNAPSHOT", {"snapshot_id": SNAP}, 30)
    assert removed.ok and removed.result == {"snapshot_id": SNAP, "removed": True}, removed.error
    assert catalog_body(state, "snapshot", SNAP) is None and not (state / "snapshots" / SNAP).exists()
    seen = lines()[-1][0]
    wait_for(lambda: lines()[-1][0] > seen + 3 or None, 20, "the sandbox counting after the removal")
    assert catalog_body(state, "sandbox", sid)["state"] == "RUNNING"  # type: ignore[index]
    gone = tasks.run("REMOVE_SNAPSHOT", {"snapshot_id": SNAP}, 10)
    assert gone.ok and gone.result == {"snapshot_id": SNAP, "removed": False}

    unknown = tasks.run("ROLLBACK_SANDBOX", {"sandbox_id": sid, "snapshot_id": SNAP, "generation": 2}, 10)
    assert not unknown.ok and unknown.error["name"] == "SnapshotNotFound", unknown.error
    assert counts(console())  # still the same running guest

    # RT-14 export: a standalone ext4 of the guest-visible disk as a verified artifact, which
    # boots like a built one and holds what the guest wrote (/pre, synced).
    exported = "art-" + "e" * 24
    exp = tasks.run("EXPORT_SANDBOX", {"sandbox_id": sid, "artifact_id": exported}, 60)
    assert exp.ok, exp.error
    rootfs = state / "store" / "artifacts" / exported / "rootfs.ext4"
    assert exp.result["sha256"] == sha(rootfs) and exp.result["size"] == rootfs.stat().st_size
    art = catalog_body(state, "artifact", exported)
    assert art and art["state"] == "verified" and art["files"] == exp.result["files"] == [
        {"name": "rootfs.ext4", "size": exp.result["size"], "sha256": exp.result["sha256"]}]
    assert tasks.run("EXPORT_SANDBOX", {"sandbox_id": sid, "artifact_id": exported}, 30).result == exp.result
    seen = lines()[-1][0]
    wait_for(lambda: lines()[-1][0] > seen + 2 or None, 20, "the sandbox counting after the export")
    d = tasks.run("DESTROY_SANDBOX", {"sandbox_id": sid}, 30)
    assert d.ok and d.result["destroyed"] is True, d.error
    sid = sandbox_id(0x52)  # console() and lines() now read the sandbox booted from the export
    res = tasks.run("CREATE_SANDBOX", {"sandbox_id": sid, "template_id": TPL, "artifact_id": exported,
                                       "runtime_config": RC, "vcpus": 1, "memory_mib": 128, "probe": "started",
                                       "restore": "cold"})
    assert res.ok and res.result["state"] == "RUNNING", res.error
    booted = wait_for(lambda: lines() or None, 30, "counter of the sandbox booted from the export")
    assert booted[0][:2] == (0, "y"), booted[:2]
    d = tasks.run("DESTROY_SANDBOX", {"sandbox_id": sid}, 30)
    assert d.ok and d.result["destroyed"] is True, d.error
