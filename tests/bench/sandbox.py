"""Sandbox benchmark (issue 7): cold boot vs. restore from a template memory snapshot, and
resolve latency with a large index.

* boot     a real coordinator and one real qemu agent (TCG here), a busybox template whose
           entrypoint ticks on the console; ``sandbox create`` of a rootfs-mode template (cold
           boot) and of a memory-mode one (restore), ``--rounds`` each, 256 MiB guests. Reported:
           the agent's create-to-ready time (``ready_ms`` of CREATE_SANDBOX) and the wall time
           of the tcctl call. Target: restore ≤ 1/10 of a cold boot.
* resolve  the coordinator's real resolve index (coordinator/resolve/) over a real node
           registry, in-process: ``--templates`` templates (10k) with ``--replicas`` READY
           replicas each spread over ``--nodes`` nodes (1k), every node READY, sandbox-capable,
           with room; ``--calls`` resolves of random templates by id and by alias. Reported:
           throughput and p50/p99 latency. Target: p99 < 1 ms.

Prints progress, then one JSON line.

    .venv/bin/python tests/bench/sandbox.py [--rounds 3] [--templates 10000] [--nodes 1000] [--skip-boot]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from coordinator.db.engine import ensure_schema, make_engine  # noqa: E402
from coordinator.events import EventBus  # noqa: E402
from coordinator.health import Thresholds  # noqa: E402
from coordinator.nodes import LiveNode, NodeRegistry  # noqa: E402
from coordinator.resolve.index import RegistryNodes, ResolveIndex  # noqa: E402
from coordinator.resolve.rank import ReplicaEntry, TemplateEntry  # noqa: E402
from coordinator.config import StorageConfig  # noqa: E402
from tests import oci  # noqa: E402
from tests.layers import Dir, File, Symlink, layer  # noqa: E402
from tests.support import HAVE_QEMU, NEEDS_QEMU, Cluster, qemu_agent_extra, wait_for  # noqa: E402

TICK = "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.1; done"


def busybox_image(imports: Path) -> str:
    busybox = Path("/bin/busybox").read_bytes()
    img = oci.image([layer([Dir("bin"), File("bin/busybox", busybox, mode=0o755), Symlink("bin/sh", "busybox"),
                            Symlink("bin/sleep", "busybox"), Dir("tmp"), Dir("etc"),
                            File("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n"), File("etc/group", b"root:x:0:\n")])],
                    config={"Entrypoint": ["/bin/sh", "-c", TICK]})
    imports.mkdir(parents=True, exist_ok=True)
    oci.write_oci_archive(imports / "tick.tar", img, tag="v1")
    return f"oci-archive:{imports / 'tick.tar'}:v1"


def boot_bench(rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tc-sbx-bench-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        cluster = Cluster(root=root, db_url=f"sqlite:///{root}/coordinator.db")
        try:
            ref = busybox_image(root / "import")
            cluster.start_coordinator()
            cluster.start_agent("node-q", [f'image.local_roots=["{root / "import"}"]', *qemu_agent_extra()])
            wait_for(lambda: cluster.health().get("node-q") == "READY", 90, "node-q READY")
            for alias, mode in (("cold", "rootfs"), ("warm", "memory")):
                print(f"template {alias} ({mode}) …", flush=True)
                rc, doc = cluster.tcctl("template", "create", "--image", ref, "--builder", "node-q", "--alias", alias,
                                        "--memory-mib", "256", "--snapshot-mode", mode, "--wait", timeout=300)
                assert rc == 0 and doc["job"]["status"] == "READY", doc
            out: dict[str, dict[str, list[float]]] = {"cold": {"ready_ms": [], "wall_ms": []},
                                                       "warm": {"ready_ms": [], "wall_ms": []}}
            for i in range(rounds):
                for alias in ("cold", "warm"):
                    t0 = time.monotonic()
                    rc, doc = cluster.tcctl("sandbox", "create", "--template", alias, timeout=300)
                    wall = (time.monotonic() - t0) * 1000
                    assert rc == 0, doc
                    sbx = doc["sandbox"]
                    assert sbx["restore"] == ("memory" if alias == "warm" else "cold"), sbx
                    out[alias]["ready_ms"].append(float(sbx["ready_ms"]))
                    out[alias]["wall_ms"].append(wall)
                    print(f"  round {i + 1} {alias}: ready {sbx['ready_ms']} ms, tcctl {wall:.0f} ms", flush=True)
                    rc, _ = cluster.tcctl("sandbox", "destroy", sbx["sandbox_id"], timeout=60)
                    assert rc == 0
            cold, warm = statistics.median(out["cold"]["ready_ms"]), statistics.median(out["warm"]["ready_ms"])
            return {"cold_ready_ms": cold, "restore_ready_ms": warm, "restore_over_cold": round(warm / cold, 3),
                    "cold_wall_ms": round(statistics.median(out["cold"]["wall_ms"])),
                    "restore_wall_ms": round(statistics.median(out["warm"]["wall_ms"])), "rounds": rounds}
        finally:
            cluster.stop()


def resolve_bench(templates: int, nodes: int, replicas: int, calls: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tc-resolve-bench-") as tmp:
        engine = make_engine(f"sqlite:///{tmp}/c.db")
        ensure_schema(engine, migrate_now=True)
        reg = NodeRegistry(engine, Thresholds(interval=2.0, failover_grace=0), EventBus(None))
        now = time.time()
        for i in range(nodes):
            nid = f"node-{i:04d}"
            reg.nodes[nid] = LiveNode(nid, address=f"10.0.{i // 250}.{i % 250}", capabilities={"sandbox": True},
                                      mirror_complete=True, last_seen=now + 3600, session_id="s" * 32,
                                      storage={"total": 100 << 30, "used": 10 << 30, "free": 90 << 30},
                                      storage_at=now + 3600, mem_free=64 << 30, sandboxes=i % 7)
        index = ResolveIndex(engine, RegistryNodes(reg, StorageConfig()))
        rnd = random.Random(7)
        names: list[str] = []
        node_ids = sorted(reg.nodes)
        for t in range(templates):
            tid = f"tpl-{t:024x}"
            reps = {}
            for nid in rnd.sample(node_ids, replicas):
                reps[nid] = ReplicaEntry(nid, "READY", "READY", rnd.choice(("OK", "OK", "UNKNOWN", "STALE")),
                                         rnd.random() < 0.5, f"art-{t:024x}")
            index._put(TemplateEntry(tid, f"app-{t}", "READY", 512, reps))  # what the start-up build puts
            names.append(tid if t % 2 else f"app-{t}")
        index.ready = True

        async def run() -> list[float]:
            lat = []
            for _ in range(calls):
                name = rnd.choice(names)
                t0 = time.perf_counter()
                try:
                    await index.resolve(name)
                except Exception:  # noqa: BLE001 — a template whose replicas are all STALE answers an error: timed too
                    pass
                lat.append((time.perf_counter() - t0) * 1000)
            return lat
        t0 = time.perf_counter()
        lat = asyncio.run(run())
        total = time.perf_counter() - t0
        assert index.loads == 0, "a warm index must not touch the database"
        lat.sort()
        engine.dispose()
        return {"templates": templates, "nodes": nodes, "replicas_per_template": replicas, "calls": calls,
                "resolves_per_s": round(calls / total), "p50_ms": round(lat[len(lat) // 2], 4),
                "p99_ms": round(lat[int(len(lat) * 0.99)], 4), "max_ms": round(lat[-1], 3), "target_p99_ms": 1.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--templates", type=int, default=10_000)
    ap.add_argument("--nodes", type=int, default=1_000)
    ap.add_argument("--replicas", type=int, default=10, help="READY replicas per template")
    ap.add_argument("--calls", type=int, default=50_000)
    ap.add_argument("--skip-boot", action="store_true")
    args = ap.parse_args()
    result: dict[str, Any] = {}
    print(f"resolve: {args.templates} templates × {args.nodes} nodes, {args.calls} calls …", flush=True)
    result["resolve"] = resolve_bench(args.templates, args.nodes, args.replicas, args.calls)
    r = result["resolve"]
    print(f"resolve: {r['resolves_per_s']}/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms", flush=True)
    if not args.skip_boot:
        if not HAVE_QEMU:
            sys.exit(f"boot bench: {NEEDS_QEMU}")
        result["boot"] = boot_bench(args.rounds)
        b = result["boot"]
        print(f"boot: cold {b['cold_ready_ms']} ms, restore {b['restore_ready_ms']} ms to ready "
              f"= {b['restore_over_cold']} of a cold boot (target ≤ 0.1)", flush=True)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
