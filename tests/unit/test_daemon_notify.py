"""protocol/daemon.py: systemd notify and watchdog against a real AF_UNIX datagram listener
(SPEC SEC-9, GC-13, GC-14), and the SEC-1 plain-TCP check both daemons run at start."""
from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Iterator

import pytest

from protocol.config import ConfigError
from protocol.daemon import check_plain_tcp, is_loopback_endpoint, sd_notify, watchdog_interval, watchdog_loop


class Listener:
    """What systemd does: a SOCK_DGRAM socket at NOTIFY_SOCKET collecting datagrams."""

    def __init__(self, address: str) -> None:
        self.env_value = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(5.0)  # an upper bound for a datagram already sent, not a wait

    def recv(self) -> str:
        return self.sock.recv(4096).decode()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listener]:
    if request.param == "path":
        lis = Listener(str(tmp_path / "notify.sock"))
    else:
        lis = Listener(f"@tc-test-notify-{os.getpid()}-{id(request)}")
    yield lis
    lis.close()


@pytest.mark.parametrize("state", ["READY=1", "WATCHDOG=1", "STOPPING=1", "READY=1\nSTATUS=serving"])
def test_sd_notify_delivers_each_state(listener: Listener, state: str) -> None:
    """SEC-9: READY=1, WATCHDOG=1 and STOPPING=1 reach the socket, filesystem path or abstract @name."""
    assert sd_notify(state, {"NOTIFY_SOCKET": listener.env_value}) is True
    assert listener.recv() == state


def test_sd_notify_uses_the_process_environment(listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.env_value)
    assert sd_notify("READY=1")
    assert listener.recv() == "READY=1"


def test_sd_notify_without_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False


def test_sd_notify_to_a_missing_socket_never_raises(tmp_path: Path) -> None:
    """A vanished listener must not take the daemon down."""
    assert sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False


def test_a_listener_that_stopped_reading_never_blocks_the_sender(listener: Listener) -> None:
    """A full datagram queue makes sd_notify fail fast (False), not hang the daemon's event loop."""
    env = {"NOTIFY_SOCKET": listener.env_value}
    results = [sd_notify("WATCHDOG=1", env) for _ in range(2000)]  # far beyond max_dgram_qlen
    assert results[0] is True and results[-1] is False


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid=42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, pid=42) == 15.0


@pytest.mark.parametrize("env", [{}, {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"},
                                 {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "soon"}])
def test_no_watchdog_when_not_asked_or_meant_for_another_pid(env: dict[str, str]) -> None:
    """WATCHDOG_PID naming another process (an inherited environment) means: do not ping."""
    assert watchdog_interval(env, pid=42) is None


def test_watchdog_loop_pings_repeatedly(listener: Listener) -> None:
    """SEC-9: WATCHDOG=1 keeps coming from the event loop at the requested interval."""
    env = {"NOTIFY_SOCKET": listener.env_value}

    async def run() -> list[str]:
        task = asyncio.create_task(watchdog_loop(0.02, env))
        got = [await asyncio.to_thread(listener.recv) for _ in range(3)]
        task.cancel()
        return got

    assert asyncio.run(run()) == ["WATCHDOG=1"] * 3


# --- SEC-1 -----------------------------------------------------------------------------

@pytest.mark.parametrize("ep", ["tcp://127.0.0.1:7710", "tcp://127.8.9.10:1", "tcp://localhost:7710",
                                "tcp://[::1]:7710", "tcp://127.0.0.1:*", "ipc:///run/x.sock", "inproc://a",
                                "tcp://127.0.0.1:9;127.0.0.1:7710"])
def test_loopback_and_ipc_endpoints_pass_without_curve(ep: str) -> None:
    """SEC-1: plain TCP is allowed on loopback binds; ipc:// always."""
    assert is_loopback_endpoint(ep)
    check_plain_tcp([ep], curve=False)


@pytest.mark.parametrize("ep", ["tcp://0.0.0.0:7713", "tcp://*:7710", "tcp://10.1.2.3:7710", "tcp://[::]:1",
                                "tcp://eth0:7710", "tcp://coord.example:7710", "tcp://192.0.2.1:1;127.0.0.1:2"])
def test_non_loopback_tcp_is_refused_naming_the_endpoint(ep: str) -> None:
    """SEC-1: with security.curve = false a non-loopback TCP endpoint stops the daemon."""
    with pytest.raises(ConfigError) as err:
        check_plain_tcp(["ipc:///run/ok.sock", ep], curve=False)
    assert ep in str(err.value)


def test_other_transports_are_refused() -> None:
    with pytest.raises(ConfigError, match="pgm://"):
        check_plain_tcp(["pgm://eth0;239.192.1.1:5555"], curve=False)


def test_curve_true_allows_any_tcp_endpoint() -> None:
    """SEC-1: with CURVE every tcp endpoint is allowed; the refusal is for plain TCP off loopback."""
    check_plain_tcp(["tcp://0.0.0.0:7710", "tcp://192.0.2.7:7713"], curve=True)
    with pytest.raises(ConfigError, match="tcp://0.0.0.0:7710"):
        check_plain_tcp(["tcp://0.0.0.0:7710"], curve=False)
