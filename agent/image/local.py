"""Local image sources: ``oci:``, ``oci-archive:`` and ``docker-archive:`` (SPEC IMG-1, IMG-2,
IMG-6, IMG-7, IMG-8, IMG-11).

* ``oci:PATH[:TAG]`` — an OCI image layout directory: ``oci-layout`` must say version 1.x,
  ``index.json`` lists the roots. With a tag, the entries whose
  ``org.opencontainers.image.ref.name`` equals it are candidates (several: platform selection
  among them); without a tag the index must list exactly one manifest (IMG-2, else
  InvalidRequest). A chosen entry that is itself an index goes through platform selection.
* ``oci-archive:FILE[:TAG]`` — the same layout inside an uncompressed tar. Members are read
  in place with tarfile random access (never extracted). Only regular-file members with
  clean relative names (no ``..``, not absolute, leading ``./`` stripped) are visible.
* ``docker-archive:FILE[:REF]`` — ``docker save`` output: ``manifest.json`` is
  ``[{Config, RepoTags, Layers}]``; REF picks the entry whose ``RepoTags`` contains it (a REF
  without a tag also matches ``REF:latest``); without REF the archive must hold exactly one
  image (else InvalidRequest). Descriptors are synthesised: a layer's digest is the sha256
  of its member's bytes and its media type comes from its magic bytes (gzip -> tar+gzip,
  zstd -> tar+zstd, else plain tar); a config named ``<hex>.json`` or ``blobs/sha256/<hex>``
  must hash to that hex (ImageDigestMismatch). The manifest digest is the sha256 of a
  synthesised canonical OCI manifest (so it is stable and always recorded, IMG-11).

The path has passed ``reference.check_local`` (absolute, under a local root, symlinks
resolved) before a source is built: ``open_source`` does it. A missing file, directory, tag
or blob is ImageNotFound. Blob files/members are located from validated digests only
(``blobs/sha256/<hex>``, or the digest -> member map built while resolving a docker archive),
never from raw JSON strings. ``fetch_blob`` has the registry's contract: exactly
``desc.size`` bytes hashing to ``desc.digest``, re-read once on a mismatch, then
ImageDigestMismatch ``{digest, expected, actual}``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from typing import Any, BinaryIO

from protocol.config import ImageConfig
from protocol.errors import (
    ImageDigestMismatch,
    ImageInvalid,
    ImageNotFound,
    InvalidRequest,
)

from . import manifest as mf
from . import model
from .model import Credentials, Descriptor, Platform, ResolvedImage, check_digest
from .reference import Reference

__all__ = ["CHUNK", "MAX_MEMBERS", "DockerArchiveSource", "OciArchiveSource", "OciLayoutSource"]

CHUNK = 1 << 20
MAX_MEMBERS = 100_000
MAX_NAME = 4096
MAX_SMALL = mf.MAX_MANIFEST_BYTES
_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"


def _blob_name(digest: str) -> str:
    return "blobs/sha256/" + check_digest(digest)[len("sha256:"):]


def _clean(name: str) -> str | None:
    """A tar member or manifest.json path as a clean relative name, or None if unsafe."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or "\x00" in name or name.startswith("/"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _copy_verified(opener: Callable[[], BinaryIO], desc: Descriptor, out: BinaryIO,
                   progress: Callable[[int], None] | None, where: str) -> None:
    check_digest(desc.digest)
    start = out.tell()
    actual, written = "", 0
    for _ in (1, 2):
        out.seek(start)
        out.truncate()
        h = hashlib.sha256()
        written = 0
        with opener() as f:
            while True:
                chunk = f.read(min(CHUNK, desc.size + 1 - written))
                if not chunk:
                    break
                h.update(chunk)
                if written + len(chunk) > desc.size:
                    written += len(chunk)
                    break
                out.write(chunk)
                written += len(chunk)
                if progress is not None:
                    progress(written)
        actual = "sha256:" + h.hexdigest()
        if actual == desc.digest and written == desc.size:
            return
    out.seek(start)
    out.truncate()
    raise ImageDigestMismatch(f"blob {desc.digest} in {where} does not match its descriptor",
                              {"digest": desc.digest, "expected": desc.digest, "actual": actual,
                               "expected_size": desc.size, "actual_size": written})


