"""Manifest/index/config parsing and validation (SPEC IMG-6, IMG-7, IMG-8, IMG-11), on
hand-built JSON."""
from __future__ import annotations

import hashlib
import json

import pytest

from agent.image import manifest as mf
from agent.image import model
from agent.image.model import Platform
from protocol.errors import ImageDigestMismatch, ImageInvalid, ImageNotFound


def dg(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def js(doc) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


L1, L2 = dg(b"layer1"), dg(b"layer2")


def config_bytes(n=2, **extra) -> bytes:
    return js({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",
               "diff_ids": [dg(b"diff%d" % i) for i in range(n)]}, **extra})


def manifest_doc(config=None, layers=None, media_type=model.OCI_MANIFEST, config_type=model.OCI_CONFIG):
    config = config if config is not None else config_bytes()
    layers = layers if layers is not None else [(model.OCI_LAYER_GZIP, L1, 10), (model.OCI_LAYER_ZSTD, L2, 20)]
    doc = {"schemaVersion": 2, "config": {"mediaType": config_type, "digest": dg(config), "size": len(config)},
           "layers": [{"mediaType": t, "digest": d, "size": s} for t, d, s in layers]}
    if media_type:
        doc["mediaType"] = media_type
    return doc


def entry(digest, arch, variant=None, os_="linux", mt=model.OCI_MANIFEST):
    p = {"os": os_, "architecture": arch}
    if variant is not None:
        p["variant"] = variant
    return {"mediaType": mt, "digest": digest, "size": 100, "platform": p}


def index_doc(entries, media_type=model.OCI_INDEX):
    return {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}


# --- media types -------------------------------------------------------------------------

def test_oci_manifest_parses():
    m = mf.parse_document(js(manifest_doc()), model.OCI_MANIFEST)
    assert isinstance(m, mf.Manifest) and m.media_type == model.OCI_MANIFEST
    assert [l.digest for l in m.layers] == [L1, L2]


def test_docker_v2s2_manifest_and_list():
    """IMG-6: Docker v2s2 manifest and manifest list."""
    doc = manifest_doc(media_type=model.DOCKER_MANIFEST, config_type=model.DOCKER_CONFIG,
                       layers=[(model.DOCKER_LAYER_GZIP, L1, 5)])
    m = mf.parse_document(js(doc), "application/vnd.docker.distribution.manifest.v2+json; charset=utf-8")
    assert m.media_type == model.DOCKER_MANIFEST
    idx = mf.parse_document(js(index_doc([entry(L1, "amd64", mt=model.DOCKER_MANIFEST)], model.DOCKER_LIST)),
                            model.DOCKER_LIST)
    assert isinstance(idx, mf.Index) and idx.media_type == model.DOCKER_LIST


@pytest.mark.parametrize("header, doc_type, expect", [
    (None, model.OCI_MANIFEST, model.OCI_MANIFEST),
    ("application/json", model.OCI_MANIFEST, model.OCI_MANIFEST),
    (model.OCI_MANIFEST, None, model.OCI_MANIFEST),
    ("application/octet-stream", None, model.OCI_MANIFEST),  # inferred from config+layers
    (model.DOCKER_MANIFEST, None, model.DOCKER_MANIFEST),
])
def test_media_type_rule(header, doc_type, expect):
    assert mf.parse_document(js(manifest_doc(media_type=doc_type)), header).media_type == expect


def test_index_without_media_type_is_inferred():
    doc = {"schemaVersion": 2, "manifests": []}
    assert mf.parse_document(js(doc), None).media_type == model.OCI_INDEX


@pytest.mark.parametrize("header, doc", [
    (model.DOCKER_MANIFEST_V1_SIGNED, {"schemaVersion": 1, "fsLayers": []}),
    ("application/json", {"schemaVersion": 1, "name": "x", "tag": "y", "fsLayers": [], "history": []}),
    (None, {"mediaType": model.DOCKER_MANIFEST_V1, "schemaVersion": 1}),
])
def test_schema1_refused(header, doc):
    """IMG-6: schema 1 is ImageInvalid."""
    with pytest.raises(ImageInvalid, match="schema 1 manifests are not supported"):
        mf.parse_document(js(doc), header)


