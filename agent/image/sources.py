"""Open the image source for a reference (SPEC IMG-1..IMG-4).

``open_source`` parses the reference (IMG-1), applies the local-path rule (IMG-2), picks the
source class by transport from ``SOURCES`` and, for registries, the credentials: the
request's, else the agent credentials file's for that host (IMG-4), else anonymous.
"""
from __future__ import annotations

from collections.abc import Callable

from protocol.config import ImageConfig
from protocol.errors import InvalidRequest

from . import credentials as creds_mod
from .local import DockerArchiveSource, OciArchiveSource, OciLayoutSource
from .model import Credentials, ImageSource, Platform
from .reference import Reference, check_local, parse
from .registry import RegistrySource

__all__ = ["SOURCES", "open_source", "parse_platform"]

SOURCES: dict[str, Callable[..., ImageSource]] = {
    "docker": RegistrySource,
    "oci": OciLayoutSource,
    "oci-archive": OciArchiveSource,
    "docker-archive": DockerArchiveSource,
}


def parse_platform(text: str) -> Platform:
    try:
        return Platform.parse(text)
    except ValueError as exc:
        raise InvalidRequest(str(exc), {"field": "platform", "reason": str(exc)}) from None


def open_source(reference: str, image_cfg: ImageConfig, *, credentials: Credentials | None = None,
                platform: str | None = None, **kw: object) -> ImageSource:
    """The ImageSource for ``reference``; InvalidRequest for a bad reference, platform or
    local path. ``kw`` goes to the source class (tests pass ``sleep``/``transport`` to the
    registry source)."""
    want = parse_platform(platform or image_cfg.platform)
    ref: Reference = check_local(parse(reference, image_cfg.default_registry), image_cfg.local_roots)
    if ref.transport == "docker":
        credentials = creds_mod.pick(credentials, creds_mod.load(image_cfg.credentials_file), ref.registry)
    return SOURCES[ref.transport](ref, platform=want, image_cfg=image_cfg, credentials=credentials, **kw)
