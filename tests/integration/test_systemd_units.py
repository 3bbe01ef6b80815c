"""The systemd units, sysusers.d/tmpfiles.d entries and example configs in systemd/.

Requirements: SEC-5 (admin socket directory), SEC-9 (units), RT-15 (sandboxes survive an agent
restart), CFG-1/CFG-2 (TOML configuration, defaults). PID 1 is not systemd in CI, so the units
are checked offline with ``systemd-analyze verify``, which must exit 0 *and* print nothing:
it exits 0 on warnings such as an unknown key (TOOLS.md §6).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "systemd"

COORDINATOR_UNIT = SYSTEMD / "tc-coordinator.service"
AGENT_UNIT = SYSTEMD / "tc-agent.service"
COORDINATOR_EXAMPLE = SYSTEMD / "coordinator.toml.example"
AGENT_EXAMPLE = SYSTEMD / "agent.toml.example"

UNITS = [
    pytest.param(COORDINATOR_UNIT, "/usr/local/bin/tc-coordinator", "tc-coordinator", id="coordinator"),
    pytest.param(AGENT_UNIT, "/usr/local/bin/tc-agent", "tc-agent", id="agent"),
]


def _tool(name: str) -> str:
    """The path of a systemd tool; fails (never skips) when it is missing, as CI installs it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: install the Debian package 'systemd' "
                    f"(apt-get install systemd)")
    return path


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def _service_section(unit: Path) -> dict[str, list[str]]:
    """Key -> values of the unit's [Service] section, in order (keys may repeat)."""
    values: dict[str, list[str]] = {}
    section = None
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def _one(values: dict[str, list[str]], key: str) -> str | None:
    got = values.get(key)
    if got is None:
        return None
    assert len(got) == 1, f"{key}= is set {len(got)} times: {got}"
    return got[0]


