"""The agent's blob ROUTER (SPEC WIRE-16, GC-14): other agents fetch artifacts here.

This version serves no artifact yet: a FETCH gets ERROR ArtifactNotFound (nothing is held),
any other well-formed request ERROR UnsupportedMessage. The endpoint is still bound before
READY=1 and advertised in HELLO, so the coordinator learns a real address from day one, and
the error handling is the final one: frames that are not ``TC…`` are dropped and counted,
``TC<n>`` gets UnsupportedProtocol and broken ``TC1`` frames MalformedMessage (WIRE-1, WIRE-5).
"""
from __future__ import annotations

import collections
import logging

import zmq
import zmq.asyncio

from protocol import codec
from protocol.keys import KeyPair
from protocol.daemon import configure_socket
from protocol.envelope import FrameDropped, parse
from protocol.errors import TCError, UnsupportedMessage, error_class
from protocol.message import body_msg_id
from protocol.messages import Error

from .config import AgentConfig

log = logging.getLogger("blobs")

_WILDCARD_HOSTS = ("0.0.0.0", "*", "[::]", "::")


def advertised(bound: str, address: str) -> str:
    """The endpoint peers should dial: a wildcard bind host is replaced by the node address."""
    if not bound.startswith("tcp://"):
        return bound
    host, _, port = bound[len("tcp://"):].rpartition(":")
    if host in _WILDCARD_HOSTS:
        host = f"[{address}]" if ":" in address else address
    return f"tcp://{host}:{port}"


class BlobServer:
    """Owns the blob ROUTER; ``bind()`` before READY, then run ``serve()`` as a task."""

    def __init__(self, ctx: zmq.asyncio.Context, cfg: AgentConfig, pair: "KeyPair | None" = None) -> None:
        self._cfg = cfg
        self._limits = cfg.codec.limits()
        self._sock = ctx.socket(zmq.ROUTER)
        configure_socket(self._sock, hwm=cfg.zmq.hwm, linger=cfg.zmq.linger, max_frame=cfg.codec.max_frame)
        if pair is not None:  # SEC-1: encrypted with this node's key; grants decide access (issue 5)
            self._sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret.encode())
            self._sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public.encode())
            self._sock.setsockopt(zmq.CURVE_SERVER, 1)
        self.endpoint = ""
        # reason -> count; per-peer counters and SEC-8 cool-down come with the transfer issue.
        self.counters: collections.Counter[str] = collections.Counter()

    def bind(self) -> str:
        """Bind ``agent.blob_endpoint`` (a ``*`` port picks a free one) and return the real endpoint."""
        self._sock.bind(self._cfg.agent.blob_endpoint)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    async def serve(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            try:
                reply = self._handle(frames)
            except Exception:  # noqa: BLE001 — a bad request must never stop the blob server (WIRE-5)
                log.exception("blob request handling failed")
                self.counters["internal"] += 1
                continue
            if reply is not None:
                try:
                    await self._sock.send_multipart(reply, flags=zmq.DONTWAIT)
                except zmq.ZMQError as exc:  # peer gone or its queue full: nothing to do
                    self.counters["reply_dropped"] += 1
                    log.debug("blob reply dropped: %s", exc)

    def _handle(self, frames: list[bytes]) -> list[bytes] | None:
        try:
            env = parse(frames, router=True, limits=self._limits)
        except FrameDropped as exc:
            self.counters[f"dropped:{exc.reason}"] += 1
            log.info("blob endpoint dropped a frame: %s", exc.reason)
            return None
        except TCError as exc:  # UnsupportedProtocol or MalformedMessage: the peer gets told why
            self.counters[exc.name] += 1
            return Error.of(exc).to_frames(bytes(frames[0]))
        parent = body_msg_id(env)
        try:
            body = codec.decode(env.body, self._limits)
        except TCError as exc:
            self.counters[exc.name] += 1
            return Error.of(exc, parent).to_frames(env.identity)
        if env.msg_type == "FETCH":
            art = body.get("artifact_id")
            what = art if isinstance(art, str) else "requested"
            err: TCError = error_class("ArtifactNotFound")(f"artifact {what[:64]} is not held by this node",
                                            {"artifact_id": what[:64]})
        else:
            err = UnsupportedMessage(f"the blob endpoint does not serve {env.msg_type}",
                                     {"type": env.msg_type})
        self.counters[err.name] += 1
        return Error.of(err, parent).to_frames(env.identity)

    def close(self, linger_ms: int) -> None:
        self._sock.close(linger=linger_ms)

