"""Typed configuration: TOML + ``--set`` (SPEC CFG-1, CFG-2; units per CONV-3)."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, default_node_id, load_config as load_agent
from coordinator.config import CoordinatorConfig, load_config as load_coord
from protocol.codec import DEFAULT_LIMITS
from protocol.config import ConfigError, format_duration, parse_duration, parse_percent, parse_size

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
MIN, HOUR, DAY = 60.0, 3600.0, 86400.0


def _get(cfg: Any, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


# SPEC §17's table (and CFG-2's extra keys), sampled across every section each daemon has.
COORD_DEFAULTS = {
    "coordinator.state_dir": "/var/lib/templatecenter",
    "coordinator.agent_endpoint": "tcp://0.0.0.0:7710",
    "coordinator.admin_endpoint": "ipc:///run/templatecenter/admin.sock",
    "coordinator.events_endpoint": "ipc:///run/templatecenter/events.sock",
    "db.url": "sqlite:////var/lib/templatecenter/coordinator.db",
    "heartbeat.interval": 2.0, "heartbeat.max_rate": 20_000, "heartbeat.suspect_missed": 2,
    "heartbeat.lease_missed": 5, "heartbeat.lease_ttl_min": 15.0, "heartbeat.failover_grace": 30.0,
    "heartbeat.last_seen_flush": 1.0,
    "codec.max_frame": 16 * MiB, "codec.max_str": 1 * MiB, "codec.max_bin": 16 * MiB,
    "codec.max_array": 100_000, "codec.max_map": 10_000,
    "zmq.hwm": 10_000, "zmq.linger": 1.0,
    "task.accept_timeout": 10.0, "task.resend": 3, "task.progress_interval": 1.0, "task.record_retention": 7 * DAY,
    "catalog.delta_coalesce": 0.5, "catalog.page_size": 1000,
    "transfer.chunk": 1 * MiB, "transfer.window": 8, "transfer.chunk_retries": 3, "transfer.token_ttl": HOUR,
    "dist.per_source": 2, "dist.max_attempts": 3, "dist.space_reserve": 1 * GiB,
    "image.platform": "linux/amd64", "image.default_registry": "registry-1.docker.io",
    "image.insecure_registries": [], "image.local_roots": ["/var/lib/templatecenter/import"],
    "image.layer_concurrency": 4, "image.registry_retries": 3, "image.cache_budget": 20 * GiB,
    "image.cache_low_water": 90,
    "build.default_writable": 1 * GiB, "build.max_writable": 1 * TiB, "build.min_size": 64 * MiB,
    "build.inode_factor": 1.2, "build.inode_extra": 1024, "build.inode_per_writable": 16 * KiB,
    "build.slack": 5, "build.journal_small": 16 * MiB, "build.journal_large": 64 * MiB,
    "build.grow_factor": 1.25, "build.grow_retries": 2, "build.space_factor": 4, "build.max_builders": 2,
    "build.wait_poll": 5.0,
    "lock.wait": 10.0, "lock.poll": 0.2,
    "job.progress_flush": 1.0, "job.stale_after": 2 * HOUR, "job.retention": 30 * DAY,
    "snapshot.op_timeout": 15 * MIN, "snapshot.stuck_after": 15 * MIN, "snapshot.rollback_gen_scan": 100,
    "snapshot.list_limit": 20, "snapshot.list_max": 100,
    "commit.rpc_timeout": 5 * MIN, "cleanup.rpc_timeout": 1 * MIN,
    "compat.debounce": 5.0, "compat.scan_timeout": 30.0,
    "artifact.gc_ttl": 7 * DAY, "gc.interval": 10 * MIN, "gc.batch": 100, "gc.workers": 5,
    "gc.orphan_retention": None, "gc.stray_grace": 24 * HOUR, "refs.orphan_ttl": 24 * HOUR,
    "reconcile.interval": 5 * MIN, "reconcile.batch": 100,
    "storage.warn": 70, "storage.reject": 85, "storage.delete_only": 95, "storage.refresh_timeout": 5.0,
    "resolve.backstop_interval": 60.0,
    "preheat.enabled": False, "preheat.interval": 5 * MIN, "preheat.debounce": 2.0, "preheat.cooldown": 10 * MIN,
    "ha.lease_renew": 2.0, "ha.lease_ttl": 10.0,
    "template.vcpus": 1, "template.memory": 512 * MiB, "template.snapshot_mode": "rootfs",
    "template.compat_policy": "STRICT",
    "security.curve": True, "security.max_bad_msgs": 100, "security.bad_peer_cooldown": 60.0,
    "security.max_pending_keys": 1000,
    "admin.reply_timeout": 30.0, "admin.progress_every": 5.0, "admin.wait_timeout": 30 * MIN,
}

AGENT_DEFAULTS = {
    "agent.state_dir": "/var/lib/templatecenter-agent",
    "agent.coordinators": ["tcp://127.0.0.1:7710"],
    "agent.coordinator_keys": [],
    "agent.labels": {},
    "agent.blob_endpoint": "tcp://0.0.0.0:7713",
    "agent.liveness": None,  # max(10 s, 5 × H), computed from the interval the coordinator sets
    "agent.hello_timeout": 5.0, "agent.backoff_initial": 0.5, "agent.backoff_max": 30.0,
    "codec.max_frame": 16 * MiB, "codec.max_array": 100_000,
    "zmq.hwm": 10_000, "zmq.linger": 1.0,
    "task.accept_timeout": 10.0, "task.record_retention": 7 * DAY,
    "transfer.chunk": 1 * MiB, "transfer.window": 8,
    "image.cache_budget": 20 * GiB, "image.cache_low_water": 90,
    "unpack.max_bytes": 64 * GiB, "unpack.max_entries": 1_000_000, "unpack.max_path": 4096,
    "unpack.max_xattr": 64 * KiB, "unpack.max_symlink_hops": 255,
    "build.max_builders": 2, "build.journal_large": 64 * MiB,
    "runtime.driver": "qemu", "runtime.accel": "auto", "runtime.kvm_canary_timeout": 20.0,
    "runtime.disk_mode": "auto", "runtime.probe_timeout": 120.0, "runtime.migrate_timeout": 60.0,
    "runtime.kill_after": 10.0, "runtime.replica_vm_destroy_timeout": 30.0,
    "runtime.mem_reserve": 256 * MiB, "runtime.max_sandboxes": 64, "runtime.console_cap": 1 * MiB,
    "security.curve": True,
}


@pytest.mark.parametrize("key,expected", sorted(COORD_DEFAULTS.items()))
def test_coordinator_defaults(key: str, expected: Any) -> None:
    """CFG-1 / §17: every coordinator default equals the spec's table."""
    assert _get(load_coord(), key) == expected