@pytest.mark.parametrize(("unit", "binary", "command"), UNITS)
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, unit: Path, binary: str, command: str) -> None:
    """SEC-9: `systemd-analyze verify` exits 0 with empty stderr for each unit.

    verify fails when the ExecStart binary does not exist, so only that path is replaced by an
    existing executable (the installed daemon if on PATH, else this Python); nothing else changes.
    """
    analyze = _tool("systemd-analyze")
    text = unit.read_text()
    exec_lines = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    assert exec_lines == [f"ExecStart={binary} --config /etc/templatecenter/{command.removeprefix('tc-')}.toml"]
    stand_in = shutil.which(command) or sys.executable
    copy = tmp_path / unit.name
    copy.write_text(text.replace(f"ExecStart={binary} ", f"ExecStart={stand_in} ", 1))

    result = _run([analyze, "verify", str(copy)])

    print(f"$ systemd-analyze verify {copy}  (ExecStart binary: {stand_in})")
    print(f"rc={result.returncode}\n--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


@pytest.mark.parametrize(("unit", "binary", "command"), UNITS)
def test_unit_has_notify_watchdog_and_limits(unit: Path, binary: str, command: str) -> None:
    """SEC-9: both units use Type=notify with a watchdog, restart on failure, LimitNOFILE=65536."""
    service = _service_section(unit)
    assert _one(service, "Type") == "notify"
    assert _one(service, "NotifyAccess") == "main"
    assert _one(service, "WatchdogSec") == "30"
    assert _one(service, "Restart") == "on-failure"
    assert _one(service, "RestartSec") == "2"
    assert _one(service, "TimeoutStartSec") == "60"
    assert _one(service, "LimitNOFILE") == "65536"
    assert _one(service, "ConfigurationDirectory") == "templatecenter"


def test_coordinator_unit_runs_as_tc_with_private_directories() -> None:
    """SEC-9, SEC-5: the coordinator runs as tc; state and runtime directories are 0750.

    /run/templatecenter (RuntimeDirectory=) holds the admin socket: tc:tc 0750, so members of
    group tc can reach the 0660 socket and nobody else can.
    """
    service = _service_section(COORDINATOR_UNIT)
    assert _one(service, "User") == "tc"
    assert _one(service, "Group") == "tc"
    assert _one(service, "StateDirectory") == "templatecenter"
    assert _one(service, "StateDirectoryMode") == "0750"
    assert _one(service, "RuntimeDirectory") == "templatecenter"
    assert _one(service, "RuntimeDirectoryMode") == "0750"
    assert _one(service, "CapabilityBoundingSet") == ""
    assert _one(service, "NoNewPrivileges") == "yes"
    assert _one(service, "ProtectSystem") == "strict"


def test_agent_unit_runs_as_root_and_spares_sandboxes() -> None:
    """SEC-9, RT-15: the agent runs as root, and a stop or restart leaves QEMU children running.

    KillMode=process signals only the main process (mixed would SIGKILL the rest of the cgroup),
    and the runtime directory is preserved for the sandboxes that outlive the agent.
    """
    service = _service_section(AGENT_UNIT)
    assert _one(service, "User") in (None, "root")
    assert _one(service, "Group") in (None, "root")
    assert _one(service, "StateDirectory") == "templatecenter-agent"
    assert _one(service, "StateDirectoryMode") == "0700"
    assert _one(service, "RuntimeDirectory") == "templatecenter-agent"
    assert _one(service, "RuntimeDirectoryMode") == "0700"
    assert _one(service, "RuntimeDirectoryPreserve") == "yes"
    assert _one(service, "KillMode") == "process"
    # Options whose restrictions QEMU would inherit and trip over (see the unit's comments).
    for key in ("PrivateTmp", "PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock",
                "ProtectKernelModules", "RestrictSUIDSGID", "MemoryDenyWriteExecute"):
        assert key not in service, f"{key}= would break image unpacking or QEMU under the agent"


def test_sysusers_creates_the_tc_system_user(tmp_path: Path) -> None:
    """SEC-9: sysusers.d creates the system user and group tc, home /var/lib/templatecenter."""
    sysusers = _tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    result = _run([sysusers, f"--root={tmp_path}", str(SYSTEMD / "sysusers.d" / "templatecenter.conf")])
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stderr
    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()}
    assert "tc" in users and "tc" in groups
    _, _, uid, gid, _, home, shell = users["tc"]
    assert int(uid) < 1000, "tc must be a system user"
    assert gid == groups["tc"][2]
    assert home == "/var/lib/templatecenter"
    assert shell == "/usr/sbin/nologin"


def test_tmpfiles_creates_directories_matching_the_units(tmp_path: Path) -> None:
    """SEC-5, SEC-7, SEC-9: tmpfiles.d agrees with the units' StateDirectory modes and owners.

    /run/templatecenter is deliberately left to the coordinator's RuntimeDirectory=.
    """
    tmpfiles = _tool("systemd-tmpfiles")
    conf = SYSTEMD / "tmpfiles.d" / "templatecenter.conf"
    assert not re.search(r"^\s*[a-zA-Z]\S*\s+/run/", conf.read_text(), re.M), \
        "/run/templatecenter* belongs to the units' RuntimeDirectory="
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles --create needs root to chown (CI runs as root)")
    (tmp_path / "etc").mkdir()
    sysusers = _run([_tool("systemd-sysusers"), f"--root={tmp_path}",
                     str(SYSTEMD / "sysusers.d" / "templatecenter.conf")])
    assert sysusers.returncode == 0, sysusers.stderr
    tc_uid = next(int(line.split(":")[2]) for line in (tmp_path / "etc/passwd").read_text().splitlines()
                  if line.startswith("tc:"))

    result = _run([tmpfiles, f"--root={tmp_path}", "--create", str(conf)])

    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    expected = {
        "etc/templatecenter": (0o755, 0),
        "var/lib/templatecenter": (0o750, tc_uid),
        "var/lib/templatecenter/import": (0o2770, tc_uid),
        "var/lib/templatecenter-agent": (0o700, 0),
    }
    for rel, (mode, uid) in expected.items():
        st = (tmp_path / rel).stat()
        assert (oct(st.st_mode & 0o7777), st.st_uid) == (oct(mode), uid), rel


