"""Runtime driver logic without VMs: the ``none`` driver (RT-2), the control-channel parser
(RT-8), probe validation (RT-9), the restore compatibility check (COMPAT-7) and RT-6's
versions under ``agent.versions`` overrides."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent import facts as host
from agent.catalog import Catalog
from agent.config import load_config
from agent.runtime import NoneDriver, make_driver
from agent.runtime.qemu import Control
from agent.runtime.sandboxes import SandboxService, _check_probe
from agent.tasks import TaskContext
from protocol.errors import InvalidRequest, ReplicaIncompatible, SandboxUnsupported

PINS = {"guest_image": "6.1+abc", "agent": "0.1.0", "hypervisor": "7.2.22", "host_kernel": "6.1.0"}
FACTS = {"accelerator": "tcg", "cpu_flags_hash": "f" * 16}


def cfg(tmp_path: Path, *sets: str):  # noqa: ANN201 — AgentConfig
    return load_config(None, [f"agent.state_dir={tmp_path}", "security.curve=false", "agent.node_id=n1", *sets])


def service(tmp_path: Path, versions: dict[str, str], facts: dict[str, str], driver=None) -> SandboxService:  # noqa: ANN001
    tmp_path.mkdir(parents=True, exist_ok=True)
    c = cfg(tmp_path, "runtime.driver=none")
    return SandboxService(c, Catalog.open(str(tmp_path)), driver or NoneDriver("n1"), lambda: versions,
                          lambda: facts)


def test_none_driver_refuses_every_sandbox_task(tmp_path: Path) -> None:
    """RT-2: SandboxUnsupported "node N has no sandbox runtime (driver none)", before any
    argument is validated."""
    svc = service(tmp_path, PINS, FACTS)
    assert make_driver(cfg(tmp_path, "runtime.driver=none")).sandbox is False
    for op, handler in svc.handlers().items():
        with pytest.raises(SandboxUnsupported, match=r"^node n1 has no sandbox runtime \(driver none\)$"):
            handler(TaskContext("tsk-1", op, {"sandbox_id": "bogus"}, lambda _: None))


def test_control_lines_parse_with_carriage_returns() -> None:
    """RT-8: started, ready, exited CODE, failed REASON (hvc0 adds \\r)."""
    c = Control("started\r\nready\r\nexited 7\r\n")
    assert (c.started, c.ready, c.exit_code, c.failed) == (True, True, 7, "")
    assert Control("started\r\n").ready is False and Control("").exit_code is None
    assert Control("failed cannot mount /dev/vda\n").failed == "cannot mount /dev/vda"


@pytest.mark.parametrize("probe", ["started", "exec:test -e /ready", "delay:3"])
def test_valid_probes(probe: str) -> None:
    """RT-9."""
    _check_probe(probe)


@pytest.mark.parametrize("probe", ["", "exec:", "delay:x", "delay:-1", "http:80", "exec:a\nb", 5])
def test_invalid_probes(probe: object) -> None:
    """RT-9, §1: anything else is InvalidRequest naming the probe field."""
    with pytest.raises(InvalidRequest) as err:
        _check_probe(probe)
    assert err.value.details["field"] == "probe"


def test_restore_compat_names_what_differs(tmp_path: Path) -> None:
    """COMPAT-7: equal pins and facts pass; any difference is ReplicaIncompatible naming it."""
    body = {"pins": PINS, "facts": FACTS, "memory": True}
    service(tmp_path / "a", PINS, FACTS).check_compat("tpl-" + "1" * 24, body)
    with pytest.raises(ReplicaIncompatible) as err:
        service(tmp_path / "b", {**PINS, "guest_image": "6.1+def"}, {**FACTS, "accelerator": "kvm"}).check_compat(
            "tpl-" + "1" * 24, body)
    assert set(err.value.details["differs"]) == {"guest_image", "accelerator"}
    assert "guest_image '6.1+abc' ≠ '6.1+def'" in err.value.message


def test_runtime_versions_fill_only_what_the_config_leaves_empty(tmp_path: Path) -> None:
    """RT-6, CFG-2: the driver's guest image version is used unless agent.versions sets one."""
    plain = host.collect_versions(cfg(tmp_path, "runtime.driver=none"), {"guest_image": "6.1+abc"})
    assert plain["guest_image"] == "6.1+abc"
    empty = host.collect_versions(cfg(tmp_path, "runtime.driver=none", "agent.versions.guest_image="),
                                  {"guest_image": "6.1+abc"})
    assert empty["guest_image"] == "6.1+abc"
    pinned = host.collect_versions(cfg(tmp_path, "runtime.driver=none", "agent.versions.guest_image=g-7"),
                                   {"guest_image": "6.1+abc"})
    assert pinned["guest_image"] == "g-7"