@pytest.mark.parametrize("key,expected", sorted(AGENT_DEFAULTS.items()))
def test_agent_defaults(key: str, expected: Any) -> None:
    """CFG-1 / CFG-2 / §17: every agent default equals the spec's table."""
    assert _get(load_agent(), key) == expected


def test_codec_section_gives_the_wire_limits() -> None:
    """WIRE-2 / CFG codec.*: the default codec section is exactly the codec's default Limits."""
    assert load_coord().codec.limits() == DEFAULT_LIMITS
    assert load_agent(sets=["codec.max_str=2MiB"]).codec.limits().max_str == 2 * MiB


def test_agent_node_id_defaults_to_short_lower_host_name() -> None:
    """CFG-2 / CONV-1: agent.node_id defaults to the short host name, lower-cased."""
    cfg = load_agent()
    assert cfg.agent.node_id == ""
    assert cfg.node_id == default_node_id() == socket.gethostname().split(".")[0].lower()
    assert load_agent(sets=["agent.node_id=node-7"]).node_id == "node-7"


# --- TOML file and --set -------------------------------------------------------------------

def _toml(tmp_path: Path, text: str) -> str:
    p = tmp_path / "tc.toml"
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_toml_file_loading(tmp_path: Path) -> None:
    """CFG-1: values come from a TOML file, typed by the section's annotations."""
    path = _toml(tmp_path, """
[heartbeat]
interval = "500ms"
max_rate = 100

[codec]
max_frame = "4 MiB"
max_array = 50

[gc]
orphan_retention = "7d"

[storage]
warn = "60%"
reject = 80

[image]
insecure_registries = ["localhost:5000", "10.0.0.1:5000"]

[preheat]
enabled = true
""")
    cfg = load_coord(path)
    assert isinstance(cfg, CoordinatorConfig)
    assert cfg.heartbeat.interval == 0.5
    assert cfg.heartbeat.max_rate == 100
    assert cfg.codec.max_frame == 4 * MiB and cfg.codec.max_array == 50
    assert cfg.gc.orphan_retention == 7 * DAY
    assert cfg.storage.warn == 60 and cfg.storage.reject == 80
    assert cfg.image.insecure_registries == ["localhost:5000", "10.0.0.1:5000"]
    assert cfg.preheat.enabled is True
    # untouched keys keep their defaults
    assert cfg.heartbeat.lease_ttl_min == 15.0 and cfg.storage.delete_only == 95


