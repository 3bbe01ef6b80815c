"""Plumbing both daemons share: systemd notify, logging, signals and the SEC-1 endpoint check.

Nothing here knows about agents or coordinators. ``sd_notify`` is the dependency-free
protocol from TOOLS.md §6 (one datagram to ``$NOTIFY_SOCKET``); ``watchdog_loop`` pings from
the asyncio loop itself, so a wedged loop stops the pings and systemd restarts the unit.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, Callable, Iterable, Mapping

import zmq

from .config import ConfigError

__all__ = [
    "sd_notify", "watchdog_interval", "watchdog_loop", "setup_logging", "install_signal_handlers",
    "check_plain_tcp", "is_loopback_endpoint", "CURVE_AVAILABLE", "configure_socket",
]

log = logging.getLogger("daemon")

# Both daemons speak CURVE (SEC-1, SEC-2); the flag stays so a build without it refuses to
# start rather than silently serving plain TCP.
CURVE_AVAILABLE = bool(zmq.has("curve"))


# --- systemd notify (SEC-9, GC-13, GC-14) ---------------------------------------------

def sd_notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to ``$NOTIFY_SOCKET``; False when not run by systemd.

    A path starting with ``@`` is an abstract socket. Failures are logged, never raised:
    a missing notify listener must not take the daemon down. The send never blocks: a unix
    datagram sender blocks once the listener's queue is full (net.unix.max_dgram_qlen), and a
    stalled listener must not stall the event loop; a dropped ping is the lesser evil.
    """
    addr = (env if env is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as s:
            s.connect(addr)
            s.send(state.encode("utf-8"))
    except OSError as exc:
        log.warning("sd_notify %r failed: %s", state.split("\n", 1)[0], exc)
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``WATCHDOG_USEC``), or None if not asked for.

    ``WATCHDOG_PID``, when set, must name this process: a child that inherited the
    environment must not ping on its parent's behalf.
    """
    env = env if env is not None else os.environ
    usec, wpid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if wpid and wpid != str(pid if pid is not None else os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / 2 / 1_000_000 if value > 0 else None


async def watchdog_loop(interval: float, env: Mapping[str, str] | None = None) -> None:
    """Ping WATCHDOG=1 every ``interval`` seconds until cancelled."""
    while True:
        sd_notify("WATCHDOG=1", env)
        await asyncio.sleep(interval)


# --- sockets (WIRE-20) -----------------------------------------------------------------

def configure_socket(sock: "zmq.Socket[Any]", *, hwm: int, linger: float, max_frame: int | None = None,
                     immediate: bool = False) -> None:
    """WIRE-20 options: linger (seconds, from zmq.linger), both HWMs, TCP keepalive.

    ``max_frame`` sets MAXMSGSIZE a little above the codec's frame limit, so libzmq drops a
    peer sending a giant frame before Python allocates it. ``immediate`` (agent DEALER): queue
    only on completed connections, so nothing queued before a reconnect is sent after it.
    """
    sock.setsockopt(zmq.LINGER, int(linger * 1000))
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    if max_frame is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame + 4096)
    if immediate:
        sock.setsockopt(zmq.IMMEDIATE, 1)


# --- logging --------------------------------------------------------------------------

class _OneLineFormatter(logging.Formatter):
    """Keeps one event on one line (journald and grep both depend on it): newlines escaped."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r", "\\r").replace("\n", "\\n")


def setup_logging(program: str, node: str, level: int = logging.INFO) -> None:
    """Log to stderr, one line per event, tagged ``program[node]`` (journald adds its own time,
    but tests and plain terminals need one)."""
    handler = logging.StreamHandler(sys.stderr)
    tag = f"{program}[{node}]".replace("%", "%%")
    formatter = _OneLineFormatter(f"%(asctime)s.%(msecs)03dZ {tag} %(levelname)s %(name)s: %(message)s",
                                  "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime  # UTC, as the Z says (CONV-3)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


# --- signals --------------------------------------------------------------------------

def install_signal_handlers(loop: asyncio.AbstractEventLoop, on_stop: Callable[[str], None],
                            on_reload: Callable[[], None] | None = None) -> None:
    """SIGTERM/SIGINT call ``on_stop(signal name)``; SIGHUP calls ``on_reload`` (if given).

    Handlers run inside the loop (``add_signal_handler``), so they may touch loop objects.
    """
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig.name)
    if on_reload is not None:
        loop.add_signal_handler(signal.SIGHUP, on_reload)


# --- SEC-1: plain TCP only on loopback ------------------------------------------------

def _endpoint_hosts(endpoint: str) -> list[str]:
    """The host parts of a ``tcp://`` endpoint, including a ``source;`` prefix if any."""
    hosts = []
    for part in endpoint[len("tcp://"):].split(";"):
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port:
            raise ConfigError(f"endpoint {endpoint!r} has no host:port")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        hosts.append(host)
    return hosts


def _loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # '*', an interface name or a DNS name: not provably loopback
        return False


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc:// and inproc://, and for tcp:// whose every host is 127.0.0.0/8, ::1 or localhost."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    return all(_loopback_host(h) for h in _endpoint_hosts(endpoint))


def check_plain_tcp(endpoints: Iterable[str], curve: bool) -> None:
    """Refuse a configuration SEC-1 does not allow; raise ConfigError naming the culprit.

    ``curve`` is ``security.curve``. ``curve=True`` needs a libzmq built with CURVE; with
    ``curve=False`` every tcp:// endpoint must be loopback. ipc:// and
    inproc:// are always fine (file permissions protect them, SEC-5).
    """
    if curve and not CURVE_AVAILABLE:
        raise ConfigError("security.curve = true: this libzmq has no CURVE support; "
                          "set security.curve=false and bind loopback only")
    for ep in endpoints:
        if not ep.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError(f"endpoint {ep!r} is not a tcp://, ipc:// or inproc:// endpoint")
        if not curve and not is_loopback_endpoint(ep):
            raise ConfigError(f"endpoint {ep} is plain TCP on a non-loopback address; with "
                              "security.curve = false only 127.0.0.0/8, ::1 or localhost may be used (SEC-1)")
