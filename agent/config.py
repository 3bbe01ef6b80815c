"""The agent's typed configuration (SPEC §17). Defaults are the spec's."""
from __future__ import annotations

import dataclasses
import socket

from protocol import ids
from protocol.config import (BuildConfig, CatalogConfig, CodecConfig, ConfigError, Duration, ImageConfig, Percent,
                             SecurityConfig, Size, TaskConfig, TransferConfig, ZmqConfig, load, section)

__all__ = ["AgentConfig", "load_config", "ConfigError", "default_node_id"]


def default_node_id() -> str:
    """The short host name, lower-cased (CONV-1)."""
    return socket.gethostname().split(".")[0].lower()


@section
class AgentSection:
    node_id: str = ""
    state_dir: str = "/var/lib/templatecenter-agent"
    coordinators: list[str] = dataclasses.field(default_factory=lambda: ["tcp://127.0.0.1:7710"])
    coordinator_keys: list[str] = dataclasses.field(default_factory=list)
    address: str = ""
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    blob_endpoint: str = "tcp://0.0.0.0:7713"
    # None: max(10 s, 5 × the heartbeat interval the coordinator sets) (WIRE-10).
    liveness: Duration | None = None
    hello_timeout: Duration = Duration(5.0)
    backoff_initial: Duration = Duration(0.5)
    backoff_max: Duration = Duration(30.0)

    def __post_init__(self) -> None:
        if self.node_id and not ids.valid("node", self.node_id):
            raise ValueError(f"agent.node_id {self.node_id!r} is not a DNS label (CONV-1)")
        if not self.coordinators:
            raise ValueError("agent.coordinators must list at least one endpoint")
        if self.backoff_initial <= 0 or self.backoff_max < self.backoff_initial:
            raise ValueError("agent.backoff_initial must be positive and not above agent.backoff_max")
        unknown = set(self.versions) - {"guest_image", "agent", "hypervisor", "host_kernel"}
        if unknown:
            raise ValueError(f"agent.versions has unknown keys: {', '.join(sorted(unknown))}")


@section
class UnpackConfig:
    max_bytes: Size = Size(64 << 30)
    max_entries: int = 1_000_000
    max_path: int = 4096
    max_xattr: Size = Size(64 << 10)
    max_symlink_hops: int = 255


@section
class RuntimeConfig:
    driver: str = "qemu"
    accel: str = "auto"
    kvm_canary_timeout: Duration = Duration(20.0)
    disk_mode: str = "auto"
    # "" = the newest /boot/vmlinuz-*-cloud-amd64 (RT-5); `make guest-kernel` fetches one into
    # ~/.cache/templatecenter/guest/boot/.
    guest_kernel: str = ""
    # "" = lib/modules/<release> beside the kernel's boot/ dir, else /lib/modules/<release>.
    guest_modules: str = ""
    memory_dir: str = ""  # "" = each sandbox's own directory
    probe_timeout: Duration = Duration(120.0)
    migrate_timeout: Duration = Duration(60.0)
    kill_after: Duration = Duration(10.0)
    # How long an export or snapshot waits for the guest to answer "sync" on its sync port
    # before pausing (TPL-24: page-cache data must reach the exported disk); on a timeout, or a
    # VM without the port, it warns and goes on. 0 = do not ask.
    guest_sync_timeout: Duration = Duration(5.0)
    replica_vm_destroy_timeout: Duration = Duration(30.0)
    mem_reserve: Size = Size(256 << 20)
    max_sandboxes: int = 64
    console_cap: Size = Size(1 << 20)

    def __post_init__(self) -> None:
        if self.driver not in ("qemu", "none"):
            raise ValueError(f"runtime.driver {self.driver!r} is not one of qemu, none")
        if self.accel not in ("auto", "kvm", "tcg"):
            raise ValueError(f"runtime.accel {self.accel!r} is not one of auto, kvm, tcg")
        if self.disk_mode not in ("auto", "reflink", "qcow2"):
            raise ValueError(f"runtime.disk_mode {self.disk_mode!r} is not one of auto, reflink, qcow2")


@section
class StorageSection:
    """The agent's own storage gate (SNAP-16, defence in depth): builds and incoming transfers
    are refused once the store's usage reaches ``reject`` %; the coordinator normally refuses
    first with its own ``storage.*`` thresholds."""
    reject: Percent = Percent(85.0)
    delete_only: Percent = Percent(95.0)

    def __post_init__(self) -> None:
        if not 0 < self.reject <= self.delete_only <= 100:
            raise ValueError("storage.reject and storage.delete_only must satisfy 0 < reject ≤ delete_only ≤ 100")


@dataclasses.dataclass(frozen=True, slots=True)
class AgentConfig:
    agent: AgentSection
    codec: CodecConfig
    zmq: ZmqConfig
    security: SecurityConfig
    task: TaskConfig
    catalog: CatalogConfig
    transfer: TransferConfig
    image: ImageConfig
    unpack: UnpackConfig
    build: BuildConfig
    runtime: RuntimeConfig
    storage: StorageSection

    @property
    def node_id(self) -> str:
        return self.agent.node_id or default_node_id()


def load_config(path: str | None = None, sets: list[str] | tuple[str, ...] = ()) -> AgentConfig:
    return load(AgentConfig, path, sets)