def test_agent_toml_tables(tmp_path: Path) -> None:
    """CFG-2: agent.labels and agent.versions are TOML tables; agent.coordinators a list."""
    path = _toml(tmp_path, """
[agent]
node_id = "edge-3"
coordinators = ["tcp://10.0.0.1:7710", "tcp://10.0.0.2:7710"]

[agent.labels]
rack = "r9"
zone = "eu-1"

[agent.versions]
guest_image = "gi-7"
""")
    cfg = load_agent(path)
    assert isinstance(cfg, AgentConfig)
    assert cfg.node_id == "edge-3"
    assert cfg.agent.coordinators == ["tcp://10.0.0.1:7710", "tcp://10.0.0.2:7710"]
    assert cfg.agent.labels == {"rack": "r9", "zone": "eu-1"}
    assert cfg.agent.versions == {"guest_image": "gi-7"}


def test_set_overrides_file(tmp_path: Path) -> None:
    """CFG-2: --set section.key=value wins over the file; later --set wins over earlier."""
    path = _toml(tmp_path, '[heartbeat]\ninterval = "5s"\nmax_rate = 7\n')
    cfg = load_coord(path, ["heartbeat.interval=3s"])
    assert cfg.heartbeat.interval == 3.0
    assert cfg.heartbeat.max_rate == 7
    cfg = load_coord(path, ["heartbeat.interval=3s", "heartbeat.interval=1s"])
    assert cfg.heartbeat.interval == 1.0


def test_set_merges_into_file_table(tmp_path: Path) -> None:
    """CFG-2: a dotted --set adds one key to a table from the file."""
    path = _toml(tmp_path, '[agent.labels]\nzone = "eu-1"\n')
    cfg = load_agent(path, ["agent.labels.rack=r1"])
    assert cfg.agent.labels == {"zone": "eu-1", "rack": "r1"}


def test_set_needs_no_file() -> None:
    """CFG-2: every key can be given on the command line, so tests need no files."""
    cfg = load_coord(sets=["db.url=sqlite:///:memory:", "coordinator.agent_endpoint=tcp://127.0.0.1:0",
                           "preheat.enabled=true", "template.memory=1GiB"])
    assert cfg.db.url == "sqlite:///:memory:"
    assert cfg.coordinator.agent_endpoint == "tcp://127.0.0.1:0"
    assert cfg.preheat.enabled is True
    assert cfg.template.memory == GiB


def test_dotted_table_sets() -> None:
    """CFG-2: agent.labels.rack=r1 and agent.versions.guest_image=x set one table entry each."""
    cfg = load_agent(sets=["agent.labels.rack=r1", "agent.labels.zone=z2", "agent.versions.guest_image=x"])
    assert cfg.agent.labels == {"rack": "r1", "zone": "z2"}
    assert cfg.agent.versions == {"guest_image": "x"}


