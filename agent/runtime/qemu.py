"""The ``qemu`` runtime driver (SPEC RT-3 to RT-16): microVMs under KVM or TCG.

Per VM a directory ``<state_dir>/sandboxes/<vm id>/`` holds ``meta.json`` (what the command
line is built from), the writable disk, ``config.img`` (the read-only runtime-config disk,
RT-7), ``console.log`` (ttyS0, capped at ``runtime.console_cap``), ``control.log`` (the
guest init's started/ready/exited lines on hvc0, RT-8), ``qemu.pid`` and ``qemu.err``. Guest
RAM is a shared ``memory-backend-file`` in ``runtime.memory_dir`` (default: the VM dir).

QEMU is started in its own session and never waited on by an agent that did not start it:
an agent restart finds its VMs again through the pidfiles and QMP sockets (RT-15). QMP
sockets are abstract unix sockets named after the state dir and VM id, so that the path
length limit of unix sockets never depends on where the state dir lives.

Restore, snapshot, rollback and export (RT-11 to RT-14) live in :mod:`.qemu_snapshots`,
a mixin of the driver.

Guest clock under TCG: the Debian cloud kernel cannot calibrate its TSC against the
microvm's timers under TCG and hangs; ``tsc_early_khz`` gives it the frequency instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.errors import ProbeTimeout, RuntimeFailed

from . import disks, guest
from .driver import VmSpec, VmStatus
from .qemu_snapshots import QemuSnapshots
from .qmp import Qmp

if TYPE_CHECKING:
    from ..config import AgentConfig

log = logging.getLogger("runtime.qemu")
QEMU = "qemu-system-x86_64"
APPEND = "console=ttyS0 quiet panic=-1 reboot=t"
TCG_CLOCK = "tsc_early_khz=2000000 tsc=reliable"
CONTROL = "control.log"
CONSOLE = "console.log"


class Control:
    """The guest init's lines on the control channel (RT-8)."""

    def __init__(self, text: str) -> None:
        self.started = self.ready = False
        self.exit_code: int | None = None
        self.failed = ""
        for line in text.replace("\r", "").splitlines():
            word, _, rest = line.strip().partition(" ")
            if word == "started":
                self.started = True
            elif word == "ready":
                self.ready = True
            elif word == "exited" and rest.strip().lstrip("-").isdigit():
                self.exit_code = int(rest)
            elif word == "failed":
                self.failed = rest[:500]


def _opt(path: str | Path) -> str:
    """A path inside a QEMU option string: commas are doubled."""
    return str(path).replace(",", ",,")


