"""CURVE key pairs and fingerprints (SEC-1, SEC-2, SEC-4).

Each daemon makes its key pair on first start: the public key in ``NAME.key`` and the secret in
``NAME.key_secret`` (ZeroMQ certificate format, the secret file 0600, written via a temp file
and rename, so a crash never leaves a half-written secret). Public keys travel as 40-char z85;
operators see a fingerprint, never a secret.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}\Z")


class KeyError_(ValueError):
    """A key file or key string is missing or malformed; the message names it."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    public: str   # z85, 40 chars
    secret: str   # z85, 40 chars — never logged, never sent

    def __repr__(self) -> str:  # keep the secret out of reprs and tracebacks
        return f"KeyPair(public={self.public!r}, fingerprint={fingerprint(self.public)!r})"


def fingerprint(public: str) -> str:
    """``SHA256:`` + 16 hex of the key's raw bytes: what logs and `node keys` show."""
    raw = z85.decode(public.encode()) if isinstance(public, str) else public
    return "SHA256:" + hashlib.sha256(raw).hexdigest()[:16]


def valid_public(key: object) -> bool:
    return isinstance(key, str) and Z85_KEY.match(key) is not None


def load_or_create(directory: str | Path, name: str) -> KeyPair:
    """The key pair ``name`` in ``directory``, made (secret 0600) if it does not exist yet."""
    d = Path(directory)
    pub_path, sec_path = d / f"{name}.key", d / f"{name}.key_secret"
    if not sec_path.exists():
        d.mkdir(parents=True, exist_ok=True)
        public, secret = zmq.curve_keypair()
        _write(sec_path, _cert(public, secret), 0o600)
        _write(pub_path, _cert(public, None), 0o644)
    try:
        public_b, secret_b = zmq.auth.load_certificate(str(sec_path))
    except (OSError, ValueError) as exc:
        raise KeyError_(f"key file {sec_path} is unreadable or malformed: {exc}") from None
    if secret_b is None:
        raise KeyError_(f"key file {sec_path} has no secret key")
    if stat_mode(sec_path) & 0o077:
        os.chmod(sec_path, 0o600)  # repair a too-open secret rather than serve with it
    return KeyPair(public_b.decode(), secret_b.decode())


def load_public(path: str | Path) -> str:
    """A public key from a certificate file (``*.key``) or a bare z85 string in a file."""
    text = Path(path).read_text(errors="replace").strip()
    if valid_public(text):
        return text
    try:
        public_b, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyError_(f"{path} holds no public key: {exc}") from None
    return public_b.decode()


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _cert(public: bytes, secret: bytes | None) -> str:
    lines = ["#   templatecenter CURVE certificate", "#   ZeroMQ CURVE " +
             ("**Secret** Certificate: DO NOT PROVIDE THIS FILE TO OTHER USERS" if secret else "Public Certificate"),
             "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
