"""The test-suite OCI writer (tests/oci.py): reproducible digests and well-formed documents,
layouts and archives, so image tests (IMG-1, IMG-6, IMG-7, IMG-8) build on solid fixtures."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import zstandard

from agent.image.model import (DOCKER_CONFIG, DOCKER_LAYER_FOREIGN, DOCKER_LAYER_GZIP, DOCKER_LIST,
                               DOCKER_MANIFEST, OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_LAYER_FOREIGN_GZIP,
                               OCI_LAYER_GZIP, OCI_LAYER_ZSTD, OCI_MANIFEST)
from tests import oci
from tests.layers import Dir, File, Opaque, Symlink, Whiteout, layer

REF = "org.opencontainers.image.ref.name"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layers() -> list[bytes]:
    return [layer([Dir("etc"), File("etc/os-release", b"ID=test\n", mode=0o4750, uid=1234, gid=5678,
                                     xattrs={"user.k": b"v"}), Symlink("bin", "usr/bin")]),
            layer([Whiteout("etc/os-release"), Opaque("etc"), File("etc/new", b"new\n")]),
            layer([Dir("data"), File("data/big", bytes(range(256)) * 64)])]


def decompress(blob: oci.Blob, comp: str) -> bytes:
    if comp == "gzip":
        return gzip.decompress(blob.data)
    if comp == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(blob.data)
    return blob.data


def test_same_inputs_give_same_digests() -> None:
    """IMG-8/IMG-20 fixtures: building twice gives byte-identical manifests, configs, indexes
    and archives."""
    def build() -> tuple[oci.BuiltImage, oci.BuiltIndex, bytes, bytes]:
        a = oci.image(layers(), compression=["gzip", "zstd", "none"], config={"Cmd": ["/bin/sh"]})
        b = oci.image(layers()[:1], platform=("linux", "arm64", "v8"))
        idx = oci.index([a, b])
        f1, f2 = io.BytesIO(), io.BytesIO()
        oci.write_oci_archive(f1, idx, tag="v1")
        oci.write_docker_archive(f2, a, ["test/x:v1"])
        return a, idx, f1.getvalue(), f2.getvalue()

    a1, i1, oa1, da1 = build()
    a2, i2, oa2, da2 = build()
    assert a1.manifest_digest == a2.manifest_digest and a1.manifest == a2.manifest
    assert a1.config_digest == a2.config_digest
    assert [b.digest for b in a1.layers] == [b.digest for b in a2.layers]
    assert i1.digest == i2.digest
    assert oa1 == oa2 and da1 == da2
    # and a different input gives a different digest
    assert oci.image(layers(), created="2025-01-01T00:00:00Z").manifest_digest != \
        oci.image(layers()).manifest_digest


@pytest.mark.parametrize("comp,media_type,magic", [("gzip", OCI_LAYER_GZIP, b"\x1f\x8b"),
                                                    ("zstd", OCI_LAYER_ZSTD, b"\x28\xb5\x2f\xfd"),
                                                    ("none", OCI_LAYER, None)])
def test_oci_manifest_and_config_shape(comp: str, media_type: str, magic: bytes | None) -> None:
    """IMG-6/IMG-7/IMG-8: schemaVersion 2 OCI manifest; layer digests = sha256 of the stored
    blob with the declared compression; diff_ids = sha256 of the uncompressed tar."""
    tars = layers()
    img = oci.image(tars, compression=comp, config={"Entrypoint": ["/bin/app"], "Env": ["A=1"],
                                                     "WorkingDir": "/w", "User": "1000:1000",
                                                     "ExposedPorts": {"80/tcp": {}}, "Labels": {"k": "v"}})
    man = json.loads(img.manifest)
    assert img.manifest_digest == sha(img.manifest) and img.manifest_media_type == OCI_MANIFEST
    assert man["schemaVersion"] == 2 and man["mediaType"] == OCI_MANIFEST
    assert man["config"] == {"mediaType": OCI_CONFIG, "digest": sha(img.config), "size": len(img.config)}
    assert img.config_digest == sha(img.config)
    assert len(man["layers"]) == 3
    for desc, blob, tar in zip(man["layers"], img.layers, tars):
        assert desc == {"mediaType": media_type, "digest": sha(blob.data), "size": len(blob.data)}
        assert blob.descriptor() == desc
        if magic:
            assert blob.data.startswith(magic)
        assert decompress(blob, comp) == tar
    cfg = json.loads(img.config)
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [sha(t) for t in tars]}
    assert img.diff_ids == cfg["rootfs"]["diff_ids"]
    assert cfg["architecture"] == "amd64" and cfg["os"] == "linux" and "variant" not in cfg
    assert cfg["created"] == oci.CREATED
    assert cfg["config"]["Entrypoint"] == ["/bin/app"] and cfg["config"]["ExposedPorts"] == {"80/tcp": {}}
    assert len(cfg["history"]) == 3
    assert set(img.blobs) == {img.config_digest, *(b.digest for b in img.layers)}
    assert img.platform == ("linux", "amd64", "")
    # canonical JSON: sorted keys, no spaces
    assert img.manifest == json.dumps(man, sort_keys=True, separators=(",", ":")).encode()


def test_docker_mode_media_types() -> None:
    """IMG-6/IMG-7: Docker v2s2 manifest, config and rootfs.diff.tar.gzip layer types."""
    img = oci.image(layers(), docker=True)
    man = json.loads(img.manifest)
    assert img.manifest_media_type == DOCKER_MANIFEST == man["mediaType"]
    assert man["config"]["mediaType"] == DOCKER_CONFIG
    assert {l["mediaType"] for l in man["layers"]} == {DOCKER_LAYER_GZIP}
    lst = oci.index([img], docker=True)
    assert lst.media_type == DOCKER_LIST == json.loads(lst.index)["mediaType"]


def test_hostile_overrides_and_created_none() -> None:
    """IMG-7/IMG-8 fixtures: lying media types, foreign layers (with urls so a registry takes
    them), wrong diff_ids, manifest mutation, no ``created``, a platform variant."""
    tars = layers()
    bad = "sha256:" + "0" * 64
    img = oci.image(tars, compression=["zstd", "gzip", "gzip"],
                    layer_media_types=[OCI_LAYER_GZIP, OCI_LAYER_FOREIGN_GZIP, DOCKER_LAYER_FOREIGN],
                    diff_ids=[bad, bad, bad], created=None, platform=("linux", "arm", "v7"))
    man = json.loads(img.manifest)
    assert man["layers"][0]["mediaType"] == OCI_LAYER_GZIP and img.layers[0].data.startswith(b"\x28\xb5\x2f\xfd")
    assert man["layers"][1]["urls"] and man["layers"][2]["urls"] and "urls" not in man["layers"][0]
    cfg = json.loads(img.config)
    assert cfg["rootfs"]["diff_ids"] == [bad] * 3 and img.diff_ids == [bad] * 3
    assert "created" not in cfg and cfg["variant"] == "v7" and cfg["architecture"] == "arm"

    def wrong_size(m: dict) -> None:
        m["layers"][0]["size"] += 1
    img2 = oci.image(tars, mutate_manifest=wrong_size)
    assert json.loads(img2.manifest)["layers"][0]["size"] == img2.layers[0].size + 1
    assert img2.manifest_digest == sha(img2.manifest)


def test_index_platform_entries() -> None:
    """IMG-6: index entries carry each image's platform (variant only when set)."""
    amd = oci.image(layers()[:1])
    arm = oci.image(layers()[:2], platform=("linux", "arm64", "v8"))
    idx = oci.index([amd, arm])
    doc = json.loads(idx.index)
    assert idx.digest == sha(idx.index) and idx.media_type == OCI_INDEX
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == OCI_INDEX
    assert doc["manifests"] == [
        {"mediaType": OCI_MANIFEST, "digest": amd.manifest_digest, "size": len(amd.manifest),
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": OCI_MANIFEST, "digest": arm.manifest_digest, "size": len(arm.manifest),
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}]
    assert set(idx.blobs) == set(amd.blobs) | set(arm.blobs)
    assert set(idx.all_blobs()) == set(idx.blobs) | {amd.manifest_digest, arm.manifest_digest, idx.digest}


