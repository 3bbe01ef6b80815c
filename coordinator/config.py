"""The coordinator's typed configuration (SPEC §17). Defaults are the spec's."""
from __future__ import annotations

import dataclasses

from protocol.config import (BuildConfig, CatalogConfig, CodecConfig, ConfigError, Duration, ImageConfig,
                             Percent, SecurityConfig, Size, TaskConfig, TransferConfig, ZmqConfig, load,
                             section)

__all__ = ["CoordinatorConfig", "load_config", "ConfigError"]


@section
class CoordinatorSection:
    state_dir: str = "/var/lib/templatecenter"
    agent_endpoint: str = "tcp://0.0.0.0:7710"
    admin_endpoint: str = "ipc:///run/templatecenter/admin.sock"
    events_endpoint: str = "ipc:///run/templatecenter/events.sock"
    # Group that may use the admin ipc socket (SEC-5); empty keeps the process's group.
    admin_group: str = "tc"
    # Public keys ``NODE.key`` accepted at start, for provisioning (SEC-4); empty: none.
    accepted_keys_dir: str = ""


@section
class DbConfig:
    url: str = "sqlite:////var/lib/templatecenter/coordinator.db"


@section
class HeartbeatConfig:
    interval: Duration = Duration(2.0)
    max_rate: int = 20_000
    suspect_missed: float = 2.0
    lease_missed: float = 5.0
    lease_ttl_min: Duration = Duration(15.0)
    failover_grace: Duration = Duration(30.0)
    last_seen_flush: Duration = Duration(1.0)

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise ValueError("heartbeat.interval must be positive")
        if self.max_rate <= 0:
            raise ValueError("heartbeat.max_rate must be positive")
        if not 0 < self.suspect_missed < self.lease_missed:
            raise ValueError("heartbeat.suspect_missed must be positive and below heartbeat.lease_missed")


@section
class DistConfig:
    per_source: int = 2
    max_attempts: int = 3
    space_reserve: Size = Size(1 << 30)


@section
class LockConfig:
    wait: Duration = Duration(10.0)
    poll: Duration = Duration(0.2)


@section
class JobConfig:
    progress_flush: Duration = Duration(1.0)
    stale_after: Duration = Duration(7200.0)
    retention: Duration = Duration(30 * 86400.0)
    # TEST ONLY, off by default: the coordinator process exits (code 70) right after a job
    # persists the step after the one named here, simulating a crash at that step boundary
    # (issue 5's restart tests). Never set it in production.
    test_crash_after_step: str = ""


@section
class SnapshotConfig:
    op_timeout: Duration = Duration(900.0)
    stuck_after: Duration = Duration(900.0)
    rollback_gen_scan: int = 100
    list_limit: int = 20
    list_max: int = 100


@section
class RpcTimeoutConfig:
    rpc_timeout: Duration = Duration(300.0)


@section
class CleanupConfig:
    rpc_timeout: Duration = Duration(60.0)


@section
class CompatConfig:
    debounce: Duration = Duration(5.0)
    scan_timeout: Duration = Duration(30.0)


@section
class ArtifactConfig:
    gc_ttl: Duration = Duration(7 * 86400.0)


@section
class GcConfig:
    interval: Duration = Duration(600.0)
    batch: int = 100
    workers: int = 5
    orphan_retention: Duration | None = None
    stray_grace: Duration = Duration(86400.0)


@section
class RefsConfig:
    orphan_ttl: Duration = Duration(86400.0)


@section
class ReconcileConfig:
    interval: Duration = Duration(300.0)
    batch: int = 100
    # A replica made READY this recently is not called missing yet: the task result that made
    # it READY can reach the coordinator before the catalog delta listing the copy (GC-11).
    presence_grace: Duration = Duration(10.0)


@section
class StorageConfig:
    warn: Percent = Percent(70.0)
    reject: Percent = Percent(85.0)
    delete_only: Percent = Percent(95.0)
    refresh_timeout: Duration = Duration(5.0)


@section
class ResolveConfig:
    backstop_interval: Duration = Duration(60.0)


@section
class PreheatConfig:
    enabled: bool = False
    interval: Duration = Duration(300.0)
    debounce: Duration = Duration(2.0)
    cooldown: Duration = Duration(600.0)


@section
class HaConfig:
    lease_renew: Duration = Duration(2.0)
    lease_ttl: Duration = Duration(10.0)


@section
class TemplateConfig:
    vcpus: int = 1
    memory: Size = Size(512 << 20)
    snapshot_mode: str = "rootfs"
    compat_policy: str = "STRICT"

    def __post_init__(self) -> None:
        if self.snapshot_mode not in ("rootfs", "memory"):
            raise ValueError(f"template.snapshot_mode {self.snapshot_mode!r} is not one of rootfs, memory")
        if self.compat_policy not in ("STRICT", "GUEST_ONLY"):
            raise ValueError(f"template.compat_policy {self.compat_policy!r} is not one of STRICT, GUEST_ONLY")


@section
class AdminConfig:
    # z85 public keys of tcctl clients allowed on a TCP admin or event endpoint (SEC-2).
    allowed_keys: list[str] = dataclasses.field(default_factory=list)
    reply_timeout: Duration = Duration(30.0)
    progress_every: Duration = Duration(5.0)
    wait_timeout: Duration = Duration(1800.0)


@dataclasses.dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    coordinator: CoordinatorSection
    db: DbConfig
    heartbeat: HeartbeatConfig
    codec: CodecConfig
    zmq: ZmqConfig
    security: SecurityConfig
    task: TaskConfig
    catalog: CatalogConfig
    transfer: TransferConfig
    dist: DistConfig
    image: ImageConfig
    build: BuildConfig
    lock: LockConfig
    job: JobConfig
    snapshot: SnapshotConfig
    commit: RpcTimeoutConfig
    cleanup: CleanupConfig
    compat: CompatConfig
    artifact: ArtifactConfig
    gc: GcConfig
    refs: RefsConfig
    reconcile: ReconcileConfig
    storage: StorageConfig
    resolve: ResolveConfig
    preheat: PreheatConfig
    ha: HaConfig
    template: TemplateConfig
    admin: AdminConfig


def load_config(path: str | None = None, sets: list[str] | tuple[str, ...] = ()) -> CoordinatorConfig:
    return load(CoordinatorConfig, path, sets)
