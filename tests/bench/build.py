"""Image build benchmark (issue 4): BUILD_ARTIFACT against its floor, and the layer cache.

Same run, same image (Debian bookworm minbase, 3 layers, tests/debian.py):

* floor    GNU tar extracts the gzip layers in order into a directory, then ``mke2fs -d``
           builds the ext4 (the two tools our builder stands for, nothing else);
* cold     our BUILD_ARTIFACT from an empty agent store: pull from a loopback registry,
           verify, unpack safely, size, mke2fs, reproducibility post-pass, e2fsck, sha256;
* derived  BUILD_ARTIFACT of an image that adds one layer on the same base, on the agent
           that built the base (its layer cache holds the base layers).

Targets: cold ≤ 1.15 × floor, derived ≤ 0.5 × cold. Each figure is the median of
``--rounds`` runs. Prints progress, then one JSON line.

    .venv/bin/python tests/bench/build.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.catalog import Catalog  # noqa: E402
from agent.config import load_config  # noqa: E402
from agent.image import ext4  # noqa: E402
from agent.image.service import ImageService  # noqa: E402
from tests import debian, oci  # noqa: E402
from tests.layers import Dir, File, layer  # noqa: E402
from tests.registry import Registry  # noqa: E402


def settle() -> None:
    """Write back what earlier steps left dirty, so no step pays for another's I/O."""
    subprocess.run(["sync"], check=True)


def floor_once(blobs: list[Path], work: Path, writable: int) -> float:
    """GNU tar + mke2fs -d with our sizing (so both make the same size of file system)."""
    root = work / "floor-root"
    img = work / "floor.ext4"
    root.mkdir()
    settle()
    t0 = time.perf_counter()
    for blob in blobs:
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xzpf", str(blob),
                        "-C", str(root)], check=True)
    cfg = load_config().build
    sizing = ext4.size_tree(root, writable, cfg)
    with open(img, "wb") as fh:
        fh.truncate(sizing.size)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-N", str(sizing.inodes), "-J",
                    f"size={sizing.journal >> 20}", "-L", "rootfs", "-E",
                    "root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0", "-d", str(root), str(img)],
                   check=True)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(root)
    img.unlink()
    return elapsed


def build_once(state: Path, registry: Registry, image: str, artifact: str, writable: int) -> float:
    state.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, [f"agent.state_dir={state}", f'image.insecure_registries=["{registry.host}"]'])
    catalog = Catalog.open(str(state))
    try:
        service = ImageService(cfg, catalog)
        settle()
        t0 = time.perf_counter()
        result = service.build(artifact, image, writable=writable)
        elapsed = time.perf_counter() - t0
        print(f"    {artifact}: {elapsed:.2f} s {result['timings']}", flush=True)
        return elapsed
    finally:
        catalog.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--writable", type=int, default=256 << 20)
    args = ap.parse_args()

    print("preparing the Debian minbase image (cached after the first run) ...", flush=True)
    tars = debian.layers()
    base = oci.image(tars, compression="gzip", created="2024-06-01T00:00:00Z")
    extra = layer([Dir("opt"), File("opt/app.bin", os.urandom(4 << 20), mode=0o755)])
    derived = oci.image([*tars, extra], compression="gzip", created="2024-06-02T00:00:00Z")
    print(f"  base: {len(base.layers)} layers, {sum(b.size for b in base.layers) >> 20} MiB compressed, "
          f"{sum(len(t) for t in tars) >> 20} MiB of tar", flush=True)

    with tempfile.TemporaryDirectory(prefix="tc-bench-build-") as tmp:
        work = Path(tmp)
        blobs = []
        for i, b in enumerate(base.layers):
            path = work / f"layer{i}.tar.gz"
            path.write_bytes(b.data)
            blobs.append(path)
        with Registry(work / "registry", mode="none") as registry:
            registry.push("bench/base", "1", base)
            registry.push("bench/derived", "1", derived)
            floors, colds, deriveds = [], [], []
            for r in range(args.rounds):
                floors.append(floor_once(blobs, work, args.writable))
                state = work / f"agent-{r}"
                colds.append(build_once(state, registry, f"{registry.host}/bench/base:1", "art-" + f"{r:024x}",
                                        args.writable))
                deriveds.append(build_once(state, registry, f"{registry.host}/bench/derived:1",
                                           "art-" + f"{r + 100:024x}", args.writable))
                shutil.rmtree(state)
                print(f"  round {r + 1}: floor {floors[-1]:.2f} s, cold {colds[-1]:.2f} s, "
                      f"derived {deriveds[-1]:.2f} s", flush=True)
    floor, cold, der = (statistics.median(x) for x in (floors, colds, deriveds))
    result = {"bench": "build", "rounds": args.rounds, "floor_s": round(floor, 3), "cold_s": round(cold, 3),
              "derived_s": round(der, 3), "cold_over_floor": round(cold / floor, 3),
              "derived_over_cold": round(der / cold, 3), "targets": {"cold_over_floor": 1.15,
                                                                     "derived_over_cold": 0.5}}
    print(f"cold / floor = {result['cold_over_floor']} (target ≤ 1.15); "
          f"derived / cold = {result['derived_over_cold']} (target ≤ 0.5)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