def _check_layout_blobs(files: dict[str, bytes]) -> None:
    for name, data in files.items():
        if name.startswith("blobs/sha256/") and not name.endswith("/"):
            assert sha(data) == "sha256:" + name.rsplit("/", 1)[1], name


def test_write_layout_tags_and_nested_index(tmp_path: Path) -> None:
    """IMG-1/IMG-2: an oci: layout with tagged index.json entries; a second tag keeps the
    first, the same tag is replaced; an index target is listed as a nested index."""
    a = oci.image(layers()[:1])
    b = oci.image(layers()[:2])
    root = tmp_path / "layout"
    oci.write_layout(root, a, tag="v1")
    assert json.loads((root / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    oci.write_layout(root, b, tag="v2")
    doc = json.loads((root / "index.json").read_bytes())
    assert doc["schemaVersion"] == 2
    tags = {e["annotations"][REF]: e for e in doc["manifests"]}
    assert tags["v1"]["digest"] == a.manifest_digest and tags["v1"]["mediaType"] == OCI_MANIFEST
    assert tags["v2"]["digest"] == b.manifest_digest and tags["v2"]["size"] == len(b.manifest)
    oci.write_layout(root, b, tag="v1")  # retag
    doc = json.loads((root / "index.json").read_bytes())
    assert sorted((e["annotations"][REF], e["digest"]) for e in doc["manifests"]) == \
        [("v1", b.manifest_digest), ("v2", b.manifest_digest)]
    files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    _check_layout_blobs(files)
    for d in {**a.all_blobs(), **b.all_blobs()}:
        assert (root / "blobs" / "sha256" / d.split(":")[1]).is_file()

    idx = oci.index([a, oci.image(layers()[:1], platform=("linux", "arm64", ""))])
    nested = tmp_path / "nested"
    oci.write_layout(nested, idx, tag="multi")
    (entry,) = json.loads((nested / "index.json").read_bytes())["manifests"]
    assert entry == {"mediaType": OCI_INDEX, "digest": idx.digest, "size": len(idx.index),
                     "annotations": {REF: "multi"}}
    for d in idx.all_blobs():
        assert (nested / "blobs" / "sha256" / d.split(":")[1]).is_file()

    untagged = tmp_path / "untagged"
    oci.write_layout(untagged, a, tag=None)
    oci.write_layout(untagged, a, tag=None)
    (entry,) = json.loads((untagged / "index.json").read_bytes())["manifests"]
    assert "annotations" not in entry


def test_oci_archive_structure(tmp_path: Path) -> None:
    """IMG-1: an oci-archive: is a tar of the layout, with fixed owners and mtimes."""
    img = oci.image(layers())
    path = tmp_path / "img.tar"
    oci.write_oci_archive(path, img, tag="v3")
    with tarfile.open(path) as tf:
        members = tf.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names)
        assert {"oci-layout", "index.json", "blobs", "blobs/sha256"} <= set(names)
        assert all(m.uid == 0 and m.gid == 0 and m.mtime == members[0].mtime for m in members)
        files = {m.name: tf.extractfile(m).read() for m in members if m.isfile()}  # type: ignore[union-attr]
    _check_layout_blobs(files)
    (entry,) = json.loads(files["index.json"])["manifests"]
    assert entry["digest"] == img.manifest_digest and entry["annotations"][REF] == "v3"
    assert files == oci.layout_files(img, "v3")


def test_docker_archive_structure(tmp_path: Path) -> None:
    """IMG-1: a docker-archive: in `docker save` layout, layers stored uncompressed."""
    tars = layers()
    img = oci.image(tars, docker=True)
    path = tmp_path / "d.tar"
    oci.write_docker_archive(path, img, ["test/x:v1", "localhost:5000/y"])
    with tarfile.open(path) as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}  # type: ignore[union-attr]
    (entry,) = json.loads(files["manifest.json"])
    assert entry["RepoTags"] == ["test/x:v1", "localhost:5000/y"]
    assert files[entry["Config"]] == img.config
    assert [sha(files[p]) for p in entry["Layers"]] == json.loads(img.config)["rootfs"]["diff_ids"]
    assert [files[p] for p in entry["Layers"]] == tars
    assert all(p.endswith("/layer.tar") for p in entry["Layers"])
    repos = json.loads(files["repositories"])
    assert set(repos) == {"test/x", "localhost:5000/y"} and set(repos["localhost:5000/y"]) == {"latest"}