def test_unknown_version_name_is_refused() -> None:
    """CFG-1: agent.versions only overrides known version names."""
    with pytest.raises(ConfigError, match=r"agent\.versions"):
        load_agent(sets=["agent.versions.kernel_of_doom=1"])


@pytest.mark.parametrize("value,expected", [
    ("tcp://a:1,tcp://b:2", ["tcp://a:1", "tcp://b:2"]),
    ("tcp://a:1, tcp://b:2 ,", ["tcp://a:1", "tcp://b:2"]),
    ('["tcp://a:1", "tcp://b:2"]', ["tcp://a:1", "tcp://b:2"]),
    ("tcp://only:1", ["tcp://only:1"]),
])
def test_list_values_on_the_command_line(value: str, expected: list[str]) -> None:
    """CFG-2: a list key takes "a,b" or TOML list syntax."""
    assert load_agent(sets=[f"agent.coordinators={value}"]).agent.coordinators == expected


def test_a_z85_key_starting_with_a_bracket_is_one_item() -> None:
    """CFG-2, SEC-1: Z85 keys may start with "[" — without quotes that is not TOML but one key."""
    key = "[Z160>Sqc2f)HNJnQ)w}cjYewp[%Jv!y$7n&%X4N"
    assert load_agent(sets=[f"agent.coordinator_keys={key}"]).agent.coordinator_keys == [key]


def test_empty_coordinator_list_is_refused() -> None:
    """CFG-1: agent.coordinators needs at least one endpoint."""
    with pytest.raises(ConfigError, match=r"agent\.coordinators"):
        load_agent(sets=["agent.coordinators="])


def test_bad_toml_list_on_the_command_line() -> None:
    """CFG-1: a broken TOML list is an invalid value naming the key."""
    with pytest.raises(ConfigError, match=r"image\.insecure_registries"):
        load_coord(sets=['image.insecure_registries=["a", '])


# --- units (CONV-3) -------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [
    ("500ms", 0.5), ("2s", 2.0), ("15m", 900.0), ("2h", 7200.0), ("7d", 604800.0),
    ("0.5s", 0.5), ("1.5h", 5400.0), ("30", 30.0), (" 2 s ", 2.0), (3, 3.0), (0.25, 0.25),
])
def test_parse_duration(text: Any, seconds: float) -> None:
    """CONV-3: durations read 500ms, 2s, 15m, 2h, 7d (a bare number is seconds)."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2x", "s", "-1s", "1 min", "2ss", "1e3s", "two", True, -1, "1h30m"])
def test_parse_duration_invalid(text: Any) -> None:
    """CONV-3: anything else is not a duration."""
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("seconds,text", [(0.5, "500ms"), (2, "2s"), (900, "15m"), (7200, "2h"), (604800, "7d")])
def test_format_duration_round_trip(seconds: float, text: str) -> None:
    """CONV-3: durations print in the same units the config reads."""
    assert format_duration(seconds) == text
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text,size", [
    ("16MiB", 16 * MiB), ("1G", GiB), ("20 GiB", 20 * GiB), ("512", 512), ("64KiB", 64 * KiB),
    ("1T", TiB), ("1Ti", TiB), ("2k", 2 * KiB), ("3MB", 3 * MiB), ("1.5KiB", 1536), (4096, 4096),
    ("0", 0),
])
def test_parse_size(text: Any, size: int) -> None:
    """CONV-3: sizes are bytes; K/M/G/T and Ki…Ti suffixes are all ×1024."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "-1", "1X", "1 GiBs", "ten", True, -5, "1e9"])
def test_parse_size_invalid(text: Any) -> None:
    """CONV-3: anything else is not a size."""
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("text,pct", [("70%", 70.0), ("70", 70.0), (85, 85.0), ("0%", 0.0), ("100 %", 100.0)])
def test_parse_percent(text: Any, pct: float) -> None:
    """§17: percentages read 70% or 70."""
    assert parse_percent(text) == pct


