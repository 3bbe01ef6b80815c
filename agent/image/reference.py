"""Image references (SPEC IMG-1) and the local-path rule (IMG-2).

Accepted forms::

    [docker://]HOST[:PORT]/REPO[:TAG][@sha256:HEX]   registry image
    NAME[:TAG][@sha256:HEX]                           short name -> image.default_registry
    oci:PATH[:TAG]                                    OCI image layout directory
    oci-archive:FILE[:TAG]                            tar of an OCI image layout
    docker-archive:FILE[:REF]                         ``docker save`` tar

Rules:

* The transport prefix is decisive: ``oci:``, ``oci-archive:`` and ``docker-archive:`` always
  name a local source (a registry host literally called ``oci`` needs ``docker://``). For
  local transports the PATH ends at the first ``:`` (as in skopeo), so paths cannot contain
  ``:``.
* The first component of a registry name is a host when it contains ``.`` or ``:`` or is
  ``localhost`` (or a bracketed IPv6 literal); otherwise the name lives on
  ``default_registry``, and a one-part name gets ``library/`` in front (IMG-1).
* ``docker.io`` and ``index.docker.io`` normalise to ``registry-1.docker.io`` (Docker's API
  endpoint) and one-part names there get ``library/`` as Docker does.
* Repository names follow the distribution grammar (lowercase components separated by
  ``.``, ``_``, ``__`` or dashes; at most 255 characters); tags are
  ``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}``; digests are sha256 only.
* Registry references default to tag ``latest`` unless a digest is given. ``oci:`` and
  ``oci-archive:`` without a tag keep ``tag=None``: the layout must then hold exactly one
  manifest (IMG-2). ``docker-archive:`` REF is matched against ``RepoTags``.

Bad input raises InvalidRequest with ``details={"field": "image", "reason": ...}``.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from protocol.errors import InvalidRequest

__all__ = ["DOCKER_HUB", "LOCAL_TRANSPORTS", "TRANSPORTS", "Reference", "check_local", "parse"]

DOCKER_HUB = "registry-1.docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", DOCKER_HUB})
LOCAL_TRANSPORTS = ("oci", "oci-archive", "docker-archive")
TRANSPORTS = ("docker",) + LOCAL_TRANSPORTS
MAX_REFERENCE = 4096
MAX_NAME = 255

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*\Z")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
_LABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_HOST = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?\Z")
# docker-archive REF: a docker reference as `docker save` writes it in RepoTags.
_ARCHIVE_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@\[\]-]{0,254}\Z")


def _bad(reason: str) -> InvalidRequest:
    return InvalidRequest(f"invalid image reference: {reason}", {"field": "image", "reason": reason})


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed reference. ``registry``/``repository`` are set for ``docker``; ``path`` for the
    local transports. ``tag`` is None when only a digest was given (registry) or no tag was
    given (local layouts and archives)."""

    transport: str
    registry: str = ""
    repository: str = ""
    tag: str | None = None
    digest: str | None = None
    path: str = ""

    @property
    def is_local(self) -> bool:
        return self.transport in LOCAL_TRANSPORTS

    @property
    def name(self) -> str:
        """``registry/repository`` (registry transport only)."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        if self.transport == "docker":
            text = self.name
            if self.tag is not None:
                text += f":{self.tag}"
            if self.digest is not None:
                text += f"@{self.digest}"
            return text
        text = f"{self.transport}:{self.path}"
        return text + (f":{self.tag}" if self.tag is not None else "")


def parse(text: str, default_registry: str = DOCKER_HUB) -> Reference:
    """Parse ``text`` (IMG-1); InvalidRequest on anything malformed."""
    if not isinstance(text, str) or not text:
        raise _bad("empty reference")
    if len(text) > MAX_REFERENCE:
        raise _bad("reference too long")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
        raise _bad("reference contains whitespace or control characters")
    for transport in ("oci-archive", "docker-archive", "oci"):
        prefix = transport + ":"
        if text.startswith(prefix) and not text.startswith("docker://"):
            return _parse_local(transport, text[len(prefix):])
    if text.startswith("docker://"):
        text = text[len("docker://"):]
    elif "://" in text:
        raise _bad(f"unknown transport {text.split('://', 1)[0]!r}")
    return _parse_docker(text, default_registry)


def _parse_local(transport: str, rest: str) -> Reference:
    path, sep, tag = rest.partition(":")
    if not path:
        raise _bad(f"{transport}: needs a path")
    if sep and not tag:
        raise _bad("empty tag")
    if not sep:
        return Reference(transport, path=path)
    if transport == "docker-archive":
        if not _ARCHIVE_REF.match(tag):
            raise _bad(f"invalid docker-archive reference {tag!r}")
    elif not _TAG.match(tag):
        raise _bad(f"invalid tag {tag!r}")
    return Reference(transport, path=path, tag=tag)


def _parse_docker(text: str, default_registry: str) -> Reference:
    name, at, digest = text.partition("@")
    if at:
        if not digest.startswith("sha256:"):
            raise _bad("only sha256 digests are supported")
        if not _DIGEST.match(digest):
            raise _bad(f"invalid digest {digest!r}")
    tag: str | None = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG.match(tag):
            raise _bad(f"invalid tag {tag!r}")
    if not name:
        raise _bad("empty repository name")
    first, sep, remainder = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        if not _HOST.match(first):
            raise _bad(f"invalid registry host {first!r}")
        registry, repository = first.lower(), remainder
    else:
        registry, repository = default_registry.lower(), name
        if "/" not in repository:
            repository = "library/" + repository
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in repository:
            repository = "library/" + repository
    if len(repository) > MAX_NAME or not _REPO.match(repository):
        raise _bad(f"invalid repository name {repository!r}")
    if tag is None and not at:
        tag = "latest"
    return Reference("docker", registry=registry, repository=repository, tag=tag,
                     digest=digest if at else None)


def _under(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


def check_local(ref: Reference, local_roots: Iterable[str]) -> Reference:
    """IMG-2: a local PATH/FILE must be absolute, contain no ``..`` component, and its real
    path (symlinks resolved) must lie under the real path of one of ``local_roots``.

    Returns the reference with ``path`` replaced by that real path, so the source opens
    exactly what was checked. Registry references pass through unchanged."""
    if not ref.is_local:
        return ref
    path = ref.path
    if not os.path.isabs(path):
        raise _bad(f"local path {path!r} must be absolute")
    if ".." in path.split("/"):
        raise _bad(f"local path {path!r} must not contain '..'")
    if "\x00" in path:
        raise _bad("local path contains NUL")
    real = os.path.realpath(path)
    roots = [os.path.realpath(r) for r in local_roots if isinstance(r, str) and os.path.isabs(r)]
    if not any(_under(real, root) for root in roots):
        raise _bad(f"local path {path!r} is not under an allowed local root")
    return Reference(ref.transport, path=real, tag=ref.tag)
