"""Test support: real processes on free ports, polled with timeouts (DESIGN §6, STYLE 12).

Nothing here sleeps for a fixed time: ``wait_for`` polls a predicate until it holds or the
deadline passes, and then fails with what it last saw.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def async_wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> None:
    """``wait_for`` for coroutines: poll ``pred`` without blocking the event loop."""
    import asyncio
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``pred`` until it returns a truthy value; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = pred()
        except Exception as exc:  # noqa: BLE001 — report the last failure if we time out
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)  # polling interval, not a fixed wait for an outcome


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> "Proc":
        self.log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                      cwd=REPO, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            assert self.popen is not None
            os.kill(self.popen.pid, sig)
            self.popen.wait(timeout=30)
        self.log.close()

    def stop(self, timeout: float = 15.0) -> int | None:
        if not self.alive():
            return self.popen.returncode if self.popen else None
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(timeout=10)
        finally:
            self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Cluster:
    """A coordinator and agents as real processes in ``root`` (a tmp dir)."""
    root: Path
    db_url: str
    heartbeat: str = "200ms"
    lease_ttl_min: str = "1500ms"
    grace: str = "30s"
    coord_extra: list[str] = field(default_factory=list)
    curve: bool = False  # SEC-1: CURVE on the agent endpoint, agents pin the coordinator key
    agent_port: int = field(default_factory=free_port)
    coordinator: Proc | None = None
    agents: dict[str, Proc] = field(default_factory=dict)
    # ipc paths must stay under the 107-byte sun_path limit, so sockets live in a short dir.
    run_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tc-", dir="/tmp")))

    @property
    def admin(self) -> str:
        return f"ipc://{self.run_dir}/admin.sock"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def coordinator_argv(self, migrate: bool = True) -> list[str]:
        sets = {
            "security.curve": str(self.curve).lower(),
            "db.url": self.db_url,
            "coordinator.state_dir": f"{self.root}/coord",
            "coordinator.agent_endpoint": f"tcp://127.0.0.1:{self.agent_port}",
            "coordinator.admin_endpoint": self.admin,
            "coordinator.events_endpoint": f"ipc://{self.run_dir}/events.sock",
            "heartbeat.interval": self.heartbeat,
            "heartbeat.lease_ttl_min": self.lease_ttl_min,
            "heartbeat.failover_grace": self.grace,
        }
        argv = [PY, "-m", "coordinator.main"] + (["--migrate"] if migrate else [])
        for k, v in sets.items():
            argv += ["--set", f"{k}={v}"]
        for extra in self.coord_extra:
            argv += ["--set", extra]
        return argv

    def start_coordinator(self, migrate: bool = True) -> Proc:
        # Two coordinators on one endpoint would leak the first past stop(): refuse.
        assert self.coordinator is None or not self.coordinator.alive(), "a coordinator is already running"
        self.coordinator = Proc("coordinator", self.coordinator_argv(migrate), self.root / "coordinator.log",
                                self.env()).start()
        wait_for(lambda: self.tcctl("node", "list", timeout=2)[0] == 0 or not self.coordinator.alive(),
                 30, "the coordinator to answer node list")
        assert self.coordinator.alive(), self.coordinator.output()[-4000:]
        return self.coordinator

    def agent_argv(self, node_id: str, extra: list[str] | None = None) -> list[str]:
        sets = {
            "security.curve": str(self.curve).lower(),
            "agent.node_id": node_id,
            "agent.state_dir": f"{self.root}/agents/{node_id}",
            "agent.coordinators": f"tcp://127.0.0.1:{self.agent_port}",
            "agent.blob_endpoint": "tcp://127.0.0.1:*",
            "agent.address": "127.0.0.1",
            "agent.backoff_initial": "100ms",
            "agent.backoff_max": "1s",
            "runtime.driver": "none",
        }
        if self.curve:
            sets["agent.coordinator_keys"] = self.coordinator_key()
        argv = [PY, "-m", "agent.main"]
        for k, v in sets.items():
            argv += ["--set", f"{k}={v}"]
        for e in extra or []:
            argv += ["--set", e]
        return argv

    def start_agent(self, node_id: str, extra: list[str] | None = None, name: str | None = None) -> Proc:
        """Start an agent; ``name`` (default the node id) names its log and its slot in ``agents``."""
        name = name or node_id
        p = Proc(name, self.agent_argv(node_id, extra), self.root / f"agent-{name}.log", self.env()).start()
        self.agents[name] = p
        return p

    def coordinator_key(self) -> str:
        """The coordinator's public key, made at its first start (SEC-2)."""
        from protocol.keys import load_public
        return load_public(self.root / "coord" / "keys" / "coordinator.key")

    def agent_key(self, node_id: str) -> str:
        from protocol.keys import load_public
        return load_public(self.root / "agents" / node_id / "keys" / "agent.key")

    def tcctl(self, *args: str, timeout: float = 10) -> tuple[int, Any]:
        """Run tcctl with --json; returns (exit code, parsed document or raw text)."""
        r = subprocess.run([PY, "-m", "coordinator.cli.main", *args, "--json", "--endpoint", self.admin,
                            "--timeout", str(timeout)], capture_output=True, text=True, cwd=REPO,
                           timeout=timeout + 30, env=self.env())
        try:
            return r.returncode, json.loads(r.stdout)
        except json.JSONDecodeError:
            return r.returncode, r.stdout + r.stderr

    def ok(self, *args: str, timeout: float = 10) -> Any:
        """tcctl that must succeed: the parsed document."""
        rc, doc = self.tcctl(*args, timeout=timeout)
        assert rc == 0, (args, doc)
        return doc

    def err(self, *args: str, timeout: float = 10) -> dict[str, Any]:
        """tcctl that must fail with a coordinator error (exit 1): the error object."""
        rc, doc = self.tcctl(*args, timeout=timeout)
        assert rc == 1 and isinstance(doc, dict) and "error" in doc, (args, rc, doc)
        return doc["error"]

    def nodes(self) -> dict[str, dict[str, Any]]:
        rc, doc = self.tcctl("node", "list")
        assert rc == 0, doc
        return {n["node_id"]: n for n in doc["nodes"]}

    def health(self) -> dict[str, str]:
        return {k: v["health"] for k, v in self.nodes().items()}

    def stop(self) -> None:
        for p in self.agents.values():
            p.stop()
        if self.coordinator:
            self.coordinator.stop()
        # QEMU outlives its agent on purpose (RT-15): end every VM this cluster started.
        for pidfile in (self.root / "agents").glob("*/sandboxes/*/qemu.pid"):
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        shutil.rmtree(self.run_dir, ignore_errors=True)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


class Clock:
    """A settable clock for stores that take ``clock=`` (seconds)."""

    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- QEMU sandboxes (issue 7) ------------------------------------------------------------------

# The guest kernel `make guest-kernel` fetches (RT-5); `make test` depends on it.
GUEST_BOOT = Path(os.environ.get("HOME", "/root")) / ".cache" / "templatecenter" / "guest" / "boot"
GUEST_KERNELS = sorted(GUEST_BOOT.glob("vmlinuz-*")) if GUEST_BOOT.is_dir() else []
HAVE_QEMU = bool(GUEST_KERNELS) and shutil.which("qemu-system-x86_64") is not None
NEEDS_QEMU = "needs qemu-system-x86_64 and the guest kernel in ~/.cache/templatecenter/guest (make guest-kernel)"


def qemu_agent_extra() -> list[str]:
    """--set items for an agent with the qemu runtime under TCG (this machine's KVM cannot boot)."""
    return ["runtime.driver=qemu", "runtime.accel=tcg", f"runtime.guest_kernel={GUEST_KERNELS[-1]}"]