@pytest.mark.parametrize("key,value,expected", [
    ("heartbeat.interval", "500ms", 0.5), ("lock.poll", "200ms", 0.2), ("snapshot.op_timeout", "15m", 900.0),
    ("job.stale_after", "2h", 7200.0), ("artifact.gc_ttl", "7d", 604800.0),
    ("codec.max_frame", "16MiB", 16 * MiB), ("image.cache_budget", "20 GiB", 20 * GiB),
    ("dist.space_reserve", "1G", GiB), ("gc.orphan_retention", "unset", None), ("gc.orphan_retention", "3d", 3 * DAY),
    ("storage.warn", "72%", 72.0), ("build.inode_factor", "1.5", 1.5), ("preheat.enabled", "yes", True),
    ("preheat.enabled", "off", False),
])
def test_typed_sets(key: str, value: str, expected: Any) -> None:
    """CFG-2 / CONV-3: a --set string is typed by the key (duration, size, percent, bool, optional)."""
    assert _get(load_coord(sets=[f"{key}={value}"]), key) == expected


# --- unknown keys and invalid values (CFG-1) -----------------------------------------------

@pytest.mark.parametrize("item,names", [
    ("heartbeat.bogus=1", "heartbeat.bogus"),
    ("codec.max_strings=1", "codec.max_strings"),
    ("bogus.key=1", "bogus.key"),
    ("agent.node_id=x", "agent.node_id"),  # the coordinator has no [agent] section
])
def test_unknown_key_on_the_command_line(item: str, names: str) -> None:
    """CFG-1: an unknown section or key stops the daemon with a message naming section.key."""
    with pytest.raises(ConfigError) as ei:
        load_coord(sets=[item])
    assert names in str(ei.value)


@pytest.mark.parametrize("text,names", [
    ("[heartbeat]\nbogus = 1\n", "heartbeat.bogus"),
    ("[bogus]\nkey = 1\n", "bogus.key"),
    ("[unpack]\nmax_bytes = 1\n", "unpack.max_bytes"),  # an agent-only section
])
def test_unknown_key_in_the_file(tmp_path: Path, text: str, names: str) -> None:
    """CFG-1: the same holds for keys read from the TOML file."""
    with pytest.raises(ConfigError) as ei:
        load_coord(_toml(tmp_path, text))
    assert names in str(ei.value)


def test_unknown_key_on_agent() -> None:
    """CFG-1: the agent refuses coordinator-only sections and unknown keys too."""
    with pytest.raises(ConfigError, match=r"agent\.bogus"):
        load_agent(sets=["agent.bogus=1"])
    with pytest.raises(ConfigError, match=r"heartbeat"):
        load_agent(sets=["heartbeat.interval=2s"])


@pytest.mark.parametrize("item", [
    "heartbeat.interval=2x", "heartbeat.interval=-1s", "heartbeat.interval=0", "heartbeat.max_rate=many",
    "heartbeat.max_rate=0", "heartbeat.suspect_missed=9", "codec.max_frame=16QiB", "codec.max_frame=-1",
    "storage.warn=abc", "storage.warn=150%", "preheat.enabled=maybe", "template.vcpus=1.5",
    "template.vcpus=", "gc.orphan_retention=forever",
])
def test_invalid_value_names_the_key(item: str) -> None:
    """CFG-1: an invalid value stops the daemon with a message naming the key."""
    key = item.split("=", 1)[0]
    with pytest.raises(ConfigError) as ei:
        load_coord(sets=[item])
    assert key in str(ei.value)


@pytest.mark.parametrize("text,key", [
    ('[heartbeat]\ninterval = true\n', "heartbeat.interval"),
    ('[heartbeat]\nmax_rate = 1.5\n', "heartbeat.max_rate"),
    ('[heartbeat]\nmax_rate = "x"\n', "heartbeat.max_rate"),
    ('[coordinator]\nstate_dir = 5\n', "coordinator.state_dir"),
    ('[image]\ninsecure_registries = "a"\nlocal_roots = 5\n', "image.local_roots"),
    ('[codec]\nmax_frame = true\n', "codec.max_frame"),
])
def test_invalid_value_in_the_file(tmp_path: Path, text: str, key: str) -> None:
    """CFG-1: wrongly typed TOML values name the key."""
    with pytest.raises(ConfigError) as ei:
        load_coord(_toml(tmp_path, text))
    assert key in str(ei.value)