@pytest.mark.parametrize("body, header", [
    (b"not json", None),
    (b"[]", None),
    (js({"schemaVersion": 2, "mediaType": "application/vnd.example+json"}), None),
    (js({"schemaVersion": 2}), "application/vnd.example+json"),
    (js({"schemaVersion": 2}), None),
    (js(manifest_doc(media_type=model.OCI_MANIFEST)), model.DOCKER_MANIFEST),  # contradiction
    (js({**manifest_doc(), "schemaVersion": 3}), None),
    (js(manifest_doc(config_type="application/vnd.example.config+json")), None),
    (js({k: v for k, v in manifest_doc().items() if k != "layers"}), model.OCI_MANIFEST),
    (js(index_doc("nope")), None),
])
def test_unsupported_documents(body, header):
    with pytest.raises(ImageInvalid):
        mf.parse_document(body, header)


def test_size_caps():
    big = js(manifest_doc()) + b" " * mf.MAX_MANIFEST_BYTES
    with pytest.raises(ImageInvalid, match="larger"):
        mf.parse_document(big, None)
    many = [(model.OCI_LAYER, L1, 1)] * (mf.MAX_LAYERS + 1)
    with pytest.raises(ImageInvalid, match="more than"):
        mf.parse_document(js(manifest_doc(layers=many)), None)
    with pytest.raises(ImageInvalid, match="more than"):
        mf.parse_document(js(index_doc([entry(L1, "amd64")] * (mf.MAX_INDEX_ENTRIES + 1))), None)


# --- layers (IMG-7) ------------------------------------------------------------------------

@pytest.mark.parametrize("media_type, compression", sorted(model.LAYER_TYPES.items()))
def test_layer_types_pass_through(media_type, compression):
    """IMG-7: tar, tar+gzip, tar+zstd and Docker rootfs.diff.tar.gzip are accepted."""
    cfg = config_bytes(1)
    doc = manifest_doc(config=cfg, layers=[(media_type, L1, 7)])
    img = mf.build_resolved("ref", dg(js(doc)), mf.parse_document(js(doc), None), cfg, Platform())
    assert img.layers[0].compression == compression
    assert img.layers[0].descriptor.media_type == media_type


@pytest.mark.parametrize("media_type", [model.OCI_LAYER_FOREIGN_GZIP, model.DOCKER_LAYER_FOREIGN,
                                        "application/vnd.oci.image.layer.nondistributable.v1.tar",
                                        "application/vnd.example.layer", "application/octet-stream"])
def test_bad_layer_types_name_the_digest(media_type):
    """IMG-7: foreign/non-distributable and unknown media types are ImageInvalid naming the digest."""
    with pytest.raises(ImageInvalid) as ei:
        mf.parse_document(js(manifest_doc(layers=[(model.OCI_LAYER, L2, 1), (media_type, L1, 7)])), None)
    assert L1 in ei.value.message and ei.value.details["digest"] == L1


def test_layer_with_urls_is_foreign():
    doc = manifest_doc()
    doc["layers"][1]["urls"] = ["https://example.invalid/blob"]
    with pytest.raises(ImageInvalid, match=L2):
        mf.parse_document(js(doc), None)


@pytest.mark.parametrize("mutate", [
    lambda l: l.update(digest="sha256:" + "G" * 64),
    lambda l: l.update(digest="sha512:" + "a" * 128),
    lambda l: l.update(digest="sha256:../../etc/passwd"),
    lambda l: l.pop("digest"),
    lambda l: l.update(size=-1),
    lambda l: l.update(size="10"),
    lambda l: l.update(size=True),
    lambda l: l.update(size=1.5),
    lambda l: l.pop("mediaType"),
])
def test_bad_descriptors(mutate):
    doc = manifest_doc()
    mutate(doc["layers"][0])
    with pytest.raises(ImageInvalid):
        mf.parse_document(js(doc), None)


# --- config --------------------------------------------------------------------------------

def test_build_resolved():
    """IMG-11: manifest digest, config (digest + content), layers with diff_ids, platform."""
    cfg = config_bytes(2, created="2024-01-02T03:04:05Z")
    doc = js(manifest_doc(config=cfg))
    img = mf.build_resolved("host.io/app:v1", dg(doc), mf.parse_document(doc, None), cfg, Platform())
    assert img.manifest_digest == dg(doc) and img.config_digest == dg(cfg)
    assert [l.diff_id for l in img.layers] == json.loads(cfg)["rootfs"]["diff_ids"]
    assert [l.compression for l in img.layers] == ["gzip", "zstd"]
    assert img.platform == Platform("linux", "amd64") and img.created_epoch == 1704164645
    res = img.to_result()
    assert res["layers_size"] == 30 and res["reference"] == "host.io/app:v1"


