"""Artifact fingerprints and ids, shared by the coordinator (claims, dedup) and the agents
(builds): the same inputs give the same artifact id on every host (IMG-19, CONV-1, TPL-25)."""
from __future__ import annotations

import hashlib
from typing import Any

from .canonical import canonical_json

BLOCK = 4096


def image_fingerprint_doc(manifest_digest: str, writable_size: int) -> dict[str, Any]:
    return {"v": 1, "kind": "image", "manifest_digest": manifest_digest, "writable_size": int(writable_size),
            "build": {"fs": "ext4", "block_size": BLOCK, "layout": 1}}


def image_fingerprint(manifest_digest: str, writable_size: int) -> str:
    """IMG-19: sha256 hex of the canonical JSON of the build-defining inputs (template
    overrides are not in it: they change the runtime config, not the image)."""
    return hashlib.sha256(canonical_json(image_fingerprint_doc(manifest_digest, writable_size))).hexdigest()


def artifact_id(fingerprint: str) -> str:
    """CONV-1: ``art-`` + the first 24 hex of the fingerprint."""
    if len(fingerprint) < 24 or any(c not in "0123456789abcdef" for c in fingerprint[:24]):
        raise ValueError("fingerprint must start with 24 lowercase hex digits")
    return "art-" + fingerprint[:24]