@pytest.mark.parametrize("text,key", [
    ("[heartbeat]\ninterval = nan\n", "heartbeat.interval"),
    ("[heartbeat]\nlease_ttl_min = inf\n", "heartbeat.lease_ttl_min"),
    ("[admin]\nwait_timeout = -inf\n", "admin.wait_timeout"),
])
def test_non_finite_durations_refused(tmp_path: Path, text: str, key: str) -> None:
    """CFG-1 / CONV-3: TOML's nan and inf are not durations; they must not slip through as numbers."""
    with pytest.raises(ConfigError) as ei:
        load_coord(_toml(tmp_path, text))
    assert key in str(ei.value)


@pytest.mark.parametrize("item", ["template.snapshot_mode=disk", "template.compat_policy=LOOSE"])
def test_template_enums_are_checked(item: str) -> None:
    """CFG-1 / CONV-3: template.snapshot_mode is rootfs|memory, template.compat_policy STRICT|GUEST_ONLY."""
    with pytest.raises(ConfigError) as ei:
        load_coord(sets=[item])
    assert item.split("=")[0] in str(ei.value)


@pytest.mark.parametrize("item", ["template.snapshot_mode=memory", "template.compat_policy=GUEST_ONLY"])
def test_template_enums_accept_spec_values(item: str) -> None:
    """CONV-3: the other spec values are accepted."""
    key, value = item.split("=")
    assert _get(load_coord(sets=[item]), key) == value


@pytest.mark.parametrize("item", ["codec.max_array=-1", "codec.max_map=0", "codec.max_frame=0"])
def test_codec_limits_must_be_positive(item: str) -> None:
    """CFG-1 / WIRE-2: a zero or negative codec limit is invalid (msgpack reads -1 as "no configured limit")."""
    with pytest.raises(ConfigError) as ei:
        load_coord(sets=[item])
    assert item.split("=")[0] in str(ei.value)


@pytest.mark.parametrize("node_id", ["Node_1", "-node", "node-", "n" * 64, "a.b"])
def test_bad_node_id(node_id: str) -> None:
    """CFG-2 / CONV-1: agent.node_id must be a DNS label."""
    with pytest.raises(ConfigError) as ei:
        load_agent(sets=[f"agent.node_id={node_id}"])
    assert "agent.node_id" in str(ei.value)


@pytest.mark.parametrize("item", ["runtime.driver=docker", "runtime.accel=hvf", "agent.backoff_initial=0",
                                  "agent.backoff_max=100ms", "agent.hello_timeout=soon"])
def test_agent_invalid_values(item: str) -> None:
    """CFG-1: the agent's own cross-checks name the key too."""
    with pytest.raises(ConfigError) as ei:
        load_agent(sets=[item])
    assert item.split("=")[0] in str(ei.value)


@pytest.mark.parametrize("item", ["heartbeat", "heartbeat=1", "=1", ".x=1", "heartbeat.=1"])
def test_malformed_set(item: str) -> None:
    """CFG-2: --set takes section.key=value."""
    with pytest.raises(ConfigError):
        load_coord(sets=[item])


def test_missing_and_broken_files(tmp_path: Path) -> None:
    """CFG-1: a missing file or invalid TOML stops the daemon with a ConfigError naming the file."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="nope.toml"):
        load_coord(str(missing))
    with pytest.raises(ConfigError, match="tc.toml"):
        load_coord(_toml(tmp_path, "[heartbeat\ninterval = 2"))
    with pytest.raises(ConfigError, match="interval"):
        load_coord(_toml(tmp_path, "interval = 2\n"))  # a key outside any section


def test_config_is_frozen() -> None:
    """STYLE 13: typed configuration objects, not dicts: sections are frozen."""
    import dataclasses
    cfg = load_coord()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.heartbeat.interval = 9  # type: ignore[misc]
