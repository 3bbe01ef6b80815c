"""Sandboxes in real QEMU microVMs under TCG, driven through a real ``tc-agent`` by a test
ROUTER playing the coordinator (RT-1 to RT-16, DIST-9, COMPAT-7, CAT-1).

The template is a tiny busybox image whose entrypoint prints what it finds in ``/w`` (then
writes its own value there), then a counter every 100 ms, and touches ``/ready`` at count 5 —
the ``exec:`` probe waits for it, so a memory snapshot is always taken past count 5.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import pytest

from protocol.messages import Task
from tests import oci
from tests.fake_coordinator import Coordinator, hello_and_welcome, start_agent
from tests.layers import Dir, File, Symlink, layer
from tests.support import GUEST_KERNELS, HAVE_QEMU, NEEDS_QEMU, Proc, wait_for

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason=NEEDS_QEMU)

ART = "art-" + "5" * 24
TPL = "tpl-" + "6" * 24
SCRIPT = ('echo "found:$(cat /w 2>/dev/null)"; cat /proc/sys/kernel/random/uuid > /w; sync; i=0; '
          'while :; do echo "count $i"; [ $i = 5 ] && touch /ready && sync; i=$((i+1)); sleep 0.1; done')
RC = {"entrypoint": ["/bin/sh", "-c", SCRIPT], "cmd": [], "env": {"PATH": "/bin"}, "workdir": "/", "user": "0:0",
      "ports": []}
PROBE = "exec:test -e /ready"


class Driver:
    """Tasks over the fake coordinator, one id each."""

    def __init__(self, coord: Coordinator, ident: bytes) -> None:
        self.coord, self.ident, self.n = coord, ident, 0

    def run(self, op: str, args: dict[str, Any], timeout: float = 90) -> Any:
        self.n += 1
        task_id = "tsk-" + format(self.n, "024x")
        self.coord.send(self.ident, Task(msg_id=f"m-{self.n}", task_id=task_id, op=op, args=args, deadline=0))
        _, res = self.coord.expect_where(lambda _i, m: m.TYPE == "TASK_RESULT" and m.task_id == task_id,
                                         timeout, f"{op} result")
        return res


def sandbox_id(n: int) -> str:
    return "sbx-" + format(n, "024x")


def counts(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^count (\d+)", text, re.M)]


@pytest.fixture
def qemu_reaper(tmp_path: Path) -> Iterator[None]:
    """QEMU outlives agents on purpose (RT-15): end every VM of this test afterwards."""
    yield
    for pidfile in tmp_path.glob("*/sandboxes/*/qemu.pid"):
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def catalog_body(state: Path, kind: str, id_: str) -> dict[str, Any] | None:
    with sqlite3.connect(f"file:{state / 'catalog.db'}?mode=ro", uri=True) as c:
        row = c.execute("SELECT body FROM entries WHERE kind=? AND id=?", (kind, id_)).fetchone()
    return json.loads(row[0]) if row else None


def build_template(tmp_path: Path, tasks: Driver) -> Path:
    imports = tmp_path / "import"
    imports.mkdir()
    img = oci.image([layer([Dir("bin"), File("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755),
                            Symlink("bin/sh", target="busybox"), Dir("etc"),
                            File("etc/passwd", b"root:x:0:0:root:/:/bin/sh\ndaemon:x:1:1::/:/bin/sh\n"),
                            File("etc/group", b"root:x:0:\ndaemon:x:1:\n"), Dir("tmp", mode=0o1777)])])
    oci.write_oci_archive(imports / "bb.tar", img, tag="v1")
    res = tasks.run("BUILD_ARTIFACT", {"artifact_id": ART, "image": f"oci-archive:{imports / 'bb.tar'}:v1",
                                       "writable_size": 0, "manifest_digest": img.manifest_digest}, 60)
    assert res.ok, res.error
    return tmp_path / "state" / "store" / "artifacts" / ART / "rootfs.ext4"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cold_boot_memory_restore_isolation_and_restart(tmp_path: Path, coord: Coordinator, agents: list[Proc],
                                                        qemu_reaper: None) -> None:
    """RT-1..RT-12, RT-15, RT-16, DIST-9, COMPAT-7, CAT-1: cold boot shows the counter; a sandbox
    restored from the template memory snapshot continues past the snapshot's count; two
    sandboxes do not see each other's writes and the template ext4 is unchanged; an agent
    SIGKILL keeps a sandbox running and re-attached, a QEMU killed meanwhile is FAILED with
    RT-16's message; a changed guest image version refuses the restore (ReplicaIncompatible)."""
    state = tmp_path / "state"
    kernel = f"runtime.guest_kernel={GUEST_KERNELS[-1]}"
    common = [f'image.local_roots=["{tmp_path / "import"}"]', "runtime.driver=qemu", kernel,
              "runtime.kvm_canary_timeout=5s"]
    agent = start_agent(agents, tmp_path, [coord.endpoint], *common, "agent.versions.guest_image=")
    ident, hello = hello_and_welcome(coord)
    assert hello.capabilities["sandbox"] is True
    # RT-3: /dev/kvm here cannot boot a guest (or is absent): TCG, with the reason in the facts.
    assert hello.facts["accelerator"] == "tcg" and hello.facts["accel_reason"]
    # RT-6: <kernel release>+<12 hex>, from the kernel the config names.
    release = GUEST_KERNELS[-1].name.removeprefix("vmlinuz-")
    assert re.fullmatch(re.escape(release) + r"\+[0-9a-f]{12}", hello.versions["guest_image"])
    tasks = Driver(coord, ident)
    rootfs = build_template(tmp_path, tasks)
    template_sha = sha(rootfs)

    create = {"template_id": TPL, "artifact_id": ART, "runtime_config": RC, "vcpus": 1, "memory_mib": 256,
              "probe": PROBE, "restore": "cold"}
    a, b, c = sandbox_id(1), sandbox_id(2), sandbox_id(3)
    res = tasks.run("CREATE_SANDBOX", {**create, "sandbox_id": a})
    assert res.ok, res.error
    assert res.result["state"] == "RUNNING" and res.result["restored"] is False and res.result["exit_code"] is None
    cold_ready_ms = res.result["ready_ms"]

    def console(sid: str) -> str:
        r = tasks.run("CONSOLE_SANDBOX", {"sandbox_id": sid, "tail_bytes": 65536}, 10)
        assert r.ok, r.error
        return str(r.result["console"])

    def console_with(sid: str, n: int) -> str | None:
        text = console(sid)
        return text if len(counts(text)) >= n else None

    text = wait_for(lambda: console_with(a, 8), 30, "counter on A's console")
    assert counts(text)[0] == 0 and "found:\n" in text.replace("\r", "")  # a fresh boot starts from 0

    res = tasks.run("CREATE_SANDBOX", {**create, "sandbox_id": b})
    assert res.ok and res.result["state"] == "RUNNING", res.error
    text_b = wait_for(lambda: console_with(b, 1), 30, "counter on B's console")
    assert "found:\n" in text_b.replace("\r", "")  # B does not see A's write to /w (RT-10)

    # RT-7/RT-8: env, workdir and user reach the command; its exit code ends the VM (EXITED).
    quick = {"entrypoint": ["/bin/sh", "-c", 'echo "uid=$(busybox id -u) cwd=$(pwd) X=$X"; exit 3'],
             "env": {"PATH": "/bin", "X": "it's y"}, "workdir": "/tmp", "user": "daemon"}
    e = sandbox_id(5)
    res = tasks.run("CREATE_SANDBOX", {**create, "sandbox_id": e, "runtime_config": quick, "probe": "started"})
    assert res.ok and res.result["state"] in ("RUNNING", "EXITED"), res.error
    ended = wait_for(lambda: (body := catalog_body(state, "sandbox", e)) and body["state"] != "RUNNING" and body,
                     30, "the quick sandbox EXITED")
    assert ended["state"] == "EXITED" and ended["exit_code"] == 3
    assert "uid=1 cwd=/tmp X=it's y" in console(e)

    # Idempotent by sandbox id: a re-sent create (new task id) returns the current state.
    again = tasks.run("CREATE_SANDBOX", {**create, "sandbox_id": a})
    assert again.ok and again.result["state"] == "RUNNING" and again.result["sandbox_id"] == a

    # DIST-9: boot the template once, probe, snapshot, always destroy the VM.
    prep = tasks.run("PREPARE_REPLICA", {k: create[k] for k in ("template_id", "artifact_id", "runtime_config",
                                                               "vcpus", "memory_mib", "probe")})
    assert prep.ok, prep.error
    assert prep.result["has_memory_snapshot"] is True
    assert prep.result["pins"]["guest_image"] == hello.versions["guest_image"]
    assert prep.result["facts"]["accelerator"] == "tcg"
    assert not (state / "sandboxes" / f"{TPL}_0").exists()
    replica = catalog_body(state, "replica", TPL)
    assert replica and replica["memory"] is True and replica["artifact_id"] == ART

    res = tasks.run("CREATE_SANDBOX", {**create, "sandbox_id": c, "restore": "memory"})
    assert res.ok, res.error
    assert res.result["restored"] is True and res.result["state"] == "RUNNING"
    restore_ready_ms = res.result["ready_ms"]
    text_c = wait_for(lambda: console_with(c, 3), 20, "counter on C's console")
    # Memory is real: the counter continues past the probe's count 5 instead of restarting at 0,
    # and the entrypoint's first line never ran again.
    assert counts(text_c)[0] > 5 and "found:" not in text_c
    print(f"\nTCG cold boot to ready {cold_ready_ms} ms; memory restore to ready {restore_ready_ms} ms")

    body = catalog_body(state, "sandbox", c)
    assert body and body["template_id"] == TPL and body["state"] == "RUNNING" and body["restored"] is True
    assert sha(rootfs) == template_sha  # RT-10: the template ext4 is never written

    # RT-15/RT-16: SIGKILL the agent; B's QEMU dies while the agent is down.
    agent.kill()
    wait_for(lambda: not agent.alive(), 10, "agent gone")
    b_pid = int((state / "sandboxes" / b / "qemu.pid").read_text())
    os.kill(b_pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{b_pid}").exists() or "Z" in Path(f"/proc/{b_pid}/stat").read_text().split()[2],
             10, "B's QEMU gone")
    start_agent(agents, tmp_path, [coord.endpoint], *common, "agent.versions.guest_image=another-guest")
    ident, hello = hello_and_welcome(coord)
    tasks.ident = ident
    assert catalog_body(state, "sandbox", a)["state"] == "RUNNING"  # type: ignore[index]
    failed = catalog_body(state, "sandbox", b)
    assert failed and failed["state"] == "FAILED" and failed["error"] == "process not found after agent restart"
    assert (state / "sandboxes" / b).is_dir()  # its disk stays
    before = len(counts(console(a)))
    wait_for(lambda: len(counts(console(a))) > before + 2, 20, "A still counting after the restart")

    # COMPAT-7: the snapshot pinned another guest image version.
    refused = tasks.run("CREATE_SANDBOX", {**create, "sandbox_id": sandbox_id(4), "restore": "memory"})
    assert not refused.ok and refused.error["name"] == "ReplicaIncompatible"
    assert "guest_image" in refused.error["message"]

    # RT-15: destroy via the re-attached QMP socket; an absent sandbox destroys successfully.
    for sid in (a, b, c, e):
        d = tasks.run("DESTROY_SANDBOX", {"sandbox_id": sid}, 30)
        assert d.ok and d.result["destroyed"] is True, d.error
        assert catalog_body(state, "sandbox", sid) is None and not (state / "sandboxes" / sid).exists()
    gone = tasks.run("DESTROY_SANDBOX", {"sandbox_id": a}, 10)
    assert gone.ok and gone.result["destroyed"] is False
    missing = tasks.run("CONSOLE_SANDBOX", {"sandbox_id": a, "tail_bytes": 10}, 10)
    assert not missing.ok and missing.error["name"] == "SandboxNotFound"
    removed = tasks.run("REMOVE_REPLICA", {"template_id": TPL}, 10)
    assert removed.ok and not (state / "replicas" / TPL).exists()
    assert sha(rootfs) == template_sha


