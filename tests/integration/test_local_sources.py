"""Local image sources: oci:, oci-archive:, docker-archive: (SPEC IMG-1, IMG-2, IMG-6, IMG-7,
IMG-8, IMG-11)."""
from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from agent.image import model
from agent.image.model import Descriptor, Platform
from agent.image.sources import open_source
from protocol.config import ImageConfig
from protocol.errors import (
    ImageDigestMismatch,
    ImageInvalid,
    ImageNotFound,
    InvalidRequest,
)
from tests import oci
from tests.layers import Dir, File, layer


def make_image(arch="amd64", variant="", compression="gzip", n=2):
    layers = [layer([Dir("etc"), File("etc/hostname", f"{arch}-{i}\n".encode())]) for i in range(n)]
    return oci.image(layers, compression=compression, platform=("linux", arch, variant))


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "import"
    r.mkdir()
    return r


def open_(ref, root, platform=None):
    return open_source(ref, ImageConfig(local_roots=[str(root)]), platform=platform)


def pull(src, img):
    res = src.resolve()
    assert res.config_digest == img.config_digest
    assert [l.diff_id for l in res.layers] == img.diff_ids
    for l, blob in zip(res.layers, img.layers):
        assert l.digest == blob.digest and l.descriptor.media_type == blob.media_type
        out = io.BytesIO()
        progress = []
        src.fetch_blob(l.descriptor, out, progress.append)
        assert out.getvalue() == blob.data and progress[-1] == blob.size
    return res


def write(kind, path, target, tag="latest"):
    {"oci": oci.write_layout, "oci-archive": oci.write_oci_archive}[kind](path, target, tag)


@pytest.mark.parametrize("kind", ["oci", "oci-archive"])
def test_layout_resolve_and_fetch(root, kind):
    img = make_image()
    path = root / "img"
    write(kind, path, img, "v1")
    with open_(f"{kind}:{path}:v1", root) as src:
        res = pull(src, img)
    assert res.manifest_digest == img.manifest_digest and res.reference == f"{kind}:{path}:v1"
    # without a tag: a one-manifest index is fine (IMG-2)
    with open_(f"{kind}:{path}", root) as src:
        assert src.resolve().manifest_digest == img.manifest_digest


@pytest.mark.parametrize("kind", ["oci", "oci-archive", "docker-archive"])
def test_blobs_fetched_from_many_threads_at_once(root, kind):
    """IMG-9: the layer cache fetches up to 4 blobs at once; readers of one archive must not
    share a file position (a shared TarFile handle gave "unexpected end of data")."""
    import concurrent.futures
    layers = [layer([File(f"f{i}", os.urandom(256 << 10))]) for i in range(8)]
    img = oci.image(layers, compression="none")
    path = root / "img"
    if kind == "docker-archive":
        oci.write_docker_archive(path, img, ["app:v1"])
        ref = f"docker-archive:{path}:app:v1"
    else:
        write(kind, path, img, "v1")
        ref = f"{kind}:{path}:v1"
    with open_(ref, root) as src:
        res = src.resolve()

        def fetch(desc):
            out = io.BytesIO()
            src.fetch_blob(desc, out)
            return out.getvalue()
        for _ in range(3):
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                got = list(pool.map(fetch, [l.descriptor for l in res.layers]))
            assert got == [b.data for b in img.layers]


@pytest.mark.parametrize("kind", ["oci", "oci-archive"])
def test_layout_layer_types_pass_through(root, kind):
    """IMG-7: gzip, zstd and none layers keep their media types."""
    img = make_image(compression=["zstd", "none", "gzip"], n=3)
    write(kind, root / "img", img)
    with open_(f"{kind}:{root / 'img'}:latest", root) as src:
        res = pull(src, img)
    assert [l.compression for l in res.layers] == ["zstd", "none", "gzip"]


def test_layout_missing_tag_and_path(root):
    img = make_image()
    write("oci", root / "img", img, "v1")
    with open_(f"oci:{root / 'img'}:v2", root) as src, pytest.raises(ImageNotFound):
        src.resolve()
    with open_(f"oci:{root / 'nope'}:v1", root) as src, pytest.raises(ImageNotFound):
        src.resolve()
    with open_(f"oci-archive:{root / 'nope.tar'}", root) as src, pytest.raises(ImageNotFound):
        src.resolve()
    (root / "empty").mkdir()
    with open_(f"oci:{root / 'empty'}", root) as src, pytest.raises(ImageNotFound):
        src.resolve()


