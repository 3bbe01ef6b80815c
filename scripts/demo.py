#!/usr/bin/env python3
"""`make demo`: a coordinator (SQLite under ./.demo/) and three agents on loopback.

Shows the node lifecycle (the agents join, turn READY, one is cordoned and uncordoned), then
the main job: a small sample image (busybox, written as an OCI archive by the test OCI writer)
becomes a template on all three agents — built once, copied agent to agent — and
`tcctl template show` lists its READY replicas (demo-1, the QEMU host, with a memory
snapshot); then the compat matrix and the storage status, and a sandbox restored from that
snapshot: its console; a snapshot of the running sandbox, which runs on; a rollback (the
console goes back to the snapshot's tick); a commit of the sandbox to a new template on all
three nodes, the compat matrix again, a sandbox from the committed template (it goes on from
the committed state), and the clean-up.
On a terminal it keeps running until Ctrl-C; otherwise (CI, pipes) it stops by itself.
`make demo-stop` (scripts/demo.py --stop) stops a demo left running elsewhere.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / ".demo"
RUN = DEMO / "run"
PIDS = DEMO / "pids.json"
ADMIN = f"ipc://{RUN}/admin.sock"
PY = sys.executable
NODES = ("demo-1", "demo-2", "demo-3")
SANDBOX_NODE = "demo-1"  # the one with a QEMU runtime; the others are build-only


def port(preferred: int) -> int:
    for p in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
                return s.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError("no free port")


def sets(pairs: dict[str, str]) -> list[str]:
    return [a for k, v in pairs.items() for a in ("--set", f"{k}={v}")]


def tcctl(*args: str, json_out: bool = False, timeout: float = 5) -> subprocess.CompletedProcess[str]:
    argv = [PY, "-m", "coordinator.cli.main", *args, "--endpoint", ADMIN, "--timeout", str(timeout)]
    return subprocess.run(argv + (["--json"] if json_out else []), capture_output=True, text=True, cwd=ROOT)


def show(*args: str, timeout: float = 5) -> None:
    print(f"\n$ tcctl {' '.join(args)}", flush=True)
    r = tcctl(*args, timeout=timeout)
    print((r.stdout + r.stderr).rstrip(), flush=True)


def call(*args: str, timeout: float = 5) -> dict:
    """A tcctl call whose answer the demo reads (--json); the command is printed first."""
    print(f"\n$ tcctl {' '.join(args)}", flush=True)
    r = tcctl(*args, json_out=True, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"demo: tcctl {' '.join(args)} failed: {(r.stdout + r.stderr).strip()}")
    return json.loads(r.stdout)


def ticks(sid: str) -> list[int]:
    """The tick numbers on the sandbox's console, in order."""
    out = tcctl("sandbox", "show", sid, "--console", json_out=True, timeout=30)
    if out.returncode != 0:
        return []
    text = json.loads(out.stdout)["sandbox"].get("console", "")
    return [int(w.split()[1]) for w in text.replace("\r", "").splitlines()
            if w.startswith("tick ") and w.split()[1].isdigit()]


def wait(pred, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}; logs are in {DEMO}")
        time.sleep(0.2)


def health() -> dict[str, str]:
    """Node health, once its first heartbeat has brought storage figures."""
    r = tcctl("node", "list", json_out=True)
    if r.returncode != 0:
        return {}
    return {n["node_id"]: n["health"] for n in json.loads(r.stdout)["nodes"] if n["storage"]["total"]}


def stop_pids() -> None:
    if not PIDS.exists():
        print("demo: nothing to stop")
        return
    pids = json.loads(PIDS.read_text())
    for name, pid in pids.items():
        try:
            os.kill(pid, signal.SIGTERM)
            print(f"demo: stopped {name} (pid {pid})")
        except ProcessLookupError:
            pass
    PIDS.unlink()


def guest_kernel() -> str:
    """The newest guest kernel `make guest-kernel` fetched (RT-5), or "" without one."""
    boot = Path(os.environ.get("HOME", "/root")) / ".cache" / "templatecenter" / "guest" / "boot"
    kernels = sorted(boot.glob("vmlinuz-*")) if boot.is_dir() else []
    return str(kernels[-1]) if kernels else ""


