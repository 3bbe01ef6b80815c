"""Snapshot benchmark (issue 8): snapshot create and rollback of a running sandbox against a
cold boot measured in the same run.

One real ``tc-agent`` with the qemu runtime (TCG on this VM: its ``/dev/kvm`` cannot boot
guests), driven at the agent level by the hand-written coordinator of
tests/fake_coordinator.py, like tests/integration/test_sandbox_snapshots.py. The template is a
busybox image whose entrypoint counts on the console every 100 ms; guests have 256 MiB. Each
round:

* cold       CREATE_SANDBOX ``restore: cold``, probe ``started`` (the template default):
             the agent's create-to-ready time (``ready_ms``) and the task's wall time;
* snapshot   SNAPSHOT_SANDBOX of the running, counting guest: the agent's ``pause_ms`` (QMP
             ``stop`` to ``cont``, RT-12/RT-13) and the task's wall time (pause plus fsync of
             the snapshot's files, rename, catalog entry);
* rollback   ROLLBACK_SANDBOX to it once the guest has counted on: the agent's ``restore_ms``
             (the VM is RUNNING again: memory restore, RT-14) and the task's wall time; the
             console is checked to resume from the snapshot's count, not from 0.

Targets: pause ≤ 100 ms; rollback ≤ 1/10 of a cold boot (ratios of medians).

The breakdown (on unless ``--no-breakdown``) then times the stages of the agent's snapshot path
(agent/runtime/qemu.py ``snapshot``) one by one on a running sandbox of the same agent: the
same QMP commands through agent/runtime/qmp.py and the same copies through
agent/runtime/disks.py, in this process, so the pause can be split into its parts.

Prints progress, then one JSON line.

    .venv/bin/python tests/bench/snapshot.py [--rounds 3] [--no-breakdown] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import zmq  # noqa: E402

from agent.runtime import disks  # noqa: E402
from agent.runtime.qmp import Qmp  # noqa: E402
from protocol.messages import Task  # noqa: E402
from tests import oci  # noqa: E402
from tests.fake_coordinator import Coordinator, hello_and_welcome, start_agent  # noqa: E402
from tests.layers import Dir, File, Symlink, layer  # noqa: E402
from tests.support import HAVE_QEMU, NEEDS_QEMU, Proc, qemu_agent_extra, wait_for  # noqa: E402

ART = "art-" + "c1" * 12
TPL = "tpl-" + "c2" * 12
MEMORY_MIB = 256
TICK = 'i=0; while :; do echo "count $i"; i=$((i+1)); sleep 0.1; done'
RC = {"entrypoint": ["/bin/sh", "-c", TICK], "cmd": [], "env": {"PATH": "/bin"}, "workdir": "/", "user": "0:0",
      "ports": []}
COUNT = re.compile(r"^count (\d+)", re.M)


class Bench:
    """One agent and the fake coordinator that sends it tasks, one id each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.zctx: zmq.Context[Any] = zmq.Context()
        self.coord = Coordinator(self.zctx)
        self.procs: list[Proc] = []
        self.ident = b""

    def start(self) -> None:
        start_agent(self.procs, self.root, [self.coord.endpoint], f'image.local_roots=["{self.root / "import"}"]',
                    *qemu_agent_extra())
        self.ident, hello = hello_and_welcome(self.coord, interval_ms=1000)
        if not hello.capabilities.get("sandbox"):
            raise SystemExit(f"the agent has no sandbox capability: {hello.facts}")
        print(f"agent up: accelerator {hello.facts.get('accelerator')}, guest image "
              f"{hello.versions.get('guest_image')}", flush=True)

    def run(self, op: str, args: dict[str, Any], timeout: float = 300) -> tuple[dict[str, Any], float]:
        """(result, wall ms from sending the task to its TASK_RESULT); a failed task ends the run."""
        task = Task(msg_id=f"m-{secrets.token_hex(4)}", task_id=f"tsk-{secrets.token_hex(12)}", op=op, args=args,
                    deadline=0)
        t0 = time.perf_counter()
        self.coord.send(self.ident, task)
        _, res = self.coord.expect_where(lambda _i, m: m.TYPE == "TASK_RESULT" and m.task_id == task.task_id,
                                         timeout, f"{op} result")
        wall = (time.perf_counter() - t0) * 1000
        if not res.ok:
            raise SystemExit(f"{op} failed: {res.error}")
        return dict(res.result), wall

    def counts(self, sid: str) -> list[int]:
        res, _ = self.run("CONSOLE_SANDBOX", {"sandbox_id": sid, "tail_bytes": 65536}, 10)
        return [int(n) for n in COUNT.findall(str(res["console"]).replace("\r", ""))]

    def counted_past(self, sid: str, n: int) -> int:
        """Polls the console until the guest's counter passed ``n``; returns the last count."""
        return int(wait_for(lambda: (c := self.counts(sid)) and c[-1] > n and c[-1], 60, f"{sid} count > {n}"))

    def close(self) -> None:
        for p in self.procs:
            p.stop()
        self.coord.close()
        self.zctx.destroy(linger=0)