def test_none_driver_refuses_sandbox_work(tmp_path: Path, coord: Coordinator, agents: list[Proc]) -> None:
    """RT-2: a `none` node reports sandbox = false and answers every sandbox task with
    SandboxUnsupported naming the node and the driver."""
    start_agent(agents, tmp_path, [coord.endpoint], "runtime.driver=none")
    ident, hello = hello_and_welcome(coord)
    assert hello.capabilities["sandbox"] is False
    tasks = Driver(coord, ident)
    for op, args in (("CREATE_SANDBOX", {"sandbox_id": sandbox_id(9), "template_id": TPL, "artifact_id": ART}),
                     ("DESTROY_SANDBOX", {"sandbox_id": sandbox_id(9)}),
                     ("CONSOLE_SANDBOX", {"sandbox_id": sandbox_id(9), "tail_bytes": 10}),
                     ("PREPARE_REPLICA", {"template_id": TPL, "artifact_id": ART})):
        res = tasks.run(op, args, 10)
        assert not res.ok and res.error["name"] == "SandboxUnsupported", (op, res.error)
        assert res.error["message"] == f"node {hello.node_id} has no sandbox runtime (driver none)"


def test_forced_kvm_needs_a_working_canary(tmp_path: Path, coord: Coordinator, agents: list[Proc]) -> None:
    """RT-3: with runtime.accel = kvm the agent runs on KVM only if the canary guest reaches
    init; otherwise (this CI host: /dev/kvm cannot boot guests) it stops, naming the reason."""
    agent = start_agent(agents, tmp_path, [coord.endpoint], "runtime.driver=qemu", "runtime.accel=kvm",
                        f"runtime.guest_kernel={GUEST_KERNELS[-1]}", "runtime.kvm_canary_timeout=5s")
    wait_for(lambda: not agent.alive() or "HELLO" in repr([m.TYPE for _, m in coord.seen]) or None, 30,
             "the agent to stop or say HELLO")
    if agent.alive():
        _, hello = hello_and_welcome(coord)
        assert hello.facts["accelerator"] == "kvm"
    else:
        assert agent.popen is not None and agent.popen.returncode == 1
        assert "runtime.accel = kvm but" in agent.output()
