"""CURVE on the coordinator's TCP endpoints (SEC-1, SEC-2, SEC-3).

The coordinator's key pair lives in ``<state_dir>/keys`` (secret 0600, made on first start).
One ZAP handler serves two domains: ``agents`` lets every key finish the handshake except a
rejected one (acceptance is decided per message, by ``KeyRegistry``), and ``admin`` — TCP admin
and event endpoints — admits only ``admin.allowed_keys``. ipc endpoints rely on file
permissions instead (SEC-5).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from protocol import keys as curve

from .config import CoordinatorConfig
from .keys import KeyRegistry

log = logging.getLogger(__name__)


class _Callback:
    """pyzmq's credentials provider shape: ``callback(domain, z85 key bytes) -> bool``."""

    def __init__(self, allow: Callable[[str], bool]) -> None:
        self.allow = allow

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            return self.allow(key.decode("ascii"))
        except Exception:  # noqa: BLE001 — a failing check must deny, never crash the handler
            log.exception("ZAP check failed for domain %s", domain)
            return False


class CurveServer:
    def __init__(self, zctx: zmq.asyncio.Context, cfg: CoordinatorConfig, keys: KeyRegistry) -> None:
        self.pair = curve.load_or_create(Path(cfg.coordinator.state_dir) / "keys", "coordinator")
        allowed = {k for k in cfg.admin.allowed_keys if curve.valid_public(k)}
        self.auth = AsyncioAuthenticator(zctx)
        self.auth.start()
        self.auth.configure_curve_callback("agents", _Callback(keys.allow_handshake))
        self.auth.configure_curve_callback("admin", _Callback(allowed.__contains__))
        log.info("CURVE on: coordinator public key %s (%s); %d admin key(s) allowed",
                 self.pair.public, curve.fingerprint(self.pair.public), len(allowed))

    def serve(self, sock: zmq.Socket, domain: str) -> None:
        sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.pair.secret.encode())
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.pair.public.encode())
        sock.setsockopt(zmq.CURVE_SERVER, 1)

    def stop(self) -> None:
        self.auth.stop()
