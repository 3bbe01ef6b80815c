"""Artifact distribution benchmark (issue 5): FETCH_ARTIFACT against ``cp``, and fan-out.

Same run, same artifact: a 1 GiB ext4 (``mke2fs -d`` of a directory of random files, ~880 MiB
of data) registered straight into agent A's store and catalog.

* floor    ``cp --sparse=always`` of the file on the same disk (page cache hot, like the
           source side of a transfer), timed alone and with ``sync FILE`` after it (our target
           fsyncs before it registers anything, CAT-8);
* single   FETCH_ARTIFACT A → T1 over loopback, real ``tc-agent`` processes, driven by a
           hand-written coordinator (tests/fake_coordinator.py) that sends GRANT and the task;
* fan-out  the artifact to 8 empty targets, scheduled as DIST-3 says: ≤ 2 transfers per
           source, the source with the fewest active transfers first, each finished target
           becoming a source.

Targets: single ≥ 0.7 × the floor's throughput; fan-out time reported as a multiple of the
single transfer. Prints progress, then one JSON line.

    .venv/bin/python tests/bench/distribution.py [--data-mib 880] [--targets 8] [--keep]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psutil  # noqa: E402
import zmq  # noqa: E402

from agent.catalog import Catalog  # noqa: E402
from agent.image.store import Store  # noqa: E402
from protocol.messages import Grant, Task  # noqa: E402
from tests.fake_coordinator import Coordinator, start_agent  # noqa: E402
from tests.support import Proc  # noqa: E402

ART = "art-" + "b0" * 12
GiB = 1 << 30
MiB = 1 << 20


def make_ext4(work: Path, data_mib: int) -> Path:
    """A 1 GiB ext4 holding ``data_mib`` MiB of random files (incompressible, mostly allocated)."""
    src = work / "tree"
    src.mkdir()
    left = data_mib
    n = 0
    while left > 0:
        size = min(64, left)
        with open(src / f"blob-{n:03d}", "wb") as fh:
            for _ in range(size):
                fh.write(os.urandom(MiB))
        left -= size
        n += 1
    img = work / "rootfs.ext4"
    with open(img, "wb") as fh:
        fh.truncate(GiB)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-N", "1024", "-J", "size=16",
                    "-d", str(src), str(img)], check=True)
    shutil.rmtree(src)
    return img


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while data := fh.read(4 * MiB):
            h.update(data)
    return h.hexdigest()


def register(state: Path, img: Path) -> dict[str, Any]:
    """Put the artifact into a (not yet started) agent's store and catalog, as a build would."""
    store = Store.under(state)
    final = store.artifact_dir(ART)
    final.mkdir()
    os.rename(img, final / "rootfs.ext4")
    config = b'{"cmd":["/bin/sh"]}'
    (final / "config.json").write_bytes(config)
    digest = sha256_file(final / "rootfs.ext4")
    files = [{"name": "rootfs.ext4", "size": GiB, "sha256": digest},
             {"name": "config.json", "size": len(config), "sha256": hashlib.sha256(config).hexdigest()}]
    body = {"state": "verified", "sha256": digest, "size": GiB, "files": files}
    catalog = Catalog.open(str(state))
    try:
        catalog.put("artifact", ART, body)
    finally:
        catalog.close()
    return body


