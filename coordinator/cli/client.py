"""The admin client: one ADMIN request over a DEALER, with endpoint failover (WIRE-19, HA-4).

``timeout`` is the longest silence, not the whole duration: every PROGRESS restarts it, so
a slow command is told apart from a dead coordinator (CLI-1).
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import zmq

from protocol import envelope
from protocol.errors import TCError, from_wire
from protocol.keys import KeyPair
from protocol.message import decode_message
from protocol.messages import Admin, Error, Progress, Result

DEFAULT_ENDPOINT = "ipc:///run/templatecenter/admin.sock"


class Unreachable(Exception):
    """No configured endpoint answered; the message says which and why."""

    def __init__(self, message: str, attempts: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.attempts = attempts


@dataclass
class AdminClient:
    endpoints: list[str]
    timeout: float = 30.0
    # CURVE for tcp:// endpoints (SEC-1, SEC-2): this client's key pair and the coordinator's
    # public key; ipc:// endpoints rely on file permissions and ignore them.
    client_keys: KeyPair | None = None
    server_key: str | None = None

    def request(self, command: str, args: dict[str, Any],
                on_progress: Callable[[Progress], None] | None = None) -> Any:
        """Run one command; returns its result or raises the coordinator's TCError or Unreachable."""
        attempts: list[dict[str, str]] = []
        queue = list(self.endpoints)
        tried: set[str] = set()
        while queue:
            ep = queue.pop(0)
            if ep in tried:
                continue
            tried.add(ep)
            problem = self._precheck(ep)
            if problem:
                attempts.append({"endpoint": ep, "problem": problem})
                continue
            try:
                return self._one(ep, command, args, on_progress)
            except _Silent as s:
                attempts.append({"endpoint": ep, "problem": str(s)})
            except TCError as exc:
                leader = exc.details.get("leader") if exc.name == "NotLeader" else None
                if exc.name != "NotLeader":
                    raise
                attempts.append({"endpoint": ep, "problem": "standby (NotLeader)"})
                if isinstance(leader, str) and leader not in tried:
                    queue.insert(0, leader)
        detail = "; ".join(f"{a['endpoint']}: {a['problem']}" for a in attempts)
        raise Unreachable(f"coordinator unreachable ({command} not sent or not answered): {detail}", attempts)

    @staticmethod
    def _precheck(ep: str) -> str | None:
        if not ep.startswith("ipc://"):
            return None
        path = Path(ep[len("ipc://"):])
        # A directory we may not enter hides the socket from exists(): ask about access first,
        # so a user outside the group hears "permission denied", not "not running" (SEC-5).
        if path.parent.exists() and not os.access(path.parent, os.X_OK):
            return f"permission denied on {path} (is this user in group tc?)"
        if not path.parent.exists() or not path.exists():
            return f"no admin socket at {path} (is the coordinator running?)"
        if not os.access(path, os.R_OK | os.W_OK) or not os.access(path.parent, os.X_OK):
            return f"permission denied on {path} (is this user in group tc?)"
        return None

    def _one(self, ep: str, command: str, args: dict[str, Any],
             on_progress: Callable[[Progress], None] | None) -> Any:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        if ep.startswith("tcp://") and self.server_key:
            if self.client_keys is None:
                raise _Silent("a CURVE endpoint needs this client's key pair")
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.client_keys.secret.encode())
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.client_keys.public.encode())
            sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_key.encode())
        try:
            sock.connect(ep)
            req = Admin(msg_id=uuid.uuid4().hex, command=command, args=args)
            # IMMEDIATE + a send timeout: a stale socket file or a dead peer must not block us.
            sock.setsockopt(zmq.SNDTIMEO, max(1, int(self.timeout * 1000)))
            try:
                sock.send_multipart(req.to_frames(), copy=True)
            except zmq.Again:
                raise _Silent(f"could not connect within {self.timeout:g}s") from None
            deadline = time.monotonic() + self.timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(int(left * 1000), zmq.POLLIN):
                    raise _Silent(f"no answer within {self.timeout:g}s")
                frames = sock.recv_multipart()
                try:
                    msg = decode_message(envelope.parse(frames, router=False))
                except (TCError, envelope.FrameDropped):
                    continue  # a garbled frame: keep waiting for a good one
                if getattr(msg, "parent_id", None) != req.msg_id:
                    continue
                if isinstance(msg, Progress):
                    deadline = time.monotonic() + self.timeout
                    if on_progress:
                        on_progress(msg)
                elif isinstance(msg, Result):
                    return msg.result
                elif isinstance(msg, Error):
                    raise from_wire({"code": msg.code, "name": msg.name, "message": msg.message,
                                     "details": msg.details})
        finally:
            sock.close(linger=0)


class _Silent(Exception):
    pass
