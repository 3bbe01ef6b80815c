"""Manifest, index and config parsing and validation (SPEC IMG-6, IMG-7, IMG-8, IMG-11).

Pure functions over bytes: no I/O. Sources fetch documents (verifying their digests), then
call ``parse_document`` / ``select_platform`` / ``build_resolved``.

* Media type (IMG-6): the document's own ``mediaType`` when it names a known type, else the
  Content-Type the transport reported, else inferred from the shape (``manifests`` -> OCI
  index, ``config``+``layers`` -> OCI manifest). A known header type that contradicts a
  known document type is ImageInvalid. Schema 1 (by type, ``schemaVersion: 1`` or
  ``fsLayers``) is ImageInvalid "schema 1 manifests are not supported".
* Platform selection (IMG-6): among index entries whose media type is a manifest or index
  and whose ``platform`` has the wanted ``os`` and ``architecture``:

  - if the wanted platform has a variant, the entry's variant must equal it (for ``arm64``
    an entry without variant counts as ``v8``, containerd's normalisation);
  - if the wanted platform has no variant, the first entry without a variant wins, else the
    first matching entry;
  - nothing matches: ImageNotFound "no manifest for platform <os/arch[/variant]>".
* Layers (IMG-7): media types in ``model.LAYER_TYPES`` only; foreign/non-distributable and
  anything else is ImageInvalid naming the digest. Every digest passes ``check_digest``;
  sizes are non-negative ints.
* Config: a JSON object whose ``rootfs.diff_ids`` has one sha256 per layer (ImageInvalid
  otherwise).
* Caps: documents ≤ ``MAX_MANIFEST_BYTES``, configs ≤ ``MAX_CONFIG_BYTES``, ≤ ``MAX_LAYERS``
  layers, ≤ ``MAX_INDEX_ENTRIES`` index entries, nesting ≤ ``MAX_INDEX_DEPTH``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import ImageDigestMismatch, ImageInvalid, ImageNotFound

from . import model
from .model import Descriptor, Layer, Platform, ResolvedImage, check_digest

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_INDEX_DEPTH",
    "MAX_INDEX_ENTRIES",
    "MAX_LAYERS",
    "MAX_MANIFEST_BYTES",
    "REF_NAME",
    "Index",
    "IndexEntry",
    "Manifest",
    "build_resolved",
    "media_type_of",
    "parse_config",
    "parse_descriptor",
    "parse_document",
    "select_platform",
    "sha256_digest",
    "verify_digest",
]

MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 8 << 20
MAX_LAYERS = 1000
MAX_INDEX_ENTRIES = 1000
MAX_INDEX_DEPTH = 4
REF_NAME = "org.opencontainers.image.ref.name"

_GENERIC_TYPES = ("", "application/json", "text/plain", "application/octet-stream")
_KNOWN_TYPES = model.INDEX_TYPES + model.MANIFEST_TYPES + model.SCHEMA1_TYPES
_FOREIGN = (model.OCI_LAYER_FOREIGN_GZIP, model.DOCKER_LAYER_FOREIGN)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_digest(data: bytes, expected: str, what: str) -> str:
    """ImageDigestMismatch unless ``sha256(data) == expected``; returns the digest."""
    actual = sha256_digest(data)
    if actual != expected:
        raise ImageDigestMismatch(f"{what} digest mismatch: expected {expected}, got {actual}",
                                  {"digest": expected, "expected": expected, "actual": actual})
    return actual


@dataclass(frozen=True, slots=True)
class IndexEntry:
    descriptor: Descriptor
    platform: Platform | None
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Index:
    media_type: str
    manifests: tuple[IndexEntry, ...]


@dataclass(frozen=True, slots=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


def _schema1() -> ImageInvalid:
    return ImageInvalid("schema 1 manifests are not supported", {"reason": "schema1"})


def _load_json(body: bytes, what: str, cap: int) -> Any:
    if len(body) > cap:
        raise ImageInvalid(f"{what} is larger than {cap} bytes", {"size": len(body)})
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageInvalid(f"{what} is not valid JSON: {str(exc)[:200]}") from None


def media_type_of(doc: Any, content_type: str | None) -> str:
    """The document's media type (see the module docstring for the rule)."""
    header = (content_type or "").split(";", 1)[0].strip().lower()
    own = doc.get("mediaType") if isinstance(doc, dict) else None
    if isinstance(doc, dict) and (doc.get("schemaVersion") == 1 or "fsLayers" in doc):
        raise _schema1()
    if header in model.SCHEMA1_TYPES or own in model.SCHEMA1_TYPES:
        raise _schema1()
    if own is not None and not isinstance(own, str):
        raise ImageInvalid("manifest mediaType is not a string")
    if own in _KNOWN_TYPES:
        if header in _KNOWN_TYPES and header != own:
            raise ImageInvalid(f"manifest media type {own!r} contradicts Content-Type {header!r}")
        return own
    if own:
        raise ImageInvalid(f"unsupported manifest media type {own[:200]!r}", {"media_type": own[:200]})
    if header in _KNOWN_TYPES:
        return header
    if header not in _GENERIC_TYPES:
        raise ImageInvalid(f"unsupported manifest media type {header[:200]!r}", {"media_type": header[:200]})
    if isinstance(doc, dict) and "manifests" in doc:
        return model.OCI_INDEX
    if isinstance(doc, dict) and "config" in doc and "layers" in doc:
        return model.OCI_MANIFEST
    raise ImageInvalid("cannot tell the manifest media type")


