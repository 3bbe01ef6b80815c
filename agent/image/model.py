"""Shared image types: media types, descriptors, platforms, the resolved image and the source
interface every image source (registry, local layout, archives) implements.

A source answers two questions: *what is this image* (``resolve``: manifest digest, config,
layer descriptors — IMG-11, no layer downloads) and *give me this blob* (``open_blob``: a
verified byte stream that the layer cache writes to a temp file and renames into place).
Everything after that — cache, unpack, ext4 — is independent of where the image came from.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Protocol

from protocol.errors import ImageInvalid

# --- media types (IMG-6, IMG-7) -------------------------------------------------------

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_FOREIGN_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
SCHEMA1_TYPES = (DOCKER_MANIFEST_V1, DOCKER_MANIFEST_V1_SIGNED)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
# Layer media type -> the compression it declares. Anything else is ImageInvalid (IMG-7).
LAYER_TYPES: dict[str, str] = {
    OCI_LAYER: "none",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    DOCKER_LAYER_GZIP: "gzip",
}
# The Accept header for manifest requests, most specific first.
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")


def check_digest(value: Any, what: str = "digest") -> str:
    """A ``sha256:<64 lowercase hex>`` string, or ImageInvalid naming ``what``. Only sha256 is
    accepted: every digest we compute is sha256, and the digest becomes a file name."""
    if not isinstance(value, str) or not _DIGEST.match(value):
        raise ImageInvalid(f"{what} {value!r} is not a sha256 digest", {"digest": str(value)[:100]})
    return value


@dataclass(frozen=True, slots=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> "Platform":
        """``os/arch[/variant]``, e.g. ``linux/amd64`` or ``linux/arm64/v8``."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"platform {text!r} is not os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"media_type": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer to fetch and apply: its blob descriptor, its declared compression (from the
    media type) and the diff_id (sha256 of the uncompressed tar) from the config."""
    descriptor: Descriptor
    compression: str  # "none" | "gzip" | "zstd"
    diff_id: str

    @property
    def digest(self) -> str:
        return self.descriptor.digest

    @property
    def size(self) -> int:
        return self.descriptor.size


@dataclass(frozen=True, slots=True)
class ResolvedImage:
    """What RESOLVE_IMAGE answers (IMG-11) plus what the build needs."""
    reference: str                 # the reference as given (never with credentials)
    manifest_digest: str
    manifest_media_type: str
    config_digest: str
    config: dict[str, Any]         # the parsed image config (verified against config_digest)
    layers: tuple[Layer, ...]
    platform: Platform = field(default_factory=Platform)

    @property
    def created_epoch(self) -> int:
        """The build epoch (IMG-20): the config's ``created`` as Unix seconds, else 0."""
        from .imageconfig import created_epoch
        return created_epoch(self.config)

    def to_result(self) -> dict[str, Any]:
        """The RESOLVE_IMAGE task result (IMG-11)."""
        from protocol.canonical import canonical_json
        return {
            "reference": self.reference,
            "manifest_digest": self.manifest_digest,
            "media_type": self.manifest_media_type,
            "platform": str(self.platform),
            "config": {"digest": self.config_digest, "content": canonical_json(self.config).decode()},
            "layers": [l.descriptor.to_dict() for l in self.layers],
            "layers_size": sum(l.size for l in self.layers),
        }


@dataclass(frozen=True, slots=True)
class Credentials:
    """Registry credentials for one host (IMG-4). ``repr`` never shows the secret, so a
    stray log line or exception cannot leak it."""
    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<redacted>)"


class ImageSource(Protocol):
    """Implemented by the registry source and the local (oci/oci-archive/docker-archive) sources."""

    def resolve(self) -> ResolvedImage:
        """Manifest, platform choice, config; verified digests; no layer downloads."""
        ...

    def fetch_blob(self, desc: Descriptor, out: BinaryIO, progress: Callable[[int], None] | None = None) -> None:
        """Write the blob's raw (still compressed) bytes to ``out``, verified: exactly
        ``desc.size`` bytes whose sha256 is ``desc.digest``. Transport faults are retried (a
        retry rewinds and truncates ``out``); a mismatching blob is fetched once more, then
        ImageDigestMismatch (IMG-8). ``progress`` gets the bytes written so far for this blob."""
        ...

    def close(self) -> None:
        ...
