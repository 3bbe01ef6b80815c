"""Build OCI / Docker images in memory, reproducibly, and write them as layouts and archives.

    from tests.layers import layer, File, Dir
    from tests import oci
    img = oci.image([layer([Dir("etc"), File("etc/os-release", b"ID=test\\n")])],
                    config={"Entrypoint": ["/bin/sh"]})
    oci.write_layout(tmp_path / "layout", img, tag="v1")              # oci:PATH:v1
    oci.write_oci_archive(tmp_path / "img.tar", img, tag="v1")        # oci-archive:FILE:v1
    oci.write_docker_archive(tmp_path / "d.tar", img, ["test/x:v1"])  # docker-archive:FILE
    multi = oci.index([img, oci.image([...], platform=("linux", "arm64", "v8"))])

Everything is deterministic (fixed ``created``, gzip mtime 0, zstd level 3, canonical JSON,
archive entries sorted with fixed owners and mtimes): the same inputs give the same digests.

Hostile images (IMG-6/7/8): ``layer_media_types`` lies about layer types (zstd bytes claiming
gzip, foreign layers, unknown types), ``diff_ids`` gives wrong diff ids, and
``mutate_manifest`` / ``mutate_config`` edit the JSON documents before they are serialised
(e.g. a descriptor with a wrong digest or size).

Only the standard library plus ``zstandard``.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from agent.image.model import (DOCKER_CONFIG, DOCKER_LAYER_FOREIGN, DOCKER_LAYER_GZIP, DOCKER_LIST,
                               DOCKER_MANIFEST, OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_LAYER_FOREIGN_GZIP,
                               OCI_LAYER_GZIP, OCI_LAYER_ZSTD, OCI_MANIFEST)

from .layers import MTIME, digest, gzip_layer

__all__ = [
    "CREATED",
    "REF_NAME",
    "Blob",
    "BuiltImage",
    "BuiltIndex",
    "Target",
    "canonical",
    "compress",
    "docker_archive_files",
    "image",
    "index",
    "layout_files",
    "write_docker_archive",
    "write_layout",
    "write_oci_archive",
]

CREATED = "2024-01-02T03:04:05Z"
REF_NAME = "org.opencontainers.image.ref.name"
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
FOREIGN_TYPES = (OCI_LAYER_FOREIGN_GZIP, DOCKER_LAYER_FOREIGN,
                 "application/vnd.oci.image.layer.nondistributable.v1.tar",
                 "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd")


def canonical(doc: Any) -> bytes:
    """The JSON encoding every document here uses: sorted keys, no spaces."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def compress(data: bytes, compression: str) -> bytes:
    """``gzip`` (tests.layers.gzip_layer), ``zstd`` (level 3) or ``none``."""
    if compression == "gzip":
        return gzip_layer(data)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return digest(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass
class BuiltImage:
    manifest: bytes
    manifest_digest: str
    manifest_media_type: str
    config: bytes
    config_digest: str
    layers: list[Blob]                  # compressed blobs as stored, in manifest order
    diff_ids: list[str]                 # as written into the config (possibly overridden)
    blobs: dict[str, Blob]              # config + layers keyed by digest (what goes to /blobs/); no manifests
    platform: tuple[str, str, str]      # os, arch, variant ("" if none)
    tars: list[bytes] = field(default_factory=list)   # the uncompressed layer tars, in order

    @property
    def manifest_blob(self) -> Blob:
        return Blob(self.manifest_media_type, self.manifest)

    @property
    def config_doc(self) -> dict[str, Any]:
        return json.loads(self.config)

    @property
    def manifest_doc(self) -> dict[str, Any]:
        return json.loads(self.manifest)

    def descriptor(self, with_platform: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.manifest_media_type, "digest": self.manifest_digest,
                             "size": len(self.manifest)}
        if with_platform:
            os_, arch, variant = self.platform
            d["platform"] = {"os": os_, "architecture": arch, **({"variant": variant} if variant else {})}
        return d

    def all_blobs(self) -> dict[str, Blob]:
        """Every content-addressed object: config, layers and the manifest itself."""
        return {**self.blobs, self.manifest_digest: self.manifest_blob}


@dataclass
class BuiltIndex:
    index: bytes
    digest: str
    media_type: str
    images: list[BuiltImage]
    blobs: dict[str, Blob]              # union of the images' config + layer blobs; no manifests

    @property
    def manifest(self) -> bytes:        # so code can treat an image and an index alike
        return self.index

    @property
    def manifest_digest(self) -> str:
        return self.digest

    @property
    def manifest_media_type(self) -> str:
        return self.media_type

    @property
    def index_blob(self) -> Blob:
        return Blob(self.media_type, self.index)

    @property
    def index_doc(self) -> dict[str, Any]:
        return json.loads(self.index)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.index)}

    def all_blobs(self) -> dict[str, Blob]:
        """Every content-addressed object: configs, layers, child manifests and the index."""
        out: dict[str, Blob] = {}
        for img in self.images:
            out.update(img.all_blobs())
        out[self.digest] = self.index_blob
        return out