def parse_descriptor(raw: Any, what: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise ImageInvalid(f"{what} is not a descriptor object")
    media_type = raw.get("mediaType")
    digest = check_digest(raw.get("digest"), what)
    size = raw.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise ImageInvalid(f"{what} {digest} has no media type", {"digest": digest})
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageInvalid(f"{what} {digest} has an invalid size {size!r}", {"digest": digest})
    return Descriptor(media_type, digest, size)


def _platform(raw: Any) -> Platform | None:
    if not isinstance(raw, dict):
        return None
    os_, arch, variant = raw.get("os"), raw.get("architecture"), raw.get("variant", "")
    if not isinstance(os_, str) or not isinstance(arch, str) or not isinstance(variant, str):
        return None
    return Platform(os_, arch, variant)


def _bounded_list(doc: dict[str, Any], key: str, cap: int, what: str, unit: str) -> list[Any]:
    raw = doc.get(key)
    if not isinstance(raw, list):
        raise ImageInvalid(f"{what} has no {key} list")
    if len(raw) > cap:
        raise ImageInvalid(f"{what} has more than {cap} {unit}")
    return raw


def parse_document(body: bytes, content_type: str | None = None) -> Index | Manifest:
    """Parse a manifest or index (IMG-6)."""
    doc = _load_json(body, "manifest", MAX_MANIFEST_BYTES)
    if not isinstance(doc, dict):
        raise ImageInvalid("manifest is not a JSON object")
    media_type = media_type_of(doc, content_type)
    if doc.get("schemaVersion") != 2:
        raise ImageInvalid(f"unsupported manifest schemaVersion {str(doc.get('schemaVersion'))[:20]}")
    if media_type in model.INDEX_TYPES:
        entries = []
        for item in _bounded_list(doc, "manifests", MAX_INDEX_ENTRIES, "index", "entries"):
            desc = parse_descriptor(item, "index entry")
            ann = item.get("annotations")
            ann = {k: v for k, v in ann.items() if isinstance(k, str) and isinstance(v, str)} \
                if isinstance(ann, dict) else {}
            entries.append(IndexEntry(desc, _platform(item.get("platform")), ann))
        return Index(media_type, tuple(entries))
    config = parse_descriptor(doc.get("config"), "config")
    if config.media_type not in model.CONFIG_TYPES:
        raise ImageInvalid(f"config {config.digest} has unsupported media type {config.media_type[:200]!r}",
                           {"digest": config.digest})
    layers = []
    for item in _bounded_list(doc, "layers", MAX_LAYERS, "manifest", "layers"):
        desc = parse_descriptor(item, "layer")
        if desc.media_type in _FOREIGN or (isinstance(item, dict) and item.get("urls")):
            raise ImageInvalid(f"layer {desc.digest} is foreign/non-distributable ({desc.media_type[:200]})",
                               {"digest": desc.digest, "media_type": desc.media_type[:200]})
        if desc.media_type not in model.LAYER_TYPES:
            raise ImageInvalid(f"layer {desc.digest} has unsupported media type {desc.media_type[:200]!r}",
                               {"digest": desc.digest, "media_type": desc.media_type[:200]})
        layers.append(desc)
    return Manifest(media_type, config, tuple(layers))


def _variant(p: Platform) -> str:
    if p.architecture == "arm64" and p.variant in ("", "v8"):
        return "v8"
    return p.variant


def select_platform(index: Index, want: Platform) -> IndexEntry:
    """Pick the entry for ``want`` (rule in the module docstring)."""
    usable = model.INDEX_TYPES + model.MANIFEST_TYPES
    matches = [e for e in index.manifests
               if e.platform is not None and e.descriptor.media_type in usable
               and e.platform.os == want.os and e.platform.architecture == want.architecture]
    if want.variant:
        matches = [e for e in matches if e.platform is not None and _variant(e.platform) == _variant(want)]
    else:
        plain = [e for e in matches if e.platform is not None and not e.platform.variant]
        matches = plain or matches
    if not matches:
        raise ImageNotFound(f"no manifest for platform {want}", {"platform": str(want)})
    return matches[0]


def parse_config(body: bytes, layer_count: int) -> dict[str, Any]:
    """The image config as a dict; ``rootfs.diff_ids`` must list ``layer_count`` sha256s."""
    doc = _load_json(body, "image config", MAX_CONFIG_BYTES)
    if not isinstance(doc, dict):
        raise ImageInvalid("image config is not a JSON object")
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise ImageInvalid("image config has no rootfs.diff_ids")
    if len(diff_ids) != layer_count:
        raise ImageInvalid(f"image config lists {len(diff_ids)} diff_ids for {layer_count} layers",
                           {"diff_ids": len(diff_ids), "layers": layer_count})
    for d in diff_ids:
        check_digest(d, "diff_id")
    return doc


def build_resolved(reference: str, manifest_digest: str, manifest: Manifest, config_body: bytes,
                   platform: Platform) -> ResolvedImage:
    """The ResolvedImage (IMG-11). The caller has verified ``config_body`` against
    ``manifest.config.digest``; this checks it again (cheap) so no path can skip it."""
    check_digest(manifest_digest, "manifest digest")
    verify_digest(config_body, manifest.config.digest, "config")
    config = parse_config(config_body, len(manifest.layers))
    diff_ids = config["rootfs"]["diff_ids"]
    layers = tuple(Layer(desc, model.LAYER_TYPES[desc.media_type], diff_id)
                   for desc, diff_id in zip(manifest.layers, diff_ids))
    actual = _platform(config) or platform
    if not actual.variant and platform.variant and \
            (actual.os, actual.architecture) == (platform.os, platform.architecture):
        actual = platform
    return ResolvedImage(reference=reference, manifest_digest=manifest_digest,
                         manifest_media_type=manifest.media_type, config_digest=manifest.config.digest,
                         config=config, layers=layers, platform=actual)