def sample_image() -> str:
    """An oci-archive with busybox (static, from the busybox-static package) and a few files."""
    sys.path.insert(0, str(ROOT))
    from tests import oci
    from tests.layers import Dir, File, Symlink, layer
    busybox = Path("/bin/busybox")
    files = [Dir("bin"), Dir("etc"), Dir("tmp", mode=0o1777),
             File("etc/os-release", b"NAME=templatecenter-demo\nID=tc-demo\n"),
             File("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n"), File("etc/group", b"root:x:0:\n"),
             File("etc/motd", b"built by make demo\n")]
    if busybox.exists():
        files += [File("bin/busybox", busybox.read_bytes(), mode=0o755), Symlink("bin/sh", "busybox"),
                  Symlink("bin/cat", "busybox"), Symlink("bin/sleep", "busybox"), Symlink("bin/sync", "busybox")]
    # The entrypoint ticks on the console and keeps its last tick on disk (synced, so an export
    # for a commit sees it): a restored or rolled-back sandbox visibly goes on from its state.
    tick = ("cat /etc/motd; [ -e /last-tick ] && echo resumed from disk tick $(cat /last-tick); i=0; "
            "while :; do echo tick $i; echo $i > /last-tick; sync; i=$((i+1)); sleep 0.5; done")
    img = oci.image([layer(files), layer([File("etc/motd", b"built by make demo, layer 2\n")])],
                    config={"Entrypoint": ["/bin/sh", "-c", tick], "Env": ["PATH=/bin"]})
    (DEMO / "import").mkdir(parents=True, exist_ok=True)
    path = DEMO / "import" / "sample.tar"
    oci.write_oci_archive(path, img, tag="v1")
    return f"oci-archive:{path}:v1"


