"""The runtime driver interface (SPEC RT-1) and the ``none`` driver (RT-2).

A driver runs VMs named by a VM id (a sandbox id, or ``<template id>_0`` for the VM a
template memory snapshot is taken from, DIST-9). It knows nothing about the catalog: the
sandbox service (agent/runtime/sandboxes.py) keeps entries and calls the driver.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from protocol.errors import SandboxUnsupported

if TYPE_CHECKING:
    from ..config import AgentConfig


@dataclass(frozen=True)
class VmSpec:
    """What a VM is started from: a root disk source (a template ext4, or a snapshot's frozen
    disk) and the generated runtime config (TPL-30)."""
    vm_id: str
    base_disk: str
    runtime_config: dict[str, Any]
    vcpus: int
    memory_mib: int
    probe: str = "started"


@dataclass
class VmStatus:
    """A VM as the driver sees it. ``state``: RUNNING, EXITED or FAILED."""
    vm_id: str
    state: str
    exit_code: int | None = None
    error: str = ""
    boot_ms: int = 0
    ready_ms: int = 0
    restored: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class RuntimeDriver(Protocol):
    """RT-1: facts, create (cold or from a memory snapshot), destroy, list, snapshot; rollback
    and export (RT-14) are part of the interface for the snapshot issue."""
    name: str
    sandbox: bool

    def start(self) -> None: ...
    def facts(self) -> dict[str, Any]: ...
    def versions(self) -> dict[str, str]: ...
    def create(self, spec: VmSpec, probe_timeout: float) -> VmStatus: ...
    def restore(self, vm_id: str, snapshot_dir: str) -> VmStatus: ...
    def snapshot(self, vm_id: str, dest_dir: str) -> dict[str, Any]: ...
    def destroy(self, vm_id: str, timeout: float | None = None) -> bool: ...
    def status(self, vm_id: str) -> VmStatus | None: ...
    def list(self) -> list[str]: ...
    def console(self, vm_id: str, tail_bytes: int) -> str: ...
    def alive(self, vm_id: str) -> bool: ...
    def rollback(self, vm_id: str, snapshot_dir: str) -> VmStatus: ...
    def export(self, vm_id: str, dest_dir: str) -> dict[str, Any]: ...


class NoneDriver:
    """Build-only nodes (RT-2): ``sandbox`` = false and every runtime operation refuses."""
    name = "none"
    sandbox = False

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id

    def _refuse(self, *_: Any, **__: Any) -> Any:
        raise SandboxUnsupported(f"node {self.node_id} has no sandbox runtime (driver none)",
                                 {"node": self.node_id})

    def start(self) -> None:
        return None

    def facts(self) -> dict[str, Any]:
        return {}

    def versions(self) -> dict[str, str]:
        return {}

    def list(self) -> list[str]:
        return []

    def alive(self, vm_id: str) -> bool:
        return False

    def status(self, vm_id: str) -> VmStatus | None:
        return None

    create = restore = snapshot = destroy = console = rollback = export = _refuse


def make_driver(cfg: "AgentConfig") -> RuntimeDriver:
    """The driver ``runtime.driver`` names (validated by the config: qemu or none)."""
    if cfg.runtime.driver == "none":
        return NoneDriver(cfg.node_id)
    from .qemu import QemuDriver  # only qemu nodes need it

    return QemuDriver(cfg)