Target = BuiltImage | BuiltIndex

_DEFAULT_LAYER_TYPES = {
    (False, "gzip"): OCI_LAYER_GZIP, (False, "zstd"): OCI_LAYER_ZSTD, (False, "none"): OCI_LAYER,
    # Docker v2s2 only knows gzip; zstd/none layers in docker mode get the OCI types (hostile on purpose).
    (True, "gzip"): DOCKER_LAYER_GZIP, (True, "zstd"): OCI_LAYER_ZSTD, (True, "none"): OCI_LAYER,
}


def image(layers: Sequence[bytes], *, compression: str | Sequence[str] = "gzip",
          config: dict[str, Any] | None = None, created: str | None = CREATED,
          platform: tuple[str, str, str] = ("linux", "amd64", ""), docker: bool = False,
          layer_media_types: Sequence[str] | None = None, diff_ids: Sequence[str] | None = None,
          history: bool = True,
          mutate_config: Callable[[dict[str, Any]], Any] | None = None,
          mutate_manifest: Callable[[dict[str, Any]], Any] | None = None) -> BuiltImage:
    """An image of ``layers`` (uncompressed tars, e.g. from ``tests.layers.layer``).

    ``compression``: one value for all layers or one per layer. ``config`` is merged into the
    config's ``config`` section (Entrypoint, Cmd, Env, WorkingDir, User, ExposedPorts, Labels).
    ``created=None`` leaves ``created`` out. ``docker`` uses the Docker v2s2 media types.
    Foreign (non-distributable) layer descriptors get a ``urls`` entry so a real registry
    accepts the manifest. ``mutate_*`` get the document (a dict) and may edit it in place or
    return a replacement.
    """
    n = len(layers)
    comps = [compression] * n if isinstance(compression, str) else list(compression)
    if len(comps) != n:
        raise ValueError("compression list must have one entry per layer")
    if layer_media_types is not None and len(layer_media_types) != n:
        raise ValueError("layer_media_types must have one entry per layer")
    os_, arch, variant = platform

    blobs: list[Blob] = []
    for i, (tar, comp) in enumerate(zip(layers, comps)):
        mt = layer_media_types[i] if layer_media_types is not None else _DEFAULT_LAYER_TYPES[(docker, comp)]
        blobs.append(Blob(mt, compress(tar, comp)))
    ids = list(diff_ids) if diff_ids is not None else [digest(t) for t in layers]

    cfg: dict[str, Any] = {"architecture": arch, "os": os_,
                           "rootfs": {"type": "layers", "diff_ids": ids},
                           "config": dict(config or {})}
    if variant:
        cfg["variant"] = variant
    if created is not None:
        cfg["created"] = created
    if history:
        cfg["history"] = [{**({"created": created} if created is not None else {}),
                           "created_by": f"tests.oci layer {i}"} for i in range(n)]
    if mutate_config is not None:
        cfg = _mutated(cfg, mutate_config)
    config_blob = Blob(DOCKER_CONFIG if docker else OCI_CONFIG, canonical(cfg))

    manifest_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    layer_descs = []
    for b in blobs:
        d = b.descriptor()
        if b.media_type in FOREIGN_TYPES:
            d["urls"] = [f"https://foreign.invalid/blobs/{b.digest}"]
        layer_descs.append(d)
    man: dict[str, Any] = {"schemaVersion": 2, "mediaType": manifest_type,
                           "config": config_blob.descriptor(), "layers": layer_descs}
    if mutate_manifest is not None:
        man = _mutated(man, mutate_manifest)
    manifest = canonical(man)

    all_blobs = {config_blob.digest: config_blob}
    for b in blobs:
        all_blobs.setdefault(b.digest, b)
    return BuiltImage(manifest=manifest, manifest_digest=digest(manifest), manifest_media_type=manifest_type,
                      config=config_blob.data, config_digest=config_blob.digest, layers=blobs, diff_ids=ids,
                      blobs=all_blobs, platform=(os_, arch, variant), tars=list(layers))


def index(images: Sequence[BuiltImage], *, docker: bool = False,
          mutate_index: Callable[[dict[str, Any]], Any] | None = None) -> BuiltIndex:
    """An OCI index (Docker manifest list with ``docker``) of ``images``, platform from each image."""
    media_type = DOCKER_LIST if docker else OCI_INDEX
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type,
                           "manifests": [img.descriptor(with_platform=True) for img in images]}
    if mutate_index is not None:
        doc = _mutated(doc, mutate_index)
    data = canonical(doc)
    blobs: dict[str, Blob] = {}
    for img in images:
        blobs.update(img.blobs)
    return BuiltIndex(index=data, digest=digest(data), media_type=media_type, images=list(images), blobs=blobs)