def snapshot_rollback_commit(sid: str) -> None:
    """The rest of the main job: snapshot the running sandbox, let it run on, roll it back (its
    console goes back to the snapshot's tick), commit it to a new template on all three nodes."""
    print("\ndemo: snapshot the running sandbox; it pauses briefly and runs on", flush=True)
    snap = call("snapshot", "create", sid, "--name", "demo-snap", "--request-id", f"demo-snap-{int(time.time())}",
                timeout=300)
    at = ticks(sid)[-1]
    print(f"snapshot {snap['snapshot_id']} {snap['status']}: paused {snap['pause_ms']} ms at about tick {at}",
          flush=True)
    wait(lambda: (ticks(sid) or [0])[-1] >= at + 8, 60, "the sandbox to run on")
    print(f"demo: the sandbox ran on to tick {ticks(sid)[-1]}; now roll it back", flush=True)
    rb = call("snapshot", "rollback", sid, snap["snapshot_id"], "--request-id", f"demo-rb-{int(time.time())}",
              timeout=300)
    print(f"sandbox {sid} back at {snap['snapshot_id']} (generation {rb['generation']}) in {rb['restore_ms']} ms",
          flush=True)
    wait(lambda: len(ticks(sid)) >= 3, 60, "ticks after the rollback")
    seen = ticks(sid)
    print(f"demo: after the rollback the console counts on from tick {seen[0]}: {seen[:6]}", flush=True)
    show("snapshot", "list")
    print("\ndemo: commit the running sandbox to a new template on all three nodes", flush=True)
    show("template", "create", "--from-sandbox", sid, "--nodes", ",".join(NODES), "--alias", "demo-commit",
         "--wait", "--request-id", f"demo-commit-{int(time.time())}", timeout=600)
    show("template", "show", "demo-commit")
    show("compat", "matrix")
    made = call("sandbox", "create", "--template", "demo-commit", "--request-id", f"demo-from-commit-{int(time.time())}",
                timeout=300)["sandbox"]
    print(f"sandbox {made['sandbox_id']} {made['state']} on {made['node_id']}, restore {made['restore']}", flush=True)
    wait(lambda: len(ticks(made["sandbox_id"])) >= 2, 60, "the committed sandbox's console")
    print(f"demo: it goes on from the committed sandbox's state: ticks {ticks(made['sandbox_id'])[:4]}", flush=True)
    show("sandbox", "destroy", made["sandbox_id"], timeout=60)
    show("sandbox", "destroy", sid, timeout=60)
    show("snapshot", "delete", snap["snapshot_id"], "--request-id", f"demo-snap-del-{int(time.time())}",
         timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stop", action="store_true", help="stop a running demo")
    a = ap.parse_args()
    if a.stop:
        stop_pids()
        return 0
    if PIDS.exists():
        stop_pids()  # a previous demo left running
    # Each demo starts from an empty cluster (keys, databases, stores); the sample image is kept.
    if DEMO.exists():
        for path in DEMO.iterdir():
            if path.name != "import":
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    RUN.mkdir(parents=True, exist_ok=True)
    agent_port = port(7710)
    common = {"security.curve": "true", "zmq.linger": "200ms"}
    # CURVE (SEC-1..SEC-4): the coordinator's key pair and each agent's are made here, the way a
    # provisioning system would, and the agents' public keys go into the pre-accepted directory,
    # so the demo accepts its own three agents and nothing else.
    sys.path.insert(0, str(ROOT))
    from protocol import keys as curve
    coord_key = curve.load_or_create(DEMO / "coord" / "keys", "coordinator").public
    accepted = DEMO / "accepted"
    accepted.mkdir(exist_ok=True)
    for node in NODES:
        curve.load_or_create(DEMO / "agents" / node / "keys", "agent")
        (accepted / f"{node}.key").write_bytes((DEMO / "agents" / node / "keys" / "agent.key").read_bytes())
    print(f"demo: CURVE on; coordinator key {curve.fingerprint(coord_key)}, "
          f"{len(NODES)} agent keys pre-accepted in {accepted}", flush=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    coord = [PY, "-m", "coordinator.main", "--migrate", *sets({
        **common, "db.url": f"sqlite:///{DEMO}/coordinator.db", "coordinator.state_dir": str(DEMO / "coord"),
        "coordinator.accepted_keys_dir": str(accepted),
        "coordinator.agent_endpoint": f"tcp://127.0.0.1:{agent_port}", "coordinator.admin_endpoint": ADMIN,
        "coordinator.events_endpoint": f"ipc://{RUN}/events.sock", "heartbeat.interval": "1s",
        "heartbeat.failover_grace": "5s"})]
    print(f"demo: starting the coordinator (agents on tcp://127.0.0.1:{agent_port}, admin {ADMIN})", flush=True)
    procs["coordinator"] = subprocess.Popen(coord, cwd=ROOT, stdout=open(DEMO / "coordinator.log", "ab"),
                                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait(lambda: tcctl("node", "list").returncode == 0, 30, "the coordinator")
        kernel = guest_kernel()
        for node in NODES:
            if node == SANDBOX_NODE and kernel:
                # The sandbox host: QEMU microVMs. TCG, because KVM is rarely usable where demos
                # run (RT-3's canary would spend 20 s finding that out); guest_image and
                # hypervisor versions come from the kernel, initramfs and QEMU (RT-6).
                runtime = {"runtime.driver": "qemu", "runtime.accel": "tcg", "runtime.guest_kernel": kernel}
            else:
                # Build-only nodes: no sandbox runtime; what replicas pin says so (COMPAT-1).
                runtime = {"runtime.driver": "none", "agent.versions.guest_image": "demo-guest-1",
                           "agent.versions.hypervisor": "none"}
            argv = [PY, "-m", "agent.main", *sets({
                **common, "agent.node_id": node, "agent.state_dir": f"{DEMO}/agents/{node}",
                "agent.coordinators": f"tcp://127.0.0.1:{agent_port}", "agent.blob_endpoint": "tcp://127.0.0.1:*",
                "agent.address": "127.0.0.1", "agent.labels.demo": "yes",
                "agent.coordinator_keys": coord_key, "image.local_roots": f'["{DEMO}/import"]', **runtime})]
            print(f"demo: starting agent {node}", flush=True)
            procs[node] = subprocess.Popen(argv, cwd=ROOT, stdout=open(DEMO / f"agent-{node}.log", "ab"),
                                           stderr=subprocess.STDOUT, start_new_session=True)
        PIDS.write_text(json.dumps({k: p.pid for k, p in procs.items()}))
        wait(lambda: all(health().get(n) == "READY" for n in NODES), 60, "three READY nodes")
        show("node", "list")
        show("node", "keys")
        show("node", "cordon", "demo-3", "--request-id", "demo-cordon")
        show("node", "list", "--admin", "CORDONED")
        show("node", "uncordon", "demo-3", "--request-id", "demo-uncordon")
        show("node", "show", "demo-1")
        image = sample_image()
        print(f"demo: the main job: a template from {image}, built on demo-1, on all three agents", flush=True)
        show("template", "create", "--image", image, "--builder", "demo-1", "--alias", "demo", "--wait",
             "--snapshot-mode", "memory", "--memory-mib", "256", "--request-id", f"demo-create-{int(time.time())}")
        show("template", "show", "demo")
        show("job", "list")
        show("compat", "matrix")
        show("storage", "status")
        if kernel:
            print(f"demo: a sandbox from the template, restored from {SANDBOX_NODE}'s memory snapshot", flush=True)
            show("resolve", "demo")
            r = tcctl("sandbox", "create", "--template", "demo", "--request-id", f"demo-sbx-{int(time.time())}",
                      json_out=True)
            print("\n$ tcctl sandbox create --template demo", flush=True)
            sid = ""
            if r.returncode == 0:
                sbx = json.loads(r.stdout)["sandbox"]
                sid = sbx["sandbox_id"]
                print(f"sandbox {sid} {sbx['state']} on {sbx['node_id']}, restore {sbx['restore']}, "
                      f"ready in {sbx.get('ready_ms')} ms", flush=True)
            else:
                print((r.stdout + r.stderr).strip(), flush=True)
            if sid:
                wait(lambda: "tick 3" in tcctl("sandbox", "show", sid, "--console").stdout, 60, "the console")
                show("sandbox", "list")
                show("sandbox", "show", sid, "--console")
                snapshot_rollback_commit(sid)
        else:
            print("demo: no guest kernel in ~/.cache/templatecenter/guest (make guest-kernel): no sandbox",
                  flush=True)
        if sys.stdin.isatty():
            print(f"\ndemo: running. Try `.venv/bin/tcctl node list --endpoint {ADMIN}`. "
                  "Ctrl-C stops everything (or `make demo-stop` from another shell).", flush=True)
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        print("\ndemo: stopping", flush=True)
        for p in reversed(list(procs.values())):
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        PIDS.unlink(missing_ok=True)
        print(f"demo: all stopped; logs in {DEMO}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