def build_template(bench: Bench) -> None:
    imports = bench.root / "import"
    imports.mkdir(parents=True, exist_ok=True)
    img = oci.image([layer([Dir("bin"), File("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755),
                            Symlink("bin/sh", "busybox"), Symlink("bin/sleep", "busybox"), Dir("etc"),
                            File("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n"), File("etc/group", b"root:x:0:\n"),
                            Dir("tmp", mode=0o1777)])])
    oci.write_oci_archive(imports / "tick.tar", img, tag="v1")
    bench.run("BUILD_ARTIFACT", {"artifact_id": ART, "image": f"oci-archive:{imports / 'tick.tar'}:v1",
                                 "writable_size": 0, "manifest_digest": img.manifest_digest})


def sandbox_id(n: int) -> str:
    return "sbx-" + format(n, "024x")


def snapshot_id(n: int) -> str:
    return "snap-" + format(n, "024x")


def one_round(bench: Bench, i: int) -> dict[str, float]:
    sid, snap = sandbox_id(0xB0 + i), snapshot_id(0xB0 + i)
    create = {"sandbox_id": sid, "template_id": TPL, "artifact_id": ART, "runtime_config": RC, "vcpus": 1,
              "memory_mib": MEMORY_MIB, "probe": "started", "restore": "cold"}
    cold, cold_wall = bench.run("CREATE_SANDBOX", create)
    assert cold["state"] == "RUNNING" and cold["restored"] is False, cold
    at = bench.counted_past(sid, 10)  # a settled, counting guest
    snap_res, snap_wall = bench.run("SNAPSHOT_SANDBOX", {"sandbox_id": sid, "snapshot_id": snap})
    later = bench.counted_past(sid, at + 10)  # it runs on after the snapshot
    back, back_wall = bench.run("ROLLBACK_SANDBOX", {"sandbox_id": sid, "snapshot_id": snap, "generation": 1})
    assert back["state"] == "RUNNING", back
    resumed = wait_for(lambda: bench.counts(sid) or None, 30, "the counter after the rollback")[0]
    # The rollback is real: the counter resumes near the snapshot's count, not at 0 or later.
    assert at <= resumed < later, (at, resumed, later)
    out = {"cold_ready_ms": float(cold["ready_ms"]), "cold_wall_ms": cold_wall,
           "pause_ms": float(snap_res["pause_ms"]), "snapshot_wall_ms": snap_wall,
           "rollback_ms": float(back["restore_ms"]), "rollback_wall_ms": back_wall}
    sizes = snap_res["sizes"]
    print(f"  round {i + 1}: cold {out['cold_ready_ms']:.0f} ms (task {cold_wall:.0f}); snapshot pause "
          f"{out['pause_ms']:.0f} ms, total {snap_wall:.0f} ms (memory {sizes['memory'] >> 20} MiB, disk "
          f"{sizes['disk'] >> 20} MiB, state {sizes['state'] >> 10} KiB); rollback {out['rollback_ms']:.0f} ms "
          f"(task {back_wall:.0f}); counter {at} → snapshot → {later} → rollback → {resumed}", flush=True)
    bench.run("REMOVE_SNAPSHOT", {"snapshot_id": snap}, 60)
    # A rollback first ends the running VM (RT-14); its cost alone, for reading rollback_ms.
    _, out["destroy_wall_ms"] = bench.run("DESTROY_SANDBOX", {"sandbox_id": sid}, 60)
    return out


def qmp_address(vm_dir: Path) -> str:
    """The QMP socket of the VM's running QEMU, read from its command line (the agent's name
    for it includes a per-agent namespace)."""
    pid = int((vm_dir / "qemu.pid").read_text())
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    for a in argv:
        m = re.match(rb"socket,id=qmp,path=([^,]+)", a)
        if m:
            return "\0" + m.group(1).decode()
    raise SystemExit(f"no QMP socket on the command line of QEMU {pid}")


def breakdown(bench: Bench, reps: int) -> dict[str, Any]:
    """The stages of QemuDriver.snapshot timed one by one on a running sandbox (read-only use of
    the agent's qmp and disks modules; the snapshot goes into a scratch dir, not the catalog)."""
    sid = sandbox_id(0xBF)
    bench.run("CREATE_SANDBOX", {"sandbox_id": sid, "template_id": TPL, "artifact_id": ART, "runtime_config": RC,
                                 "vcpus": 1, "memory_mib": MEMORY_MIB, "probe": "started", "restore": "cold"})
    bench.counted_past(sid, 10)
    vm = bench.root / "state" / "sandboxes" / sid
    meta = json.loads((vm / "meta.json").read_text())
    print(f"breakdown on {sid}: disk {meta['disk']} ({meta['format']}), memory file {meta['memory']}", flush=True)
    stages: dict[str, list[float]] = {}
    for r in range(reps):
        dest = bench.root / f"breakdown-{r}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        t: dict[str, float] = {}

        def timed(name: str, fn: Callable[[], Any]) -> None:
            t0 = time.perf_counter()
            fn()
            t[name] = (time.perf_counter() - t0) * 1000

        alive = (vm / "qemu.pid").exists
        t_all = time.perf_counter()
        with Qmp(qmp_address(vm), 10.0, alive) as q:
            t["connect"] = (time.perf_counter() - t_all) * 1000
            t_pause = time.perf_counter()
            try:
                timed("stop", lambda: q.call("stop"))
                timed("capabilities", lambda: q.call("migrate-set-capabilities", capabilities=[
                    {"capability": "x-ignore-shared", "state": True}]))
                timed("migrate (device state, exec:cat)", lambda: (
                    q.call("migrate", uri=f"exec:cat > {shlex.quote(str(dest / 'state.mig'))}"),
                    q.wait_migration(60.0)))
                timed("memory clone", lambda: disks.clone(meta["memory"], str(dest / "memory.img")))
                timed("disk freeze", lambda: disks.freeze(str(vm / meta["disk"]), meta["format"],
                                                          str(dest / "disk.raw")))
                timed("config copy", lambda: shutil.copyfile(vm / "config.img", dest / "config.img"))
            finally:
                t["pause (stop…before cont)"] = (time.perf_counter() - t_pause) * 1000
                timed("cont", lambda: q.call("cont"))
        t0 = time.perf_counter()
        for f in dest.iterdir():  # what the task does after cont (_fsync_tree)
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        t["fsync of the files (after cont)"] = (time.perf_counter() - t0) * 1000
        sizes = {f.name: (f.stat().st_size, f.stat().st_blocks * 512) for f in dest.iterdir()}
        print(f"  rep {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()) + " ms", flush=True)
        print("         files: " + ", ".join(f"{n} {s >> 20} MiB ({a >> 20} MiB allocated)"
                                            for n, (s, a) in sorted(sizes.items())), flush=True)
        for k, v in t.items():
            stages.setdefault(k, []).append(v)
        shutil.rmtree(dest)
    bench.run("DESTROY_SANDBOX", {"sandbox_id": sid}, 60)
    return {"disk_format": meta["format"], "reflink": meta["format"] == "raw",
            "stages_median_ms": {k: round(statistics.median(v), 1) for k, v in stages.items()}}


def stats(xs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(xs), 1), "min": round(min(xs), 1), "max": round(max(xs), 1)}


def reap(root: Path) -> None:
    """QEMU outlives its agent on purpose (RT-15): end the VMs this run left behind."""
    for pidfile in root.glob("state/sandboxes/*/qemu.pid"):
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-breakdown", action="store_true", help="skip the stage-by-stage timing of a snapshot")
    ap.add_argument("--breakdown-reps", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    if not HAVE_QEMU:
        sys.exit(f"snapshot bench: {NEEDS_QEMU}")
    root = Path(tempfile.mkdtemp(prefix="tc-snap-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    bench = Bench(root)
    try:
        bench.start()
        build_template(bench)
        print(f"{args.rounds} rounds, {MEMORY_MIB} MiB guests, in {root} …", flush=True)
        rounds = [one_round(bench, i) for i in range(args.rounds)]
        keys = rounds[0].keys()
        result: dict[str, Any] = {k: stats([r[k] for r in rounds]) for k in keys}
        cold, pause = result["cold_ready_ms"]["median"], result["pause_ms"]["median"]
        rollback = result["rollback_ms"]["median"]
        result.update(rounds=args.rounds, memory_mib=MEMORY_MIB, pause_target_ms=100,
                      pause_met=pause <= 100, rollback_over_cold=round(rollback / cold, 3),
                      rollback_over_cold_target=0.1, rollback_met=rollback / cold <= 0.1)
        for k in keys:
            s = result[k]
            print(f"{k:18} median {s['median']:8.1f}  min {s['min']:8.1f}  max {s['max']:8.1f}", flush=True)
        if not args.no_breakdown:
            result["breakdown"] = breakdown(bench, args.breakdown_reps)
            print("breakdown (median ms): " + ", ".join(
                f"{k} {v}" for k, v in result["breakdown"]["stages_median_ms"].items()), flush=True)
        print(f"snapshot: pause {pause:.0f} ms (target ≤ 100: {'met' if result['pause_met'] else 'NOT met'}), "
              f"total {result['snapshot_wall_ms']['median']:.0f} ms; rollback {rollback:.0f} ms to ready vs cold "
              f"boot {cold:.0f} ms = {result['rollback_over_cold']} (target ≤ 0.1: "
              f"{'met' if result['rollback_met'] else 'NOT met'})", flush=True)
        print(json.dumps(result, sort_keys=True))
    finally:
        bench.close()
        reap(root)
        if args.keep:
            print(f"kept {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
