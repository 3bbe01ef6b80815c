"""A hand-driven coordinator for agent tests: a ROUTER speaking TC1 through protocol/, plus
helpers to start a real ``tc-agent`` against it. The fixtures are in tests/integration/conftest.py."""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import zmq

from protocol.envelope import parse
from protocol.message import Message, decode_message
from protocol.messages import Heartbeat, HeartbeatAck, Hello, Welcome
from tests.support import Proc

NODE = "node-a"
SESSION = "5e55" * 4


class Coordinator:
    """A ROUTER on a free loopback port that decodes with protocol/ and records what arrives."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str | None = None) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting agent reuses its identity
        self.sock.bind(endpoint or "tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.answer_beats = True  # ACK every HEARTBEAT seen while waiting, so liveness holds
        self.seen: list[tuple[float, Message]] = []

    def expect(self, want: str, timeout: float) -> tuple[bytes, Any, int]:
        """The next ``want`` message: (identity, message, wire size without identity)."""
        return self._next(lambda _ident, msg: msg.TYPE == want, timeout, want)

    def expect_where(self, pred: Callable[[bytes, Any], bool], timeout: float,
                     what: str = "matching message") -> tuple[bytes, Any]:
        """The next message (from any agent) for which ``pred(identity, message)`` holds."""
        ident, msg, _ = self._next(pred, timeout, what)
        return ident, msg

    def _next(self, pred: Callable[[bytes, Any], bool], timeout: float, what: str) -> tuple[bytes, Any, int]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                break
            frames = self.sock.recv_multipart()
            msg = decode_message(parse(frames, router=True))
            self.seen.append((time.monotonic(), msg))
            if self.answer_beats and isinstance(msg, Heartbeat):
                self.send(frames[0], HeartbeatAck(parent_id=msg.msg_id))
            if pred(frames[0], msg):
                return frames[0], msg, sum(len(f) for f in frames[1:])
        raise AssertionError(f"no {what} within {timeout}s; saw {[m.TYPE for _, m in self.seen[-20:]]}")

    def send(self, ident: bytes, msg: Message) -> None:
        self.sock.send_multipart(msg.to_frames(ident))

    def welcome(self, ident: bytes, hello: Hello, interval_ms: int = 200, full: bool = False,
                session: str = SESSION) -> None:
        self.send(ident, Welcome(parent_id=hello.msg_id, session_id=session, heartbeat_interval=interval_ms,
                                 lease_ttl=5 * interval_ms, want_full_catalog=full))

    def close(self) -> None:
        self.sock.close(linger=0)


class Notify:
    """A systemd-style NOTIFY_SOCKET listener (abstract name: no sun_path length worries),
    read by a thread as systemd would, so the agent's datagrams never queue up."""

    def __init__(self) -> None:
        self.name = f"@tc-agent-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.got: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                self.got.append(self.sock.recv(4096).decode())
            except OSError:  # closed by close()
                return

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(5)


def agent_argv(tmp_path: Path, coordinators: list[str], *extra: str, node_id: str = NODE,
               state_dir: Path | None = None) -> list[str]:
    """argv of a plain-TCP test agent; ``state_dir`` defaults to ``tmp_path/state``."""
    state = state_dir if state_dir is not None else tmp_path / "state"
    sets = [f"agent.node_id={node_id}", f"agent.state_dir={state}", "security.curve=false",
            f"agent.coordinators=[{', '.join(repr(c) for c in coordinators)}]".replace("'", '"'),
            "agent.blob_endpoint=tcp://127.0.0.1:*", "agent.address=127.0.0.1", "runtime.driver=none",
            "agent.versions.guest_image=test-guest-1", *extra]
    return [sys.executable, "-m", "agent.main", *(a for s in sets for a in ("--set", s))]


def start_agent(agents: list[Proc], tmp_path: Path, coordinators: list[str], *extra: str,
                notify: Notify | None = None, env: dict[str, str] | None = None, node_id: str = NODE,
                state_dir: Path | None = None) -> Proc:
    """Start a real agent; several agents need distinct ``node_id`` and ``state_dir`` values."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    e.pop("NOTIFY_SOCKET", None)
    if notify is not None:
        e["NOTIFY_SOCKET"] = notify.name
    argv = agent_argv(tmp_path, coordinators, *extra, node_id=node_id, state_dir=state_dir)
    p = Proc(node_id, argv, tmp_path / f"agent-{len(agents)}.log", e).start()
    agents.append(p)
    return p


def hello_and_welcome(coord: Coordinator, interval_ms: int = 200, full: bool = False) -> tuple[bytes, Hello]:
    ident, hello, _ = coord.expect("HELLO", 15)
    coord.welcome(ident, hello, interval_ms, full)
    return ident, hello