def test_layout_without_tag_needs_one_manifest(root):
    """IMG-2: oci: without a tag and two manifests in index.json is InvalidRequest."""
    path = root / "two"
    oci.write_layout(path, make_image("amd64"), "a")
    oci.write_layout(path, make_image("arm64"), "b")
    with open_(f"oci:{path}", root) as src, pytest.raises(InvalidRequest) as ei:
        src.resolve()
    assert ei.value.details["field"] == "image"
    with open_(f"oci:{path}:b", root, platform="linux/arm64") as src:
        assert src.resolve().platform.architecture == "arm64"


@pytest.mark.parametrize("kind", ["oci", "oci-archive"])
def test_layout_nested_index_platforms(root, kind):
    """IMG-6: a tagged index is resolved by platform."""
    amd, arm = make_image("amd64"), make_image("arm64", "v8")
    write(kind, root / "multi", oci.index([amd, arm]), "v1")
    with open_(f"{kind}:{root / 'multi'}:v1", root) as src:
        pull(src, amd)
    with open_(f"{kind}:{root / 'multi'}:v1", root, platform="linux/arm64/v8") as src:
        assert pull(src, arm).platform == Platform("linux", "arm64", "v8")
    with open_(f"{kind}:{root / 'multi'}:v1", root, platform="linux/s390x") as src, \
            pytest.raises(ImageNotFound, match="no manifest for platform"):
        src.resolve()


def test_layout_corrupt_blob(root):
    """IMG-8: a blob whose bytes do not match is ImageDigestMismatch after a second read."""
    img = make_image()
    path = root / "img"
    oci.write_layout(path, img)
    d = img.layers[1].digest
    blob = path / "blobs" / "sha256" / d.split(":")[1]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with open_(f"oci:{path}:latest", root) as src:
        res = src.resolve()  # layers are not read while resolving (IMG-11)
        out = io.BytesIO()
        with pytest.raises(ImageDigestMismatch) as ei:
            src.fetch_blob(res.layers[1].descriptor, out)
    assert ei.value.details["expected"] == d and out.getvalue() == b""
    # a corrupt config fails resolve
    cfg = path / "blobs" / "sha256" / img.config_digest.split(":")[1]
    cfg.write_bytes(cfg.read_bytes() + b" ")
    with open_(f"oci:{path}:latest", root) as src, pytest.raises(ImageDigestMismatch):
        src.resolve()


def test_layout_blob_symlink_escape(root, tmp_path):
    img = make_image()
    path = root / "img"
    oci.write_layout(path, img)
    d = img.layers[0].digest
    blob = path / "blobs" / "sha256" / d.split(":")[1]
    outside = tmp_path / "outside-blob"
    outside.write_bytes(blob.read_bytes())
    blob.unlink()
    blob.symlink_to(outside)
    with open_(f"oci:{path}:latest", root) as src:
        res = src.resolve()
        with pytest.raises(ImageInvalid):
            src.fetch_blob(res.layers[0].descriptor, io.BytesIO())


def test_fetch_unknown_blob(root):
    oci.write_layout(root / "img", make_image())
    with open_(f"oci:{root / 'img'}", root) as src:
        src.resolve()
        with pytest.raises(ImageNotFound):
            src.fetch_blob(Descriptor(model.OCI_LAYER, "sha256:" + "2" * 64, 3), io.BytesIO())


def test_oci_archive_rejects_compressed_and_garbage(root):
    import gzip
    buf = io.BytesIO()
    oci.write_oci_archive(buf, make_image(), "latest")
    (root / "a.tar.gz").write_bytes(gzip.compress(buf.getvalue()))
    (root / "junk.tar").write_bytes(b"not a tar at all" * 100)
    for name in ("a.tar.gz", "junk.tar"):
        with open_(f"oci-archive:{root / name}", root) as src, pytest.raises(ImageInvalid):
            src.resolve()


def test_oci_archive_hostile_member_names_ignored(root):
    """Members with '..' or absolute names are invisible; nothing is extracted."""
    img = make_image()
    files = oci.layout_files(img, "latest")
    path = root / "evil.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in files.items():
            if name == "index.json":
                name = "../index.json"
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    before = set(os.listdir(root.parent))
    with open_(f"oci-archive:{path}", root) as src, pytest.raises(ImageNotFound):
        src.resolve()
    assert set(os.listdir(root.parent)) == before


# --- docker-archive ------------------------------------------------------------------------------