def _loopback_only(doc: dict, where: str) -> None:
    """SEC-1: with security.curve = false every TCP endpoint must bind or reach loopback."""
    assert doc["security"]["curve"] is False
    endpoints = re.findall(r"tcp://[^\"']+", str(doc))
    assert endpoints, where
    for endpoint in endpoints:
        assert endpoint.startswith("tcp://127.0.0.1:"), f"{where}: {endpoint} is not loopback"


def test_coordinator_example_config_sections() -> None:
    """CFG-1, SEC-1: coordinator.toml.example parses and documents the main sections and keys."""
    doc = tomllib.loads(COORDINATOR_EXAMPLE.read_text())
    assert {"coordinator", "db", "heartbeat", "security"} <= doc.keys()
    assert {"agent_endpoint", "admin_endpoint", "events_endpoint", "state_dir"} <= doc["coordinator"].keys()
    assert doc["coordinator"]["admin_endpoint"] == "ipc:///run/templatecenter/admin.sock"
    assert doc["db"]["url"] == "sqlite:////var/lib/templatecenter/coordinator.db"
    assert doc["heartbeat"]["interval"] == "2s"
    _loopback_only(doc, COORDINATOR_EXAMPLE.name)


def test_agent_example_config_sections() -> None:
    """CFG-1, CFG-2, SEC-1: agent.toml.example parses and documents the main sections and keys."""
    text = AGENT_EXAMPLE.read_text()
    doc = tomllib.loads(text)
    assert {"agent", "security", "runtime", "image"} <= doc.keys()
    assert {"coordinators", "blob_endpoint", "state_dir", "labels"} <= doc["agent"].keys()
    assert re.search(r"^#\s*node_id\s*=", text, re.M), "agent.node_id is documented"
    assert doc["agent"]["state_dir"] == "/var/lib/templatecenter-agent"
    assert doc["image"]["local_roots"] == ["/var/lib/templatecenter/import"]
    _loopback_only(doc, AGENT_EXAMPLE.name)


def _enable_commented_lines(path: Path) -> tuple[str, dict[str, list[str]]]:
    """The example with every ``# [section]`` and ``# key = value`` line enabled, and those keys."""
    out: list[str] = []
    enabled: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        header = re.match(r"^#?\s*\[([a-z_]+)\]\s*$", line)
        entry = re.match(r"^#\s*(([a-z_]+)\s*=.*)$", line)
        if header:
            current = header.group(1)
            out.append(f"[{current}]")
        elif entry and current is not None:
            enabled.setdefault(current, []).append(entry.group(2))
            out.append(entry.group(1))
        else:
            out.append(line)
    return "\n".join(out) + "\n", enabled


@pytest.mark.parametrize("which", ["coordinator", "agent"])
def test_example_config_loads_and_comments_show_the_defaults(tmp_path: Path, which: str) -> None:
    """CFG-1: each example loads with the daemon's own loader (an unknown key would stop it), and
    every commented-out ``key = value`` line, once enabled, equals the built-in default."""
    if which == "coordinator":
        from coordinator.config import load_config
        example = COORDINATOR_EXAMPLE
    else:
        from agent.config import load_config
        example = AGENT_EXAMPLE
    load_config(str(example))
    defaults = load_config(None)
    text, enabled_keys = _enable_commented_lines(example)
    assert enabled_keys, "no commented defaults found"
    enabled_file = tmp_path / example.name
    enabled_file.write_text(text)

    enabled = load_config(str(enabled_file))

    for section, keys in enabled_keys.items():
        for key in keys:
            assert getattr(getattr(enabled, section), key) == getattr(getattr(defaults, section), key), \
                f"{example.name}: the comment for {section}.{key} does not show the default"
