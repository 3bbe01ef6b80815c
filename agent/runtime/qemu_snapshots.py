"""Snapshot paths of the ``qemu`` runtime driver (SPEC RT-11 to RT-14).

Everything that reads or writes a snapshot directory (``state.mig``, ``memory.img``,
``disk.raw``, ``config.img``, ``meta.json``): restore from it (RT-11), take it while paused
(RT-12, RT-13), roll back to it and export the guest-visible disk (RT-14). A mixin of
:class:`~agent.runtime.qemu.QemuDriver`, split off so the driver module keeps the VM
lifecycle and process plumbing; VM dirs, launch and QMP come from the driver.
"""
from __future__ import annotations

import json
import logging
import shlex
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from protocol.errors import RuntimeFailed

from . import disks
from .driver import VmStatus
from .qmp import Qmp

if TYPE_CHECKING:
    from ..config import RuntimeConfig

log = logging.getLogger("runtime.qemu")  # the driver's logger: log lines are the driver's


class QemuSnapshots:
    """RT-11 to RT-14 on top of the driver's VM dirs, launch and QMP."""

    rt: RuntimeConfig

    if TYPE_CHECKING:  # provided by QemuDriver
        def vm_dir(self, vm_id: str) -> Path: ...
        def _check(self) -> None: ...
        def _mem_path(self, vm_id: str) -> Path: ...
        def _fresh_dir(self, vm_id: str) -> Path: ...
        def _write_meta(self, d: Path, meta: dict[str, Any]) -> None: ...
        def _launch(self, d: Path, meta: dict[str, Any], incoming: bool) -> None: ...
        def _tails(self, vm_id: str) -> dict[str, str]: ...
        def _qmp(self, vm_id: str, connect_timeout: float = 10.0) -> Qmp: ...
        def _sync_name(self, vm_id: str) -> str: ...

    # --- restore (RT-11) -------------------------------------------------------------------


    def restore(self, vm_id: str, snapshot_dir: str) -> VmStatus:
        """RT-11: clone the memory file, layer a disk over the frozen one, -incoming defer,
        x-ignore-shared, migrate-incoming the device state, wait ≤ migrate_timeout, cont."""
        self._check()
        snap = Path(snapshot_dir)
        smeta = json.loads((snap / "meta.json").read_text())
        d = self._fresh_dir(vm_id)
        t0 = time.monotonic()
        mem = self._mem_path(vm_id)
        disks.clone(str(snap / "memory.img"), str(mem))
        disk, fmt = disks.layer(disks.disk_mode(self.rt.disk_mode, str(d)), str(snap / "disk.raw"), str(d))
        shutil.copyfile(snap / "config.img", d / "config.img")
        meta = {**{k: smeta[k] for k in ("vcpus", "memory_mib", "accel", "kernel", "initramfs", "append")},
                "vm_id": vm_id, "disk": disk, "format": fmt, "memory": str(mem), "restored": True,
                "sync_port": bool(smeta.get("sync_port"))}  # the snapshot's device set (RT-11)
        self._launch(d, meta, incoming=True)
        try:
            with self._qmp(vm_id) as q:
                q.call("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
                q.call("migrate-incoming", uri=f"exec:cat {shlex.quote(str(snap / 'state.mig'))}")
                q.wait_migration(float(self.rt.migrate_timeout))
                q.call("cont")
        except RuntimeFailed as exc:
            raise RuntimeFailed(f"restore failed: {exc.message}", {"stage": "restore", **self._tails(vm_id)}) from None
        ms = int((time.monotonic() - t0) * 1000)
        meta.update(boot_ms=ms, ready_ms=ms)
        self._write_meta(d, meta)
        return VmStatus(vm_id, "RUNNING", boot_ms=ms, ready_ms=ms, restored=True)

    # --- snapshot (RT-12, RT-13) -----------------------------------------------------------

    def _paused(self, vm_id: str, what: str, steps: Callable[[Qmp, list[str]], None]) -> int:
        """RT-12, RT-13: QMP ``stop``, run ``steps`` (which name their stage in ``stage[0]``),
        then ``cont`` even after a failure; a failure is RuntimeFailed naming the stage. QMP
        ``stop`` drains and flushes the block layer, so the disk is consistent once paused.
        Returns the pause time in ms."""
        stage = ["connect"]
        t0 = time.monotonic()
        try:
            with self._qmp(vm_id) as q:
                try:
                    stage[0] = "stop"
                    q.call("stop")
                    steps(q, stage)
                finally:
                    pause_ms = int((time.monotonic() - t0) * 1000)
                    try:
                        q.call("cont")
                    except RuntimeFailed as exc:
                        log.warning("cont after the %s of %s failed: %s", what, vm_id, exc)
        except RuntimeFailed as exc:
            raise RuntimeFailed(f"{what} failed at {stage[0]}: {exc.message}", {"stage": stage[0]}) from None
        except OSError as exc:
            raise RuntimeFailed(f"{what} failed at {stage[0]}: {exc}", {"stage": stage[0]}) from None
        return pause_ms

    def snapshot(self, vm_id: str, dest_dir: str) -> dict[str, Any]:
        """Pause, write device state + memory + frozen disk into ``dest_dir``, continue.
        Returns {files, pause_ms}. A failure still tries ``cont`` and names its stage.
        The guest syncs first: the memory image holds its page cache, but the frozen disk
        alone becomes a rootfs too (a memory-mode commit's export, a commit from a snapshot)."""
        d, meta, dest = self._copy_target(vm_id, dest_dir)
        self._sync_guest(vm_id, meta)

        def disk() -> None:
            disks.freeze(str(d / meta["disk"]), meta["format"], str(dest / "disk.raw"))
            shutil.copyfile(d / "config.img", dest / "config.img")

        def steps(q: Qmp, stage: list[str]) -> None:
            # Once stopped, memory, disk and device state are three independent copies: run
            # them at once, so the pause is the longest of them, not their sum.
            with ThreadPoolExecutor(2, thread_name_prefix=f"snap-{vm_id}") as pool:
                copies = {"memory": pool.submit(disks.clone, meta["memory"], str(dest / "memory.img")),
                          "disk": pool.submit(disk)}
                try:
                    stage[0] = "capabilities"
                    q.call("migrate-set-capabilities",
                           capabilities=[{"capability": "x-ignore-shared", "state": True}])
                    stage[0] = "migrate"  # QEMU 7.2 has no file: URI (TOOLS §7)
                    q.call("migrate", uri=f"exec:cat > {shlex.quote(str(dest / 'state.mig'))}")
                    q.wait_migration(float(self.rt.migrate_timeout))
                finally:
                    wait(copies.values())
                for name, fut in copies.items():
                    stage[0] = name
                    fut.result()

        pause_ms = self._paused(vm_id, "snapshot", steps)
        smeta = {k: meta[k] for k in ("vcpus", "memory_mib", "accel", "kernel", "initramfs", "append")}
        if meta.get("sync_port"):
            smeta["sync_port"] = True
        (dest / "meta.json").write_text(json.dumps(smeta, sort_keys=True))
        files = [{"name": p.name, "size": p.stat().st_size} for p in sorted(dest.iterdir()) if p.is_file()]
        return {"files": files, "pause_ms": pause_ms}

    def _copy_target(self, vm_id: str, dest_dir: str) -> tuple[Path, dict[str, Any], Path]:
        """(VM dir, its meta, the created destination) for snapshot and export: the VM must
        exist (its meta.json is read strictly, unlike ``meta``)."""
        d = self.vm_dir(vm_id)
        meta = json.loads((d / "meta.json").read_text())
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        return d, meta, dest

    # --- rollback, export (RT-14) ----------------------------------------------------------

    def rollback(self, vm_id: str, snapshot_dir: str) -> VmStatus:
        """RT-14: discard the VM and its writable layer, layer a new disk over the snapshot's
        frozen one, clone its memory and restore — RT-11's path: restore's fresh dir destroys
        the running VM first. The snapshot's files are never used in place (memory is a
        clone, the disk a clone or an overlay over a hard link), so it may be removed later."""
        try:
            return self.restore(vm_id, snapshot_dir)
        except RuntimeFailed as exc:
            raise RuntimeFailed(f"rollback failed: {exc.message}", {**exc.details, "stage": "rollback"}) from None
        except OSError as exc:
            raise RuntimeFailed(f"rollback failed: {exc}", {"stage": "rollback"}) from None

    def export(self, vm_id: str, dest_dir: str) -> dict[str, Any]:
        """RT-14 export (commit): while paused, a standalone raw ext4 of the guest-visible disk
        as ``dest_dir/rootfs.ext4`` (layers merged), then continue. Returns {files, pause_ms}.
        The guest is asked to sync first, so what it wrote without ``sync`` is in it too."""
        d, meta, dest = self._copy_target(vm_id, dest_dir)
        self._sync_guest(vm_id, meta)

        def steps(_q: Qmp, stage: list[str]) -> None:
            stage[0] = "disk"
            disks.standalone(str(d / meta["disk"]), meta["format"], str(dest / "rootfs.ext4"))

        pause_ms = self._paused(vm_id, "export", steps)
        out = dest / "rootfs.ext4"
        return {"files": [{"name": out.name, "size": out.stat().st_size}], "pause_ms": pause_ms}

    # --- guest sync before a pause (TPL-24) -------------------------------------------------

    def _sync_guest(self, vm_id: str, meta: dict[str, Any]) -> None:
        """Ask the guest init to sync its file systems on the sync port (hvc1) and wait for
        "synced" ≤ runtime.guest_sync_timeout: QMP ``stop`` flushes QEMU's block layer, not
        the guest's page cache. Best effort: a VM without the port, a guest that does not
        answer (its init predates the port) or a timeout only logs a warning."""
        timeout = float(self.rt.guest_sync_timeout)
        if timeout <= 0:
            return
        if not meta.get("sync_port"):
            log.warning("%s has no guest sync port: its unsynced writes may be missing", vm_id)
            return
        t0 = time.monotonic()
        deadline = t0 + timeout
        buf = b""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
                s.settimeout(timeout)
                s.connect("\0" + self._sync_name(vm_id))
                s.sendall(b"sync\n")
                # The guest's tty may echo the request and ends lines with \r\n.
                while b"synced" not in buf.replace(b"\r", b"").split(b"\n")[:-1]:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    s.settimeout(left)
                    chunk = s.recv(256)
                    if not chunk:
                        raise ConnectionError("the sync port closed")
                    buf = buf[-256:] + chunk
        except TimeoutError:
            log.warning("%s did not answer sync within %gs: its unsynced writes may be missing", vm_id, timeout)
            return
        except OSError as exc:
            log.warning("cannot ask %s to sync (%s): its unsynced writes may be missing", vm_id, exc)
            return
        log.info("%s synced in %d ms", vm_id, int((time.monotonic() - t0) * 1000))