class Bench:
    def __init__(self, root: Path, body: dict[str, Any]) -> None:
        self.root = root
        self.body = body
        self.zctx: zmq.Context[Any] = zmq.Context()
        self.coord = Coordinator(self.zctx)
        self.procs: list[Proc] = []
        self.idents: dict[str, bytes] = {}
        self.blob: dict[str, str] = {}
        self.pids: dict[str, int] = {}
        self.consumed: set[str] = set()

    def start(self, nodes: list[str]) -> None:
        for node in nodes:
            p = start_agent(self.procs, self.root, [self.coord.endpoint], "agent.backoff_max=1s",
                            node_id=node, state_dir=self.root / node)
            self.pids[node] = p.pid
        waiting = set(nodes)
        while waiting:
            ident, hello = self.coord.expect_where(lambda _i, m: m.TYPE == "HELLO" and m.node_id in waiting, 60,
                                                   "HELLO")
            self.coord.welcome(ident, hello, interval_ms=1000)
            self.idents[hello.node_id] = ident
            self.blob[hello.node_id] = hello.blob_endpoint
            waiting.discard(hello.node_id)

    def grant(self, source: str, target: str) -> str:
        token = secrets.token_hex(32)
        msg = Grant(msg_id=f"g-{secrets.token_hex(4)}", artifact_id=ART, token=token,
                    expires=int((time.time() + 3600) * 1000), target_node=target, target_key="")
        self.coord.send(self.idents[source], msg)
        self.coord.expect_where(lambda _i, m: m.TYPE == "GRANT_ACK" and m.parent_id == msg.msg_id, 10, "GRANT_ACK")
        return token

    def fetch(self, source: str, target: str) -> Task:
        token = self.grant(source, target)
        args = {"artifact_id": ART, "files": self.body["files"], "sha256": self.body["sha256"],
                "size": self.body["size"], "token": token,
                "source": {"node": source, "endpoint": self.blob[source], "key": ""}}
        task = Task(msg_id=f"m-{secrets.token_hex(4)}", task_id=f"tsk-{secrets.token_hex(12)}",
                    op="FETCH_ARTIFACT", args=args, deadline=0)
        self.coord.send(self.idents[target], task)
        return task

    def wait_any(self, tasks: dict[str, Any], timeout: float = 600) -> Any:
        """The next TASK_RESULT of one of ``tasks``, including one that arrived while the driver
        waited for something else (a GRANT_ACK)."""
        res = next((m for _, m in self.coord.seen if m.TYPE == "TASK_RESULT" and m.task_id in tasks
                    and m.task_id not in self.consumed), None)
        if res is None:
            _, res = self.coord.expect_where(lambda _i, m: m.TYPE == "TASK_RESULT" and m.task_id in tasks, timeout,
                                             "TASK_RESULT")
        self.consumed.add(res.task_id)
        if not res.ok:
            raise SystemExit(f"transfer failed: {res.error}")
        return res

    def remove(self, node: str) -> None:
        task = Task(msg_id=f"m-{secrets.token_hex(4)}", task_id=f"tsk-{secrets.token_hex(12)}",
                    op="REMOVE_ARTIFACT", args={"artifact_id": ART}, deadline=0)
        self.coord.send(self.idents[node], task)
        self.wait_any({task.task_id: None})

    def cpu(self) -> dict[str, float]:
        out = {}
        for node, pid in self.pids.items():
            try:
                t = psutil.Process(pid).cpu_times()
                out[node] = t.user + t.system
            except psutil.Error:
                pass
        return out

    def close(self) -> None:
        for p in self.procs:
            p.stop()
        self.coord.close()
        self.zctx.destroy(linger=0)


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-mib", type=int, default=880, help="random data inside the 1 GiB ext4")
    ap.add_argument("--targets", type=int, default=8, help="fan-out targets")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tc-dist-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    bench: Bench | None = None
    try:
        print(f"building a 1 GiB ext4 with {args.data_mib} MiB of random files in {root} …", flush=True)
        img = make_ext4(root, args.data_mib)
        allocated = img.stat().st_blocks * 512
        subprocess.run(["sync"], check=True)
        subprocess.run(["cat", str(img)], stdout=subprocess.DEVNULL, check=True)  # page cache hot
        cp_s = timed(["cp", "--sparse=always", str(img), str(root / "floor.ext4")])
        sync_s = timed(["sync", str(root / "floor.ext4")])
        (root / "floor.ext4").unlink()
        subprocess.run(["sync"], check=True)
        print(f"floor: cp --sparse=always {cp_s:.2f}s, + sync {cp_s + sync_s:.2f}s "
              f"({allocated / MiB:.0f} MiB allocated)", flush=True)

        body = register(root / "node-a", img)
        targets = [f"node-t{i}" for i in range(1, args.targets + 1)]
        bench = Bench(root, body)
        bench.start(["node-a", *targets])
        subprocess.run(["cat", str(root / "node-a" / "store" / "artifacts" / ART / "rootfs.ext4")],
                       stdout=subprocess.DEVNULL, check=True)
        subprocess.run(["sync"], check=True)

        cpu0 = bench.cpu()
        t0 = time.perf_counter()
        task = bench.fetch("node-a", targets[0])
        res = bench.wait_any({task.task_id: None})
        single_s = time.perf_counter() - t0
        cpu1 = bench.cpu()
        copy = root / targets[0] / "store" / "artifacts" / ART / "rootfs.ext4"
        assert sha256_file(copy) == body["sha256"]
        cpu_src = cpu1["node-a"] - cpu0["node-a"]
        cpu_dst = cpu1[targets[0]] - cpu0[targets[0]]
        print(f"single: FETCH_ARTIFACT A → T1 {single_s:.2f}s (agent: {res.result['seconds']:.2f}s; "
              f"{res.result['wire_bytes'] / MiB:.0f} MiB on the wire; CPU source {cpu_src:.2f}s, "
              f"target {cpu_dst:.2f}s); copy allocates {copy.stat().st_blocks * 512 / MiB:.0f} MiB", flush=True)

        bench.remove(targets[0])
        subprocess.run(["sync"], check=True)
        print(f"fan-out to {len(targets)} targets (≤ 2 transfers per source) …", flush=True)
        t0 = time.perf_counter()
        active: dict[str, tuple[str, str]] = {}
        load: dict[str, int] = {"node-a": 0}
        pending = list(targets)
        finished: list[tuple[float, str, str]] = []
        while pending or active:
            while pending:
                source = min(load, key=lambda n: (load[n], n != "node-a", n))
                if load[source] >= 2:
                    break
                target = pending.pop(0)
                task = bench.fetch(source, target)
                active[task.task_id] = (target, source)
                load[source] += 1
            res = bench.wait_any(active)
            target, source = active.pop(res.task_id)
            load[source] -= 1
            load[target] = 0
            finished.append((time.perf_counter() - t0, target, source))
            print(f"  {finished[-1][0]:6.2f}s {target} ← {source}", flush=True)
        fanout_s = time.perf_counter() - t0

        floor_mib_s = GiB / MiB / cp_s
        floor_sync_mib_s = GiB / MiB / (cp_s + sync_s)
        ours_mib_s = GiB / MiB / single_s
        summary = {
            "artifact_bytes": GiB, "allocated_bytes": allocated, "data_mib": args.data_mib,
            "floor_cp_s": round(cp_s, 3), "floor_cp_sync_s": round(cp_s + sync_s, 3),
            "single_s": round(single_s, 3), "single_agent_s": res.result and round(single_s, 3),
            "single_mib_s": round(ours_mib_s, 1), "floor_mib_s": round(floor_mib_s, 1),
            "floor_sync_mib_s": round(floor_sync_mib_s, 1),
            "ratio_vs_cp": round(ours_mib_s / floor_mib_s, 3),
            "ratio_vs_cp_sync": round(ours_mib_s / floor_sync_mib_s, 3),
            "target_ratio": 0.7,
            "cpu_source_s": round(cpu_src, 2), "cpu_target_s": round(cpu_dst, 2),
            "fanout_targets": len(targets), "fanout_s": round(fanout_s, 3),
            "fanout_over_single": round(fanout_s / single_s, 2),
            "fanout_schedule": [{"t": round(t, 2), "target": tg, "source": s} for t, tg, s in finished],
            "cpus": os.cpu_count(),
        }
        print(f"throughput: ours {ours_mib_s:.0f} MiB/s, cp {floor_mib_s:.0f} MiB/s "
              f"(ratio {summary['ratio_vs_cp']}), cp+sync {floor_sync_mib_s:.0f} MiB/s "
              f"(ratio {summary['ratio_vs_cp_sync']}); fan-out {fanout_s:.2f}s = "
              f"{summary['fanout_over_single']}× single", flush=True)
        print(json.dumps(summary))
    finally:
        if bench is not None:
            bench.close()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