class QemuDriver(QemuSnapshots):
    name = "qemu"
    sandbox = True

    def __init__(self, cfg: "AgentConfig") -> None:
        self.cfg = cfg
        self.rt = cfg.runtime
        state = os.path.realpath(cfg.agent.state_dir)
        self.root = Path(state) / "sandboxes"
        self.guest_dir = Path(state) / "guest"
        self._ns = hashlib.sha256(state.encode()).hexdigest()[:10]
        self.image: guest.GuestImage | None = None
        self.unavailable = ""
        self.accel, self.accel_reason = "tcg", "not probed"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    # --- start-up, facts, versions (RT-3, RT-5, RT-6) -------------------------------------

    def start(self) -> None:
        """Build the initramfs and probe the accelerator. A missing kernel does not stop the
        agent: it reports ``sandbox`` = false and says why. A forced ``kvm`` whose canary
        fails raises RuntimeFailed (RT-3: the agent stops)."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.image = guest.build(self.rt.guest_kernel, self.rt.guest_modules, str(self.guest_dir))
        except (RuntimeFailed, OSError) as exc:
            self.unavailable = f"guest image: {exc}"
            self.sandbox = False
            log.warning("sandboxes unavailable: %s", self.unavailable)
            return
        if shutil.which(QEMU) is None:
            self.unavailable, self.sandbox = f"{QEMU} is not installed", False
            return
        self.accel, self.accel_reason = self._probe_accel()
        log.info("guest image %s; accelerator %s (%s)", self.image.version, self.accel, self.accel_reason)
        if self.rt.accel == "kvm" and self.accel != "kvm":
            raise RuntimeFailed(f"runtime.accel = kvm but {self.accel_reason}", {"stage": "accel"})

    def _probe_accel(self) -> tuple[str, str]:
        if self.rt.accel == "tcg":
            return "tcg", "runtime.accel = tcg"
        try:
            os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
        except OSError as exc:
            return "tcg", f"/dev/kvm does not open: {exc.strerror}"
        assert self.image is not None
        timeout = float(self.rt.kvm_canary_timeout)
        log_path = self.guest_dir / "canary.log"
        log_path.unlink(missing_ok=True)
        argv = [QEMU, "-accel", "kvm", "-cpu", "host", "-M", "microvm", "-m", "128", "-nodefaults", "-no-reboot",
                "-nographic", "-kernel", self.image.kernel, "-initrd", self.image.initramfs,
                "-append", f"{APPEND} tc.canary", "-serial", f"file:{_opt(log_path)}"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        ok = False
        while time.monotonic() < deadline:
            if log_path.exists() and b"TC-CANARY-OK" in log_path.read_bytes():
                ok = True
                break
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
        if ok:
            return "kvm", "KVM canary reached init"
        why = err.decode(errors="replace").strip().splitlines()[-1:] if proc.returncode else []
        return "tcg", (f"KVM canary failed: {why[0][:200]}" if why
                       else f"KVM canary did not reach init within {timeout:g}s")

    def facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"accelerator": self.accel, "accel_reason": self.accel_reason[:200]}
        if self.unavailable:
            facts["runtime_unavailable"] = self.unavailable[:200]
        return facts

    def versions(self) -> dict[str, str]:
        return {"guest_image": self.image.version if self.image else ""}

    # --- create (RT-4, RT-10); restore, snapshot, rollback, export: qemu_snapshots --------

    def _check(self) -> None:
        if self.unavailable:
            raise RuntimeFailed(f"no sandbox runtime: {self.unavailable}", {"stage": "start"})

    def vm_dir(self, vm_id: str) -> Path:
        return self.root / vm_id

    def _mem_path(self, vm_id: str) -> Path:
        base = Path(self.rt.memory_dir) if self.rt.memory_dir else self.vm_dir(vm_id)
        return base / (f"{vm_id}.mem" if self.rt.memory_dir else "memory.img")

    def create(self, spec: VmSpec, probe_timeout: float) -> VmStatus:
        """Cold boot; returns when the probe passed (RUNNING) or the command already exited."""
        self._check()
        assert self.image is not None
        d = self._fresh_dir(spec.vm_id)
        (d / "config.img").write_bytes(guest.config_env(spec.runtime_config, spec.probe))
        disk, fmt = disks.layer(disks.disk_mode(self.rt.disk_mode, str(d)), spec.base_disk, str(d))
        append = APPEND if self.accel == "kvm" else f"{APPEND} {TCG_CLOCK}"
        meta = {"vm_id": spec.vm_id, "vcpus": spec.vcpus, "memory_mib": spec.memory_mib, "accel": self.accel,
                "kernel": self.image.kernel, "initramfs": self.image.initramfs, "append": append,
                "disk": disk, "format": fmt, "memory": str(self._mem_path(spec.vm_id)), "restored": False,
                "sync_port": True}
        t0 = time.monotonic()
        self._launch(d, meta, incoming=False)
        return self._wait_ready(spec.vm_id, t0, probe_timeout, meta)

    def _fresh_dir(self, vm_id: str) -> Path:
        d = self.vm_dir(vm_id)
        if d.exists():  # a leftover of an interrupted create: start over (WIRE-14)
            self.destroy(vm_id)
        d.mkdir(parents=True)
        if self.rt.memory_dir:
            os.makedirs(self.rt.memory_dir, exist_ok=True)
        return d

    def _write_meta(self, d: Path, meta: dict[str, Any]) -> None:
        tmp = d / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, sort_keys=True))
        os.replace(tmp, d / "meta.json")

    def _launch(self, d: Path, meta: dict[str, Any], incoming: bool) -> None:
        self._write_meta(d, meta)
        argv = self._argv(d, meta, incoming)
        with open(d / "qemu.err", "ab") as err:
            # Own session: systemd's KillMode=process and an agent crash leave QEMU running.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True, close_fds=True)
        with self._lock:
            self._procs[meta["vm_id"]] = proc

    def _argv(self, d: Path, meta: dict[str, Any], incoming: bool) -> list[str]:
        mem = int(meta["memory_mib"])
        argv = [QEMU, "-name", meta["vm_id"], "-accel", meta["accel"], "-M", "microvm,memory-backend=mem",
                "-m", f"{mem}M", "-smp", str(int(meta["vcpus"])),
                "-object", f"memory-backend-file,id=mem,size={mem}M,mem-path={_opt(meta['memory'])},share=on",
                "-nodefaults", "-no-reboot", "-nographic",
                "-kernel", meta["kernel"], "-initrd", meta["initramfs"], "-append", meta["append"],
                "-drive", f"id=root,file={_opt(d / meta['disk'])},format={meta['format']},if=none",
                "-device", "virtio-blk-device,drive=root",
                "-drive", f"id=cfg,file={_opt(d / 'config.img')},format=raw,if=none,readonly=on",
                "-device", "virtio-blk-device,drive=cfg",
                "-chardev", f"file,id=con,path={_opt(d / CONSOLE)},append=on", "-serial", "chardev:con",
                "-chardev", f"file,id=ctl,path={_opt(d / CONTROL)},append=on",
                "-device", "virtio-serial-device", "-device", "virtconsole,chardev=ctl",
                "-chardev", f"socket,id=qmp,path={self._qmp_name(meta['vm_id'])},abstract=on,server=on,wait=off",
                "-mon", "chardev=qmp,mode=control", "-pidfile", str(d / "qemu.pid")]
        if meta.get("sync_port"):
            # The sync port (TPL-24): hvc1 in the guest, where the init answers "sync". Only
            # for VMs booted with it: a restore needs the snapshot's device set (RT-11), and
            # one taken before the port existed has a single console port.
            i = argv.index("virtconsole,chardev=ctl") + 1
            argv[i:i] = ["-chardev", f"socket,id=sync,path={self._sync_name(meta['vm_id'])},abstract=on,"
                         "server=on,wait=off", "-device", "virtconsole,chardev=sync"]
        if meta["accel"] == "kvm":
            argv[3:3] = ["-cpu", "host"]
        if incoming:
            argv += ["-S", "-incoming", "defer"]
        return argv

    def _wait_ready(self, vm_id: str, t0: float, probe_timeout: float, meta: dict[str, Any]) -> VmStatus:
        d = self.vm_dir(vm_id)
        boot_ms = 0
        while True:
            ctl = self.control(vm_id)
            now = int((time.monotonic() - t0) * 1000)
            if ctl.started and not boot_ms:
                boot_ms = now
            if ctl.exit_code is not None:
                meta.update(boot_ms=boot_ms, ready_ms=0)
                self._write_meta(d, meta)
                return VmStatus(vm_id, "EXITED", exit_code=ctl.exit_code, boot_ms=boot_ms)
            if ctl.ready:
                meta.update(boot_ms=boot_ms, ready_ms=now)
                self._write_meta(d, meta)
                return VmStatus(vm_id, "RUNNING", boot_ms=boot_ms, ready_ms=now)
            if ctl.failed:
                raise RuntimeFailed(f"guest init failed: {ctl.failed}", {"stage": "boot", **self._tails(vm_id)})
            if not self.alive(vm_id):
                raise RuntimeFailed("QEMU ended during boot", {"stage": "boot", **self._tails(vm_id)})
            if now > probe_timeout * 1000:
                raise ProbeTimeout(f"the readiness probe {meta.get('probe', '')!s}did not pass within "
                                   f"{probe_timeout:g}s", {"vm": vm_id, **self._tails(vm_id)})
            time.sleep(0.05)

    def _tails(self, vm_id: str) -> dict[str, str]:
        err = self.vm_dir(vm_id) / "qemu.err"
        qemu_err = err.read_text(errors="replace")[-500:] if err.exists() else ""
        return {"console": self.console(vm_id, 2000), "qemu": qemu_err}

    # --- state, console, destroy (RT-15, RT-16) ------------------------------------------

    def control(self, vm_id: str) -> Control:
        path = self.vm_dir(vm_id) / CONTROL
        try:
            return Control(path.read_text(errors="replace"))
        except FileNotFoundError:
            return Control("")

    def meta(self, vm_id: str) -> dict[str, Any]:
        try:
            return dict(json.loads((self.vm_dir(vm_id) / "meta.json").read_text()))
        except (OSError, ValueError):
            return {}

    def pid(self, vm_id: str) -> int | None:
        try:
            return int((self.vm_dir(vm_id) / "qemu.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def alive(self, vm_id: str) -> bool:
        with self._lock:
            proc = self._procs.get(vm_id)
        if proc is not None:
            if proc.poll() is None:
                return True
            with self._lock:
                self._procs.pop(vm_id, None)
            return False
        pid = self.pid(vm_id)
        return pid is not None and self._ours(pid, vm_id)

    def _ours(self, pid: int, vm_id: str) -> bool:
        """The pid is a live (not zombie) QEMU of this VM dir: pids are reused."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        if stat.rpartition(")")[2].split()[0] == "Z":
            return False
        return str(self.vm_dir(vm_id) / "qemu.pid").encode() in cmdline

    def status(self, vm_id: str) -> VmStatus | None:
        if not self.vm_dir(vm_id).is_dir():
            return None
        ctl = self.control(vm_id)
        meta = self.meta(vm_id)
        st = VmStatus(vm_id, "RUNNING", boot_ms=int(meta.get("boot_ms", 0)), ready_ms=int(meta.get("ready_ms", 0)),
                      restored=bool(meta.get("restored")))
        if self.alive(vm_id):
            return st
        if ctl.exit_code is not None:
            st.state, st.exit_code = "EXITED", ctl.exit_code
        else:
            st.state, st.error = "FAILED", ctl.failed or "the QEMU process ended"
        return st

    def list(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []

    def console(self, vm_id: str, tail_bytes: int) -> str:
        path = self.vm_dir(vm_id) / CONSOLE
        try:
            with open(path, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - tail_bytes))
                return fh.read(tail_bytes).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def cap_console(self, vm_id: str) -> None:
        """Keep the console log ≤ runtime.console_cap: past it, only the newest half stays.
        QEMU appends (append=on), so its next write lands after what we keep; a line written
        between our read and the truncate is lost, which a console log can afford."""
        path = self.vm_dir(vm_id) / CONSOLE
        cap = int(self.rt.console_cap)
        try:
            if path.stat().st_size <= cap:
                return
            with open(path, "rb") as fh:
                fh.seek(-(cap // 2), os.SEEK_END)
                keep = fh.read()
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                os.truncate(path, 0)
                os.write(fd, keep)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("cannot cap the console of %s: %s", vm_id, exc)

    def destroy(self, vm_id: str, timeout: float | None = None) -> bool:
        """RT-15: QMP quit, SIGKILL after ``timeout`` (runtime.kill_after), remove the files.
        False when there was nothing to destroy."""
        d = self.vm_dir(vm_id)
        existed = d.exists()
        limit = float(self.rt.kill_after) if timeout is None else timeout
        if self.alive(vm_id):
            try:
                with self._qmp(vm_id, connect_timeout=2.0) as q:
                    q.call("quit")
            except RuntimeFailed as exc:
                log.info("QMP quit of %s failed (%s): killing it", vm_id, exc)
            deadline = time.monotonic() + limit
            while self.alive(vm_id) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.alive(vm_id):
                pid = self.pid(vm_id)
                if pid is not None:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + 5
                while self.alive(vm_id) and time.monotonic() < deadline:
                    time.sleep(0.05)
        mem = Path(self.meta(vm_id).get("memory") or self._mem_path(vm_id))
        shutil.rmtree(d, ignore_errors=True)
        if self.rt.memory_dir:
            mem.unlink(missing_ok=True)
        with self._lock:
            self._procs.pop(vm_id, None)
        return existed

    # --- QMP --------------------------------------------------------------------------------

    def _qmp_name(self, vm_id: str) -> str:
        return f"tc-{self._ns}-{vm_id}"

    def _sync_name(self, vm_id: str) -> str:
        """The sync port's abstract socket (TPL-24), named like the QMP one."""
        return f"tc-{self._ns}-{vm_id}-sync"

    def _qmp(self, vm_id: str, connect_timeout: float = 10.0) -> Qmp:
        return Qmp("\0" + self._qmp_name(vm_id), connect_timeout, lambda: self.alive(vm_id))
