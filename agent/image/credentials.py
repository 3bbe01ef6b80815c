"""Registry credentials (SPEC IMG-4).

The agent's credentials file (``image.credentials_file``) is TOML, one table per registry
host::

    ["registry.example.com"]
    username = "builder"
    password = "..."

    ["127.0.0.1:5000"]
    username = "u"
    password = "p"

Rules:

* Host keys are matched case-insensitively; a scheme prefix and trailing ``/`` are ignored.
  ``docker.io``, ``index.docker.io`` and ``registry-1.docker.io`` are one host.
* **A file readable or writable by group or other is refused** (ImageAuthFailed naming the
  path and mode, never the content): a leaked password is worse than a failed pull, and the
  fix (``chmod 600``) is obvious. A configured file that does not exist counts as empty.
* Credentials given with the request override the file's (``pick``).
* ``CredentialsFile`` never shows passwords in its repr; entries are ``model.Credentials``
  (redacted repr).
"""
from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping

from protocol.errors import ImageAuthFailed

from .model import Credentials
from .reference import DOCKER_HUB

__all__ = ["CredentialsFile", "load", "normalise_host", "pick"]

_HUB = {"docker.io", "index.docker.io", DOCKER_HUB}


def normalise_host(host: str) -> str:
    h = host.strip().lower()
    for prefix in ("https://", "http://"):
        h = h.removeprefix(prefix)
    h = h.split("/", 1)[0]
    return DOCKER_HUB if h in _HUB else h


class CredentialsFile:
    """Parsed credentials, keyed by normalised host."""

    def __init__(self, entries: Mapping[str, Credentials] | None = None, path: str = "") -> None:
        self.path = path
        self._by_host = {normalise_host(h): c for h, c in (entries or {}).items()}

    def __repr__(self) -> str:
        return f"CredentialsFile(path={self.path!r}, hosts={sorted(self._by_host)!r})"

    def __len__(self) -> int:
        return len(self._by_host)

    def for_host(self, host: str) -> Credentials | None:
        return self._by_host.get(normalise_host(host))


def _refuse(path: str, why: str, details: dict | None = None) -> ImageAuthFailed:
    return ImageAuthFailed(f"registry credentials file {path}: {why}", {"path": path, **(details or {})})


def load(path: str) -> CredentialsFile:
    """Read ``path`` ("" -> no credentials). See the module docstring for the rules."""
    if not path:
        return CredentialsFile()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return CredentialsFile(path=path)
    except OSError as exc:
        raise _refuse(path, f"cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, "is not a regular file")
        if st.st_mode & 0o077:
            mode = f"{stat.S_IMODE(st.st_mode):04o}"
            raise _refuse(path, f"is accessible by group or other (mode {mode}); chmod 600 it", {"mode": mode})
        raw = f.read(1 << 20)
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        # The parser's message can quote a line of the file: never pass it on.
        raise _refuse(path, "is not valid TOML") from None
    entries: dict[str, Credentials] = {}
    for host, table in doc.items():
        if not isinstance(table, dict) or not isinstance(table.get("username"), str) \
                or not isinstance(table.get("password"), str):
            raise _refuse(path, f"entry {host[:100]!r} needs string username and password")
        entries[host] = Credentials(table["username"], table["password"])
    return CredentialsFile(entries, path)


def pick(request: Credentials | None, file: CredentialsFile | None, host: str) -> Credentials | None:
    """Request credentials win; else the file's for ``host``; else anonymous (None)."""
    if request is not None:
        return request
    return file.for_host(host) if file is not None else None