def test_runtime_config_keys(tmp_path: Path) -> None:
    """CFG-1: runtime.disk_mode is checked; guest_modules exists with an empty default."""
    assert cfg(tmp_path).runtime.guest_modules == ""
    from protocol.config import ConfigError
    with pytest.raises(ConfigError, match="disk_mode"):
        cfg(tmp_path, "runtime.disk_mode=zfs")


def test_console_log_is_capped_to_its_newest_part(tmp_path: Path) -> None:
    """RT-4: the console log stays ≤ runtime.console_cap, keeping the newest output."""
    from agent.runtime.qemu import QemuDriver

    drv = QemuDriver(cfg(tmp_path, "runtime.console_cap=64KiB"))
    vm = drv.vm_dir("sbx-" + "a" * 24)
    vm.mkdir(parents=True)
    data = b"".join(b"line %06d\n" % i for i in range(20000))  # 220 KB
    (vm / "console.log").write_bytes(data)
    drv.cap_console(vm.name)
    kept = (vm / "console.log").read_bytes()
    assert len(kept) <= 64 << 10 and data.endswith(kept) and len(kept) == 32 << 10
    assert drv.console(vm.name, 11) == "line 019999\n"[-11:]
    drv.cap_console(vm.name)  # under the cap: untouched
    assert (vm / "console.log").read_bytes() == kept