class _Store:
    """Named files of a layout (a directory or a tar)."""

    where: str

    def open(self, name: str) -> BinaryIO:
        raise NotImplementedError

    def read_small(self, name: str, cap: int = MAX_SMALL) -> bytes:
        with self.open(name) as f:
            data = f.read(cap + 1)
        if len(data) > cap:
            raise ImageInvalid(f"{name} in {self.where} is larger than {cap} bytes")
        return data

    def close(self) -> None:
        pass


class _DirStore(_Store):
    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.where = root
        if not os.path.exists(root):
            raise ImageNotFound(f"no OCI layout at {root}", {"path": root})
        if not os.path.isdir(root):
            raise ImageInvalid(f"{root} is not a directory")

    def open(self, name: str) -> BinaryIO:
        path = os.path.join(self.root, name)
        real = os.path.realpath(path)
        if os.path.commonpath([real, self.root]) != self.root:
            raise ImageInvalid(f"{name} in {self.root} points outside the layout")
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ImageNotFound(f"{name} not found in {self.root}", {"path": self.root}) from None
        except OSError as exc:
            raise ImageInvalid(f"cannot open {name} in {self.root}: {exc.strerror}") from None
        return os.fdopen(fd, "rb")


class _TarStore(_Store):
    def __init__(self, path: str) -> None:
        self.where = path
        if not os.path.exists(path):
            raise ImageNotFound(f"no archive at {path}", {"path": path})
        if not os.path.isfile(path):
            raise ImageInvalid(f"{path} is not a regular file")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic.startswith((_GZIP, _ZSTD)):
            raise ImageInvalid(f"{path} is compressed; only uncompressed tar archives are supported")
        try:
            self.tar = tarfile.open(path, "r:")  # noqa: SIM115 - kept open for random access
        except (tarfile.TarError, OSError) as exc:
            raise ImageInvalid(f"{path} is not a readable tar archive: {exc}") from None
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            for count, info in enumerate(self.tar, 1):
                if count > MAX_MEMBERS:
                    raise ImageInvalid(f"{path} has more than {MAX_MEMBERS} members")
                name = _clean(info.name)
                if name is not None and info.isreg():
                    self.members[name] = info  # the last one wins, as in tar semantics
        except tarfile.TarError as exc:
            self.tar.close()
            raise ImageInvalid(f"{path} is a corrupt tar archive: {exc}") from None
        except BaseException:
            self.tar.close()
            raise

    def has(self, name: str) -> bool:
        return name in self.members

    def size(self, name: str) -> int:
        return self.members[name].size

    def open(self, name: str) -> BinaryIO:
        """A reader of one member over its own file handle: the layer cache fetches several
        blobs at once from worker threads, and readers sharing the TarFile's handle would
        seek under each other ("unexpected end of data")."""
        info = self.members.get(name)
        if info is None:
            raise ImageNotFound(f"{name} not found in {self.where}", {"path": self.where})
        if info.sparse:  # GNU sparse members (never in an OCI archive) need tarfile's own reader
            raise ImageInvalid(f"{name} in {self.where} is a sparse tar member")
        try:
            fd = os.open(self.where, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageNotFound(f"cannot open {self.where}: {exc.strerror}", {"path": self.where}) from None
        return io.BufferedReader(_MemberReader(fd, info.offset_data, info.size))  # type: ignore[return-value]

    def close(self) -> None:
        self.tar.close()


class _MemberReader(io.RawIOBase):
    """``size`` bytes of a file from ``offset``, read with pread on an fd of its own."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self._fd, self._offset, self._size, self._pos = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self._size - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._fd, n, self._offset + self._pos)
        if not data:
            raise ImageInvalid(f"archive ended inside a member (at {self._offset + self._pos})")
        buf[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class _LayoutSource:
    """The OCI image layout logic, over a directory or a tar."""

    def __init__(self, ref: Reference, *, platform: Platform, image_cfg: ImageConfig | None = None,
                 credentials: Credentials | None = None) -> None:
        self.ref = ref
        self.platform = platform
        self._store: _Store | None = None

    def _open_store(self) -> _Store:
        raise NotImplementedError

    @property
    def store(self) -> _Store:
        if self._store is None:
            self._store = self._open_store()
        return self._store

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.ref)!r}, platform={str(self.platform)!r})"

    def _verified(self, desc: Descriptor, cap: int) -> bytes:
        if desc.size > cap:
            raise ImageInvalid(f"blob {desc.digest} is larger than {cap} bytes", {"digest": desc.digest})
        data = self.store.read_small(_blob_name(desc.digest), cap)
        mf.verify_digest(data, desc.digest, "blob")
        return data

    def resolve(self) -> ResolvedImage:
        store = self.store
        try:
            layout = json.loads(store.read_small("oci-layout", 4096))
        except ImageNotFound:
            raise ImageNotFound(f"{store.where} is not an OCI image layout (no oci-layout file)",
                                {"path": store.where}) from None
        except ValueError:
            raise ImageInvalid(f"{store.where}: oci-layout is not JSON") from None
        version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
        if not isinstance(version, str) or not version.startswith("1."):
            raise ImageInvalid(f"{store.where}: unsupported imageLayoutVersion {str(version)[:20]!r}")
        top = mf.parse_document(store.read_small("index.json"), model.OCI_INDEX)
        if not isinstance(top, mf.Index):
            raise ImageInvalid(f"{store.where}: index.json is not an index")
        if self.ref.tag is None:
            if len(top.manifests) != 1:
                raise InvalidRequest(f"{self.ref} has no tag and the layout lists {len(top.manifests)} manifests",
                                     {"field": "image", "reason": "a tag is needed: the index has "
                                      f"{len(top.manifests)} manifests"})
            entry = top.manifests[0]
        else:
            tagged = [e for e in top.manifests if e.annotations.get(mf.REF_NAME) == self.ref.tag]
            if not tagged:
                raise ImageNotFound(f"tag {self.ref.tag!r} not found in {store.where}",
                                    {"path": store.where, "tag": self.ref.tag})
            entry = tagged[0] if len(tagged) == 1 else mf.select_platform(mf.Index(top.media_type, tuple(tagged)),
                                                                          self.platform)
        desc = entry.descriptor
        for _ in range(mf.MAX_INDEX_DEPTH):
            if desc.media_type not in model.INDEX_TYPES + model.MANIFEST_TYPES + model.SCHEMA1_TYPES:
                raise ImageInvalid(f"{desc.digest} has unsupported media type {desc.media_type[:200]!r}",
                                   {"digest": desc.digest})
            doc = mf.parse_document(self._verified(desc, mf.MAX_MANIFEST_BYTES), desc.media_type)
            if isinstance(doc, mf.Manifest):
                config = self._verified(doc.config, mf.MAX_CONFIG_BYTES)
                return mf.build_resolved(str(self.ref), desc.digest, doc, config, self.platform)
            desc = mf.select_platform(doc, self.platform).descriptor
        raise ImageInvalid("image indexes nested too deeply")

    def fetch_blob(self, desc: Descriptor, out: BinaryIO, progress: Callable[[int], None] | None = None) -> None:
        name = _blob_name(desc.digest)
        _copy_verified(lambda: self.store.open(name), desc, out, progress, self.store.where)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OciLayoutSource(_LayoutSource):
    """``oci:PATH[:TAG]``."""

    def _open_store(self) -> _Store:
        return _DirStore(self.ref.path)


class OciArchiveSource(_LayoutSource):
    """``oci-archive:FILE[:TAG]``."""

    def _open_store(self) -> _Store:
        return _TarStore(self.ref.path)


def _sniff(store: _TarStore, name: str) -> str:
    with store.open(name) as f:
        magic = f.read(4)
    if magic.startswith(_GZIP):
        return model.OCI_LAYER_GZIP
    if magic.startswith(_ZSTD):
        return model.OCI_LAYER_ZSTD
    return model.OCI_LAYER


def _oci(desc: Descriptor) -> dict[str, Any]:
    return {"mediaType": desc.media_type, "digest": desc.digest, "size": desc.size}


def _hash_member(store: _TarStore, name: str) -> str:
    h = hashlib.sha256()
    with store.open(name) as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class DockerArchiveSource(_LayoutSource):
    """``docker-archive:FILE[:REF]`` (``docker save`` format)."""

    def __init__(self, ref: Reference, **kw: object) -> None:
        super().__init__(ref, **kw)  # type: ignore[arg-type]
        self._blobs: dict[str, str] = {}   # digest -> member name, built by resolve()

    def _open_store(self) -> _Store:
        return _TarStore(self.ref.path)

    def _entry(self, store: _TarStore) -> dict:
        try:
            doc = json.loads(store.read_small("manifest.json"))
        except ImageNotFound:
            raise ImageInvalid(f"{store.where} is not a docker archive (no manifest.json)") from None
        except ValueError:
            raise ImageInvalid(f"{store.where}: manifest.json is not JSON") from None
        if not isinstance(doc, list) or not all(isinstance(e, dict) for e in doc) or not doc:
            raise ImageInvalid(f"{store.where}: manifest.json is not a list of images")
        want = self.ref.tag
        if want is None:
            if len(doc) != 1:
                raise InvalidRequest(f"{self.ref} names no image and the archive holds {len(doc)}",
                                     {"field": "image", "reason": f"the archive holds {len(doc)} images; name one"})
            return doc[0]
        names = {want}
        last = want.rsplit("/", 1)[-1]
        if ":" not in last and "@" not in last:
            names.add(want + ":latest")
        for e in doc:
            tags = e.get("RepoTags")
            if isinstance(tags, list) and names & {t for t in tags if isinstance(t, str)}:
                return e
        raise ImageNotFound(f"{want!r} not found in {store.where}", {"path": store.where, "tag": want})

    def resolve(self) -> ResolvedImage:
        store = self.store
        assert isinstance(store, _TarStore)
        entry = self._entry(store)
        config_name = _clean(entry.get("Config"))  # type: ignore[arg-type]
        layer_names = entry.get("Layers")
        if config_name is None or not isinstance(layer_names, list):
            raise ImageInvalid(f"{store.where}: manifest.json entry lacks Config or Layers")
        if len(layer_names) > mf.MAX_LAYERS:
            raise ImageInvalid(f"{store.where}: more than {mf.MAX_LAYERS} layers")
        if not store.has(config_name):
            raise ImageInvalid(f"{store.where}: config member is missing")
        config = store.read_small(config_name, mf.MAX_CONFIG_BYTES)
        config_digest = mf.sha256_digest(config)
        base = config_name.rsplit("/", 1)[-1]
        claimed = None
        if base.endswith(".json") and len(base) == 69:
            claimed = "sha256:" + base[:-5]
        elif config_name.startswith("blobs/sha256/"):
            claimed = "sha256:" + base
        if claimed is not None and claimed != config_digest:
            raise ImageDigestMismatch(f"{store.where}: config does not hash to its name",
                                      {"digest": claimed, "expected": claimed, "actual": config_digest})
        blobs = {config_digest: config_name}
        layers: list[Descriptor] = []
        for raw in layer_names:
            name = _clean(raw)
            if name is None or not store.has(name):
                raise ImageInvalid(f"{store.where}: a layer member is missing or has an unsafe name")
            digest = _hash_member(store, name)
            blobs[digest] = name
            layers.append(Descriptor(_sniff(store, name), digest, store.size(name)))
        man = mf.Manifest(model.OCI_MANIFEST, Descriptor(model.OCI_CONFIG, config_digest, len(config)),
                          tuple(layers))
        synthetic = json.dumps({"schemaVersion": 2, "mediaType": model.OCI_MANIFEST,
                                "config": _oci(man.config), "layers": [_oci(l) for l in layers]},
                               sort_keys=True, separators=(",", ":")).encode()
        self._blobs = blobs
        return mf.build_resolved(str(self.ref), mf.sha256_digest(synthetic), man, config, self.platform)

    def fetch_blob(self, desc: Descriptor, out: BinaryIO, progress: Callable[[int], None] | None = None) -> None:
        check_digest(desc.digest)
        if not self._blobs:
            self.resolve()
        name = self._blobs.get(desc.digest)
        if name is None:
            raise ImageNotFound(f"blob {desc.digest} not in {self.store.where}", {"digest": desc.digest})
        store = self.store
        _copy_verified(lambda: store.open(name), desc, out, progress, store.where)

