"""Where the agent keeps image data, under ``<state_dir>/store`` (one filesystem, so every
move into place is a rename).

    store/layers/sha256/<hex>          cached layer blobs (IMG-9), by compressed digest
    store/layers/tmp/                  downloads in progress
    store/artifacts/<artifact_id>/     rootfs.ext4 + config.json of a built artifact
    store/work/<artifact_id>/<try>/    build scratch (IMG-21), removed after every try
    store/chains/<hex>/                unpacked trees kept for derived images (chains.py);
                                       a build-internal cache, not catalog entries

Every path is derived from a validated id or digest, never from a name in a message (SEC-7).
"""
from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from protocol import ids
from protocol.errors import InvalidRequest

ROOTFS = "rootfs.ext4"
CONFIG = "config.json"


def check_artifact_id(value: object) -> str:
    if not ids.valid("artifact", value):
        raise InvalidRequest(f"artifact id {str(value)[:80]!r} is not art-<24 hex>",
                             {"field": "artifact_id", "reason": "format"})
    return str(value)


@dataclass(frozen=True, slots=True)
class Store:
    root: Path

    @classmethod
    def under(cls, state_dir: str | Path) -> "Store":
        store = cls(Path(state_dir) / "store")
        for sub in (store.layers, store.artifacts, store.work):
            sub.mkdir(parents=True, exist_ok=True, mode=0o700)
        return store

    @property
    def layers(self) -> Path:
        return self.root / "layers"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def work(self) -> Path:
        return self.root / "work"

    def artifact_dir(self, artifact_id: str) -> Path:
        return self.artifacts / check_artifact_id(artifact_id)

    def new_try(self, artifact_id: str) -> Path:
        """A fresh ``work/<artifact>/<try>/`` directory."""
        path = self.work / check_artifact_id(artifact_id) / secrets.token_hex(4)
        path.mkdir(parents=True, mode=0o700)
        return path

    def end_try(self, path: Path) -> None:
        """Remove a try's scratch, and its artifact dir once no try is left (IMG-21)."""
        shutil.rmtree(path, ignore_errors=True)
        try:
            path.parent.rmdir()
        except OSError:
            pass  # another try of the same artifact still runs


def fsync_dir(path: Path) -> None:
    """Make a rename or an unlink in ``path`` durable (the catalog's file-then-entry order, CAT-8)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """The files directly in ``path`` and the directory itself are durable before the rename
    that publishes them (CAT-8)."""
    for p in path.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(path)