def test_forced_tcg_needs_no_canary(tmp_path: Path) -> None:
    """RT-3: runtime.accel = tcg is taken as is, with the reason in the facts."""
    from agent.runtime.qemu import QemuDriver

    drv = QemuDriver(cfg(tmp_path, "runtime.accel=tcg"))
    assert drv._probe_accel() == ("tcg", "runtime.accel = tcg")


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="needs qemu-img (package qemu-utils, make deps)")
def test_a_qcow2_overlay_survives_its_base_being_unlinked(tmp_path: Path) -> None:
    """RT-10, RT-15: a sandbox's overlay keeps its base through a link in its own dir, so a
    REDO or REMOVE_REPLICA that unlinks a template ext4 or a frozen disk does not break it."""
    import subprocess
    from agent.runtime import disks
    base = tmp_path / "store" / "frozen.raw"
    base.parent.mkdir()
    base.write_bytes(b"\x5a" * (1 << 20))
    vm = tmp_path / "sandboxes" / "sbx-1"
    vm.mkdir(parents=True)
    name, fmt = disks.layer("qcow2", str(base), str(vm))
    assert (name, fmt) == ("disk.qcow2", "qcow2")
    base.unlink()
    out = subprocess.run(["qemu-img", "convert", "-O", "raw", str(vm / name), str(tmp_path / "seen.raw")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "seen.raw").read_bytes() == b"\x5a" * (1 << 20)


class RefusingDriver:
    """A runtime that must not be reached: the snapshot tasks' checks come first (pure logic)."""
    name, sandbox = "stub", True

    def alive(self, vm_id: str) -> bool:
        return True

    def rollback(self, vm_id: str, snapshot_dir: str) -> None:
        raise AssertionError("rollback reached the runtime")

    snapshot = rollback


def test_rollback_and_snapshot_refusals(tmp_path: Path) -> None:
    """RT-14, COMPAT-7, SNAP-8, SNAP-9, §1: unknown snapshot → SnapshotNotFound; another
    origin → SnapshotSandboxMismatch; other pins → ReplicaIncompatible; an older generation
    and malformed arguments → InvalidRequest; unknown sandbox → SandboxNotFound; a snapshot
    of a sandbox that is not RUNNING → SandboxNotRunning; all before the runtime is touched."""
    from protocol.errors import SandboxNotFound, SandboxNotRunning, SnapshotNotFound, SnapshotSandboxMismatch
    svc = service(tmp_path, PINS, FACTS, driver=RefusingDriver())
    h = svc.handlers()
    sbx, other, snap = "sbx-" + "1" * 24, "sbx-" + "2" * 24, "snap-" + "3" * 24
    svc.catalog.put("sandbox", sbx, {"template_id": "tpl-" + "4" * 24, "state": "RUNNING", "generation": 3,
                                     "snapshot_id": "snap-" + "9" * 24})
    svc.catalog.put("sandbox", other, {"template_id": "tpl-" + "4" * 24, "state": "EXITED"})

    def run(op: str, **args: object) -> object:
        return h[op](TaskContext("tsk-1", op, args, lambda _: None))

    with pytest.raises(SnapshotNotFound):
        run("ROLLBACK_SANDBOX", sandbox_id=sbx, snapshot_id=snap, generation=4)
    (tmp_path / "snapshots" / snap).mkdir(parents=True)
    (tmp_path / "snapshots" / snap / "memory.img").write_bytes(b"m")
    svc.catalog.put("snapshot", snap, {"sandbox_id": other, "pins": PINS, "facts": FACTS, "files": []})
    with pytest.raises(SnapshotSandboxMismatch):
        run("ROLLBACK_SANDBOX", sandbox_id=sbx, snapshot_id=snap, generation=4)
    svc.catalog.put("snapshot", snap, {"sandbox_id": sbx, "pins": {**PINS, "hypervisor": "8.0"}, "facts": FACTS,
                                       "files": []})
    with pytest.raises(ReplicaIncompatible, match="hypervisor"):
        run("ROLLBACK_SANDBOX", sandbox_id=sbx, snapshot_id=snap, generation=4)
    with pytest.raises(InvalidRequest) as err:
        run("ROLLBACK_SANDBOX", sandbox_id=sbx, snapshot_id=snap, generation=2)
    assert err.value.details["reason"] == "stale"
    for bad in (0, "4", True, None):
        with pytest.raises(InvalidRequest) as err:
            run("ROLLBACK_SANDBOX", sandbox_id=sbx, snapshot_id=snap, generation=bad)
        assert err.value.details["field"] == "generation"
    with pytest.raises(InvalidRequest) as err:
        run("ROLLBACK_SANDBOX", sandbox_id=sbx, snapshot_id="snap-1", generation=4)
    assert err.value.details["field"] == "snapshot_id"
    with pytest.raises(SandboxNotFound):
        run("ROLLBACK_SANDBOX", sandbox_id="sbx-" + "5" * 24, snapshot_id=snap, generation=4)
    with pytest.raises(SandboxNotRunning):
        run("SNAPSHOT_SANDBOX", sandbox_id=other, snapshot_id="snap-" + "6" * 24)
    # CAT-8: files, then the entry; absent is success.
    assert run("REMOVE_SNAPSHOT", snapshot_id=snap) == {"snapshot_id": snap, "removed": True}
    assert svc.catalog.get("snapshot", snap) is None and not (tmp_path / "snapshots" / snap).exists()
    assert run("REMOVE_SNAPSHOT", snapshot_id=snap) == {"snapshot_id": snap, "removed": False}


def test_sync_port_only_for_vms_booted_with_it(tmp_path: Path) -> None:
    """TPL-24, RT-11: the guest-sync console port is in the argv of VMs booted with it (and of
    restores of their snapshots), never of a restore of a snapshot taken before it existed —
    a restore needs the snapshot's device set."""
    from agent.runtime.qemu import QemuDriver
    drv = QemuDriver(cfg(tmp_path, "runtime.accel=tcg"))
    meta = {"vm_id": "sbx-" + "1" * 24, "accel": "tcg", "memory_mib": 256, "vcpus": 1, "memory": "/m",
            "kernel": "/k", "initramfs": "/i", "append": "", "disk": "disk.raw", "format": "raw"}
    old = drv._argv(tmp_path, meta, incoming=True)
    new = drv._argv(tmp_path, {**meta, "sync_port": True}, incoming=False)
    assert "virtconsole,chardev=sync" not in old and old.count("-chardev") == 3
    i = new.index("virtconsole,chardev=ctl")
    assert new[i + 1:i + 5] == ["-chardev", new[i + 2], "-device", "virtconsole,chardev=sync"]
    assert new[i + 2].startswith("socket,id=sync,") and "abstract=on" in new[i + 2]