def test_docker_archive_resolve_and_fetch(root):
    img = make_image(n=2)
    path = root / "d.tar"
    oci.write_docker_archive(path, img, ["test/x:v1", "test/x:latest"])
    for ref in (f"docker-archive:{path}", f"docker-archive:{path}:test/x:v1", f"docker-archive:{path}:test/x"):
        with open_(ref, root) as src:
            res = src.resolve()
            assert res.config_digest == img.config_digest
            assert [l.diff_id for l in res.layers] == img.diff_ids
            # uncompressed docker-save layers: digest == diff_id, media type plain tar
            assert [l.digest for l in res.layers] == img.diff_ids
            assert {l.descriptor.media_type for l in res.layers} == {model.OCI_LAYER}
            for l, tar in zip(res.layers, img.tars):
                out = io.BytesIO()
                src.fetch_blob(l.descriptor, out)
                assert out.getvalue() == tar
            cfg = io.BytesIO()
            src.fetch_blob(Descriptor(model.OCI_CONFIG, img.config_digest, len(img.config)), cfg)
            assert cfg.getvalue() == img.config
    with open_(f"docker-archive:{path}:test/x:v1", root) as a, open_(f"docker-archive:{path}", root) as b:
        assert a.resolve().manifest_digest == b.resolve().manifest_digest  # stable synthetic digest


def _docker_archive(path, entries, files):
    with tarfile.open(path, "w") as tf:
        for name, data in {**files, "manifest.json": json.dumps(entries).encode()}.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def test_docker_archive_selection(root):
    a, b = make_image("amd64"), make_image("arm64")
    fa, fb = oci.docker_archive_files(a, ["test/a:v1"]), oci.docker_archive_files(b, ["test/b:v1"])
    entries = json.loads(fa.pop("manifest.json")) + json.loads(fb.pop("manifest.json"))
    path = root / "two.tar"
    _docker_archive(path, entries, {**fa, **fb})
    with open_(f"docker-archive:{path}", root) as src, pytest.raises(InvalidRequest):
        src.resolve()
    with open_(f"docker-archive:{path}:test/b:v1", root) as src:
        assert src.resolve().config_digest == b.config_digest
    with open_(f"docker-archive:{path}:test/c:v1", root) as src, pytest.raises(ImageNotFound):
        src.resolve()


def test_docker_archive_gzip_layer_sniffed(root):
    img = make_image(n=1)
    files = oci.docker_archive_files(img, ["t/x:v1"])
    name = json.loads(files["manifest.json"])[0]["Layers"][0]
    files[name] = oci.compress(img.tars[0], "gzip")
    entries = json.loads(files.pop("manifest.json"))
    _docker_archive(root / "gz.tar", entries, files)
    with open_(f"docker-archive:{root / 'gz.tar'}", root) as src:
        res = src.resolve()
        assert res.layers[0].descriptor.media_type == model.OCI_LAYER_GZIP and res.layers[0].compression == "gzip"
        out = io.BytesIO()
        src.fetch_blob(res.layers[0].descriptor, out)
        assert out.getvalue() == files[name]


def test_docker_archive_config_name_must_match(root):
    img = make_image(n=1)
    files = oci.docker_archive_files(img)
    cfg_name = json.loads(files["manifest.json"])[0]["Config"]
    files[cfg_name] = files[cfg_name] + b" "
    entries = json.loads(files.pop("manifest.json"))
    _docker_archive(root / "bad.tar", entries, files)
    with open_(f"docker-archive:{root / 'bad.tar'}", root) as src, pytest.raises(ImageDigestMismatch):
        src.resolve()


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "missing/layer.tar"])
def test_docker_archive_bad_layer_names(root, bad):
    img = make_image(n=1)
    files = oci.docker_archive_files(img)
    entries = json.loads(files.pop("manifest.json"))
    entries[0]["Layers"] = [bad]
    _docker_archive(root / "bad.tar", entries, files)
    with open_(f"docker-archive:{root / 'bad.tar'}", root) as src, pytest.raises(ImageInvalid):
        src.resolve()


# --- local roots (IMG-2) ----------------------------------------------------------------------

@pytest.mark.parametrize("how", ["outside", "dotdot", "symlink", "relative"])
@pytest.mark.parametrize("kind", ["oci", "oci-archive", "docker-archive"])
def test_outside_local_roots(root, tmp_path, how, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    img = make_image(n=1)
    target = outside / "img"
    if kind == "oci":
        oci.write_layout(target, img)
    elif kind == "oci-archive":
        oci.write_oci_archive(target, img)
    else:
        oci.write_docker_archive(target, img)
    (root / "link").symlink_to(target)
    path = {"outside": str(target), "dotdot": f"{root}/../outside/img", "symlink": f"{root}/link",
            "relative": "outside/img"}[how]
    with pytest.raises(InvalidRequest) as ei:
        open_(f"{kind}:{path}", root)
    assert ei.value.details["field"] == "image"


def test_symlink_inside_roots_is_fine(root):
    img = make_image(n=1)
    oci.write_layout(root / "real", img)
    (root / "alias").symlink_to(root / "real")
    with open_(f"oci:{root / 'alias'}", root) as src:
        assert src.resolve().manifest_digest == img.manifest_digest