def _mutated(doc: dict[str, Any], fn: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    out = fn(doc)
    return doc if out is None else out


# --- OCI image layout ------------------------------------------------------------------

def _target_descriptor(target: Target, tag: str | None) -> dict[str, Any]:
    d = target.descriptor()
    if tag is not None:
        d["annotations"] = {REF_NAME: tag}
    return d


def layout_files(target: Target, tag: str | None = "latest",
                 existing_index: bytes | None = None) -> dict[str, bytes]:
    """The files of an OCI image layout holding ``target`` (relative path -> content).

    ``existing_index`` is a current ``index.json``: its entries are kept, except one with the
    same tag, which ``target`` replaces (an untagged target is added unless already listed)."""
    files: dict[str, bytes] = {"oci-layout": OCI_LAYOUT}
    for d, b in sorted(target.all_blobs().items()):
        files[f"blobs/sha256/{d.split(':', 1)[1]}"] = b.data
    entries: list[dict[str, Any]] = []
    if existing_index is not None:
        entries = list(json.loads(existing_index).get("manifests", []))
    new = _target_descriptor(target, tag)
    if tag is not None:
        entries = [e for e in entries if (e.get("annotations") or {}).get(REF_NAME) != tag]
    elif any(e == new for e in entries):
        new = None  # type: ignore[assignment]
    if new is not None:
        entries.append(new)
    files["index.json"] = canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    return files


def write_layout(path: str | os.PathLike[str], target: Target, tag: str | None = "latest") -> None:
    """Write (or add to) an OCI image layout at ``path``; ``index.json`` lists ``target``
    (for a BuiltIndex: the index blob itself, a nested index) with ``ref.name = tag``."""
    root = Path(path)
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    idx = root / "index.json"
    existing = idx.read_bytes() if idx.exists() else None
    for rel, data in layout_files(target, tag, existing).items():
        p = root / rel
        if rel.startswith("blobs/") and p.exists():
            continue
        p.write_bytes(data)


# --- archives ----------------------------------------------------------------------------

def _write_tar(file: str | os.PathLike[str] | BinaryIO, files: dict[str, bytes]) -> None:
    """A deterministic ustar/PAX tar: sorted entries, parent dirs first, root:root, fixed mtime."""
    dirs: set[str] = set()
    for name in files:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    names = sorted([(d + "/", None) for d in dirs] + [(n, files[n]) for n in files], key=lambda x: x[0])

    def emit(tf: tarfile.TarFile) -> None:
        for name, data in names:
            ti = tarfile.TarInfo(name.rstrip("/"))
            ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = MTIME, 0, 0, "", ""
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            else:
                ti.mode, ti.size = 0o644, len(data)
                tf.addfile(ti, io.BytesIO(data))

    if isinstance(file, (str, os.PathLike)):
        with tarfile.open(file, "w", format=tarfile.PAX_FORMAT) as tf:
            emit(tf)
    else:
        with tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as tf:
            emit(tf)


def write_oci_archive(file: str | os.PathLike[str] | BinaryIO, target: Target,
                      tag: str | None = "latest") -> None:
    """An ``oci-archive:``: a tar of the OCI layout of ``target`` tagged ``tag``."""
    _write_tar(file, layout_files(target, tag))


def docker_archive_files(img: BuiltImage, repo_tags: Sequence[str] = ("test/image:latest",)) -> dict[str, bytes]:
    """The files of a classic ``docker save`` archive (relative path -> content):
    ``manifest.json`` = [{Config, RepoTags, Layers}], ``<config hex>.json``, one
    ``<diff hex>/layer.tar`` (UNCOMPRESSED) per distinct layer, and ``repositories``."""
    files: dict[str, bytes] = {}
    config_name = f"{img.config_digest.split(':', 1)[1]}.json"
    files[config_name] = img.config
    layer_paths = []
    for tar in img.tars:
        hexd = digest(tar).split(":", 1)[1]
        files[f"{hexd}/layer.tar"] = tar
        files[f"{hexd}/VERSION"] = b"1.0"
        layer_paths.append(f"{hexd}/layer.tar")
    files["manifest.json"] = canonical([{"Config": config_name, "RepoTags": list(repo_tags), "Layers": layer_paths}])
    repos: dict[str, dict[str, str]] = {}
    if layer_paths:
        top = layer_paths[-1].split("/", 1)[0]
        for rt in repo_tags:
            slash = rt.rfind("/")
            colon = rt.rfind(":")
            repo, tag = (rt[:colon], rt[colon + 1:]) if colon > slash else (rt, "latest")
            repos.setdefault(repo, {})[tag] = top
    files["repositories"] = canonical(repos)
    return files


def write_docker_archive(file: str | os.PathLike[str] | BinaryIO, img: BuiltImage,
                         repo_tags: Sequence[str] = ("test/image:latest",)) -> None:
    """A ``docker-archive:`` in the classic ``docker save`` layout (see ``docker_archive_files``)."""
    _write_tar(file, docker_archive_files(img, repo_tags))