def test_config_digest_mismatch():
    """IMG-8: a config that does not hash to its descriptor is ImageDigestMismatch."""
    cfg = config_bytes(2)
    m = mf.parse_document(js(manifest_doc(config=cfg)), None)
    with pytest.raises(ImageDigestMismatch) as ei:
        mf.build_resolved("r", L1, m, cfg + b" ", Platform())
    assert ei.value.details["expected"] == dg(cfg) and ei.value.details["actual"] == dg(cfg + b" ")


@pytest.mark.parametrize("cfg", [
    config_bytes(1),                              # one diff_id for two layers
    config_bytes(3),
    js({"rootfs": {"type": "layers"}}),
    js({"rootfs": {"diff_ids": [L1, "sha256:bad"]}}),
    js([1, 2]),
    b"{",
])
def test_config_diff_ids(cfg):
    """diff_ids must be sha256 and one per layer, else ImageInvalid."""
    m = mf.parse_document(js(manifest_doc(config=cfg)), None)
    with pytest.raises(ImageInvalid):
        mf.build_resolved("r", L1, m, cfg, Platform())


# --- platform selection (IMG-6) -------------------------------------------------------------

A, B, C, D, E = (dg(bytes([i])) for i in range(5))


def idx(*entries):
    return mf.parse_document(js(index_doc(list(entries))), None)


def test_platform_selection():
    index = idx(entry(A, "arm", "v7"), entry(B, "arm64", "v8"), entry(C, "amd64"), entry(D, "s390x"),
                entry(E, "amd64", os_="windows"))
    assert mf.select_platform(index, Platform("linux", "amd64")).descriptor.digest == C
    assert mf.select_platform(index, Platform("linux", "arm64", "v8")).descriptor.digest == B
    assert mf.select_platform(index, Platform("linux", "arm64")).descriptor.digest == B
    assert mf.select_platform(index, Platform("linux", "arm", "v7")).descriptor.digest == A
    assert mf.select_platform(index, Platform("windows", "amd64")).descriptor.digest == E
    with pytest.raises(ImageNotFound, match="no manifest for platform linux/arm/v6"):
        mf.select_platform(index, Platform("linux", "arm", "v6"))
    with pytest.raises(ImageNotFound, match="no manifest for platform linux/riscv64"):
        mf.select_platform(index, Platform("linux", "riscv64"))


def test_platform_variant_rules():
    """Wanted variant must match (arm64 without variant counts as v8); with no wanted
    variant, an entry without variant is preferred, else the first match."""
    assert mf.select_platform(idx(entry(A, "arm64")), Platform("linux", "arm64", "v8")).descriptor.digest == A
    assert mf.select_platform(idx(entry(A, "arm", "v7"), entry(B, "arm")),
                              Platform("linux", "arm")).descriptor.digest == B
    assert mf.select_platform(idx(entry(A, "arm", "v6"), entry(B, "arm", "v7")),
                              Platform("linux", "arm")).descriptor.digest == A
    with pytest.raises(ImageNotFound):
        mf.select_platform(idx(entry(A, "arm")), Platform("linux", "arm", "v7"))


def test_platform_skips_non_manifests_and_missing_platforms():
    odd = {"mediaType": "application/vnd.example+json", "digest": A, "size": 1,
           "platform": {"os": "linux", "architecture": "amd64"}}
    bare = {"mediaType": model.OCI_MANIFEST, "digest": B, "size": 1}
    index = idx(odd, bare, entry(C, "amd64"))
    assert mf.select_platform(index, Platform()).descriptor.digest == C
    with pytest.raises(ImageNotFound):
        mf.select_platform(idx(odd, bare), Platform())


def test_verify_digest():
    assert mf.verify_digest(b"x", dg(b"x"), "blob") == dg(b"x")
    with pytest.raises(ImageDigestMismatch):
        mf.verify_digest(b"y", dg(b"x"), "blob")
