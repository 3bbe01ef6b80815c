"""Sandbox and template-memory-snapshot tasks on the agent (SPEC RT-9 to RT-16, DIST-9,
COMPAT-7, CAT-1).

Tasks: CREATE_SANDBOX, DESTROY_SANDBOX, CONSOLE_SANDBOX, PREPARE_REPLICA, and the snapshot
tasks of agent/runtime/snapshots.py (RT-12 to RT-14), which share this service's locks. Each sandbox is a
catalog entry ``sandbox``/<sandbox id> with body {template_id, artifact_id, state, restored,
started_ms, exit_code, error}, plus {snapshot_id, generation, restore_ms} after a rollback; a memory-mode replica is a ``replica``/<template id> entry whose files live
in ``<state_dir>/replicas/<template id>/``. A monitor thread moves RUNNING sandboxes whose
QEMU ended to EXITED (the guest reported ``exited CODE``) or FAILED, and caps console logs.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

from protocol import ids
from protocol.errors import InvalidRequest, ReplicaIncompatible, RuntimeFailed, SandboxNotFound, TCError

from ..catalog import ARTIFACT_KIND, REPLICA_KIND, SANDBOX_KIND, Catalog
from ..tasks import TaskContext
from .driver import RuntimeDriver, VmSpec
from .memstate import MemoryReplicaInstaller
from .snapshots import SnapshotService

log = logging.getLogger("sandboxes")

RESTART_LOST = "process not found after agent restart"  # RT-16
PIN_NAMES = ("guest_image", "agent", "hypervisor", "host_kernel")   # COMPAT-1
FACT_NAMES = ("accelerator", "cpu_flags_hash")
CONSOLE_MAX = 65536
MEMORY_MIB = (64, 1 << 20)


class SandboxService:
    def __init__(self, cfg: Any, catalog: Catalog, driver: RuntimeDriver,
                 versions: Callable[[], dict[str, str]], facts: Callable[[], dict[str, Any]]) -> None:
        self.cfg = cfg
        self.catalog = catalog
        self.driver = driver
        self._versions = versions
        self._facts = facts
        self.replica_root = Path(cfg.agent.state_dir) / "replicas"
        self.artifact_root = Path(cfg.agent.state_dir) / "store" / "artifacts"
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self.snapshots = SnapshotService(self)

    def handlers(self) -> dict[str, Any]:
        return {"CREATE_SANDBOX": self.create_task, "DESTROY_SANDBOX": self.destroy_task,
                "CONSOLE_SANDBOX": self.console_task, "PREPARE_REPLICA": self.prepare_replica_task,
                **self.snapshots.handlers(), **MemoryReplicaInstaller(self).handlers()}  # DIST-8

    # --- start-up: re-attach (RT-15, RT-16, GC-14) -------------------------------------------

    def reattach(self) -> dict[str, int]:
        """Before HELLO: RUNNING entries whose QEMU lives stay RUNNING; the others become
        EXITED (the guest reported its exit code) or FAILED with RT-16's message; disks stay."""
        counts = {"running": 0, "exited": 0, "failed": 0}
        if self.driver.name == "none":
            return counts
        for entry in self.catalog.entries(SANDBOX_KIND):
            body = entry["body"]
            if body.get("state") != "RUNNING":
                continue
            sid = entry["id"]
            if self.driver.alive(sid):
                counts["running"] += 1
                continue
            st = self.driver.status(sid)
            if st is not None and st.state == "EXITED":
                self._put(sid, {**body, "state": "EXITED", "exit_code": st.exit_code})
                counts["exited"] += 1
            else:
                self._put(sid, {**body, "state": "FAILED", "error": RESTART_LOST})
                counts["failed"] += 1
        # A VM without an entry is a create or a replica preparation the previous process did
        # not finish; its task, when re-sent, starts over (WIRE-14).
        known = {e["id"] for e in self.catalog.entries(SANDBOX_KIND)}
        for vm_id in self.driver.list():
            if vm_id not in known:
                log.info("removing VM %s left by an interrupted task", vm_id)
                self.driver.destroy(vm_id, 5.0)
        log.info("sandboxes re-attached: %s", counts)
        return counts

    def start_monitor(self, interval: float = 0.5) -> None:
        if self.driver.name != "none" and self._monitor is None:
            self._monitor = threading.Thread(target=self._monitor_loop, args=(interval,), name="sandbox-monitor",
                                             daemon=True)
            self._monitor.start()

    def stop(self) -> None:
        self._stop.set()

    def _monitor_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 — the monitor must outlive one bad pass
                log.exception("sandbox monitor pass failed")

    def run_once(self) -> None:
        for entry in self.catalog.entries(SANDBOX_KIND):
            sid, body = entry["id"], entry["body"]
            if body.get("state") != "RUNNING":
                continue
            with self._lock(sid):
                if self.catalog.get(SANDBOX_KIND, sid) is None:
                    continue
                self.driver_cap(sid)
                if self.driver.alive(sid):
                    continue
                st = self.driver.status(sid)
                if st is not None and st.state == "EXITED":
                    self._put(sid, {**body, "state": "EXITED", "exit_code": st.exit_code})
                else:
                    self._put(sid, {**body, "state": "FAILED", "error": (st.error if st else "") or "QEMU ended"})

    def driver_cap(self, sid: str) -> None:
        cap = getattr(self.driver, "cap_console", None)
        if cap is not None:
            cap(sid)

    def running(self) -> int:
        """The heartbeat's ``sandboxes`` count (WIRE-8)."""
        return sum(1 for e in self.catalog.entries(SANDBOX_KIND) if e["body"].get("state") == "RUNNING")

    # --- CREATE_SANDBOX (RT-9, RT-10, RT-11, COMPAT-7) ---------------------------------------

    def _require(self) -> None:
        """RT-2: on a ``none`` node every sandbox operation is SandboxUnsupported, before any
        argument is looked at."""
        if self.driver.name == "none":
            self.driver.create(None, 0.0)  # type: ignore[arg-type] — NoneDriver raises

    def create_task(self, ctx: TaskContext) -> dict[str, Any]:
        self._require()
        a = ctx.args
        sid = _id("sandbox", a.get("sandbox_id"), "sandbox_id", "sbx-<24 hex>")
        tpl = _id("template", a.get("template_id"), "template_id", "tpl-<24 hex>")
        restore = a.get("restore", "cold")
        if restore not in ("cold", "memory", "snapshot"):
            raise InvalidRequest(f"restore {str(restore)[:40]!r} is not cold, memory or snapshot",
                                 {"field": "restore", "reason": "enum"})
        snap = (_id("snapshot", a.get("snapshot_id"), "snapshot_id", "snap-<24 hex>")
                if restore == "snapshot" else None)
        with self._lock(sid):
            existing = self.catalog.get(SANDBOX_KIND, sid)
            if existing is not None:  # idempotent by sandbox id
                return self._result(sid, existing["body"])
            ref: dict[str, Any] = {}
            if snap is not None:  # a new sandbox from a sandbox snapshot (SNAP-18): RT-11's path
                sentry = self.snapshots.usable(snap)
                self.check_compat(snap, sentry["body"], what="snapshot")
                artifact = sentry["body"].get("base_artifact_id")
                ref = {"snapshot_id": snap, "generation": 0}
                started = _now_ms()
                try:
                    st = self.driver.restore(sid, str(self.snapshots.dir(snap)))
                except BaseException:
                    self.driver.destroy(sid, 5.0)
                    raise
            elif restore == "memory":
                replica = self.catalog.get(REPLICA_KIND, tpl)
                if replica is None or not replica["body"].get("memory"):
                    raise InvalidRequest(f"node has no memory snapshot of template {tpl}",
                                         {"field": "restore", "reason": "no memory snapshot"})
                self.check_compat(tpl, replica["body"])
                artifact = replica["body"].get("artifact_id")
                started = _now_ms()
                try:
                    st = self.driver.restore(sid, str(self.replica_root / tpl))
                except BaseException:
                    self.driver.destroy(sid, 5.0)
                    raise
            else:
                spec = self._spec(sid, a)
                artifact = a.get("artifact_id")
                started = _now_ms()
                try:
                    st = self.driver.create(spec, float(self.cfg.runtime.probe_timeout))
                except BaseException:
                    self.driver.destroy(sid, 5.0)
                    raise
            # artifact_id: the base a later snapshot of this sandbox descends from (CAT-1).
            body = {"template_id": tpl, "artifact_id": artifact, "state": st.state, "restored": st.restored,
                    "started_ms": started, "exit_code": st.exit_code, "error": st.error or None, **ref}
            self._put(sid, body)
            log.info("sandbox %s of %s %s (restored %s) boot %d ms ready %d ms", sid, tpl, st.state, st.restored,
                     st.boot_ms, st.ready_ms)
            return {"sandbox_id": sid, "state": st.state, "restored": st.restored, "boot_ms": st.boot_ms,
                    "ready_ms": st.ready_ms, "exit_code": st.exit_code}

    def check_compat(self, tpl: str, body: dict[str, Any], what: str = "template") -> None:
        """COMPAT-7: the snapshot's pins and facts must equal the node's current ones. ``tpl``
        names the template (replica restore) or the sandbox snapshot (``what`` = snapshot)."""
        current = self._versions()
        facts = self._facts()
        differs: dict[str, dict[str, Any]] = {}
        for name in PIN_NAMES:
            pinned = (body.get("pins") or {}).get(name)
            if pinned != current.get(name):
                differs[name] = {"pinned": pinned, "node": current.get(name)}
        for name in FACT_NAMES:
            pinned = (body.get("facts") or {}).get(name)
            if pinned != facts.get(name):
                differs[name] = {"pinned": pinned, "node": facts.get(name)}
        if differs:
            text = ", ".join(f"{k} {v['pinned']!r} ≠ {v['node']!r}" for k, v in differs.items())
            if what == "snapshot":
                raise ReplicaIncompatible(f"snapshot {tpl} does not match this node: {text}",
                                          {"snapshot_id": tpl, "differs": differs})
            raise ReplicaIncompatible(f"memory snapshot of {tpl} does not match this node: {text}",
                                      {"template_id": tpl, "differs": differs})

    def _spec(self, vm_id: str, a: dict[str, Any]) -> VmSpec:
        art = _id("artifact", a.get("artifact_id"), "artifact_id", "art-<24 hex>")
        if self.catalog.get(ARTIFACT_KIND, art) is None:
            raise InvalidRequest(f"artifact {art} is not on this node", {"field": "artifact_id", "reason": "absent"})
        disk = self.artifact_root / art / "rootfs.ext4"
        if not disk.is_file():
            raise InvalidRequest(f"artifact {art} has no rootfs.ext4 on this node",
                                 {"field": "artifact_id", "reason": "absent"})
        rc = a.get("runtime_config") or {}
        if not isinstance(rc, dict):
            raise InvalidRequest("runtime_config must be a map", {"field": "runtime_config", "reason": "type"})
        vcpus = _int(a.get("vcpus", 1), "vcpus", 1, 64)
        memory = _int(a.get("memory_mib", 256), "memory_mib", *MEMORY_MIB)
        probe = a.get("probe") or "started"
        _check_probe(probe)
        return VmSpec(vm_id=vm_id, base_disk=str(disk), runtime_config=rc, vcpus=vcpus, memory_mib=memory,
                      probe=probe)

    def _result(self, sid: str, body: dict[str, Any]) -> dict[str, Any]:
        st = self.driver.status(sid)
        return {"sandbox_id": sid, "state": body.get("state"), "restored": bool(body.get("restored")),
                "boot_ms": st.boot_ms if st else 0, "ready_ms": st.ready_ms if st else 0,
                "exit_code": body.get("exit_code") if body.get("state") == "EXITED" else None}

    # --- DESTROY / CONSOLE (RT-15) -------------------------------------------------------------

    def destroy_task(self, ctx: TaskContext) -> dict[str, Any]:
        self._require()
        sid = _id("sandbox", ctx.args.get("sandbox_id"), "sandbox_id", "sbx-<24 hex>")
        with self._lock(sid):
            had_entry = self.catalog.get(SANDBOX_KIND, sid) is not None
            had_vm = self.driver.destroy(sid)
            if had_entry:
                self.catalog.delete(SANDBOX_KIND, sid)
        return {"sandbox_id": sid, "destroyed": had_entry or had_vm}

    def console_task(self, ctx: TaskContext) -> dict[str, Any]:
        self._require()
        sid = _id("sandbox", ctx.args.get("sandbox_id"), "sandbox_id", "sbx-<24 hex>")
        tail = _int(ctx.args.get("tail_bytes", CONSOLE_MAX), "tail_bytes", 0, CONSOLE_MAX)
        if self.catalog.get(SANDBOX_KIND, sid) is None:
            raise SandboxNotFound(f"sandbox {sid} is not on this node", {"sandbox_id": sid})
        return {"sandbox_id": sid, "console": self.driver.console(sid, tail)}

    # --- PREPARE_REPLICA (DIST-9, RT-12) -------------------------------------------------------

    def prepare_replica_task(self, ctx: TaskContext) -> dict[str, Any]:
        self._require()
        a = ctx.args
        tpl = _id("template", a.get("template_id"), "template_id", "tpl-<24 hex>")
        vm_id = f"{tpl}_0"
        spec = self._spec(vm_id, a)
        with self._lock(vm_id):
            self.driver.destroy(vm_id, 5.0)  # a leftover of an interrupted attempt
            dest = self.replica_root / f"{tpl}.new"
            shutil.rmtree(dest, ignore_errors=True)
            try:
                ctx.progress({"phase": "BOOTING"})
                st = self.driver.create(spec, float(self.cfg.runtime.probe_timeout))
                if st.state != "RUNNING":
                    raise RuntimeFailed(f"the template's command exited ({st.exit_code}) before its snapshot",
                                        {"stage": "boot", "exit_code": st.exit_code})
                ctx.check()
                ctx.progress({"phase": "SNAPSHOTTING"})
                snap = self.driver.snapshot(vm_id, str(dest))
            except BaseException:
                shutil.rmtree(dest, ignore_errors=True)
                raise
            finally:
                self.driver.destroy(vm_id, float(self.cfg.runtime.replica_vm_destroy_timeout))
            final = self.replica_root / tpl
            old = self.replica_root / f"{tpl}.old"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.rename(final, old)
            os.rename(dest, final)
            shutil.rmtree(old, ignore_errors=True)
            versions = self._versions()
            facts = self._facts()
            pins = {k: versions.get(k, "") for k in PIN_NAMES}
            host_facts = {k: facts.get(k, "") for k in FACT_NAMES}
            body = {"artifact_id": a.get("artifact_id"), "memory": True, "pins": pins, "facts": host_facts,
                    "files": snap["files"], "pause_ms": snap["pause_ms"], "vcpus": spec.vcpus,
                    "memory_mib": spec.memory_mib, "boot_ms": st.boot_ms, "ready_ms": st.ready_ms}
            self.catalog.put(REPLICA_KIND, tpl, body)
            log.info("memory snapshot of %s taken (pause %d ms)", tpl, snap["pause_ms"])
            return {"template_id": tpl, "has_memory_snapshot": True, "pins": pins, "facts": host_facts}

    def remove_replica_files(self, template_id: str) -> None:
        """REMOVE_REPLICA's half for memory snapshots (CAT-8: the caller deletes the entry after)."""
        for suffix in ("", ".new", ".old"):
            shutil.rmtree(self.replica_root / f"{template_id}{suffix}", ignore_errors=True)
        if self.driver.name != "none":
            self.driver.destroy(f"{template_id}_0", 5.0)

    # --- helpers -------------------------------------------------------------------------------

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def _put(self, sid: str, body: dict[str, Any]) -> None:
        self.catalog.put(SANDBOX_KIND, sid, body)


def _id(kind: str, value: Any, field: str, shape: str) -> str:
    if not ids.valid(kind, value):
        raise InvalidRequest(f"{field} {str(value)[:80]!r} is not {shape}", {"field": field, "reason": "format"})
    return str(value)


def _int(value: Any, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRequest(f"{field} must be an integer in [{lo}, {hi}]", {"field": field, "reason": "range"})
    return value


def _check_probe(probe: Any) -> None:
    """RT-9: started | exec:CMD | delay:SECONDS."""
    ok = isinstance(probe, str) and len(probe) <= 4096 and "\n" not in probe and (
        probe == "started" or (probe.startswith("exec:") and len(probe) > 5)
        or (probe.startswith("delay:") and probe[6:].isdigit() and int(probe[6:]) <= 3600))
    if not ok:
        raise InvalidRequest(f"probe {str(probe)[:80]!r} is not started, exec:CMD or delay:SECONDS",
                             {"field": "probe", "reason": "format"})


def _now_ms() -> int:
    return int(time.time() * 1000)


__all__ = ["SandboxService", "RESTART_LOST", "TCError"]
