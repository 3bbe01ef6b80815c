"""The registry client and registry image source against a real docker-registry on loopback
(SPEC IMG-3, IMG-4, IMG-6, IMG-7, IMG-8, IMG-11); a few transport details on httpx.MockTransport."""
from __future__ import annotations

import base64
import email.utils
import hashlib
import io
import logging
import time

import httpx
import pytest

from agent.image import model
from agent.image.model import Credentials, Descriptor, Platform
from agent.image.reference import parse
from agent.image.registry import (
    RegistryClient,
    RegistrySource,
    parse_challenge,
    parse_retry_after,
)
from agent.image.sources import open_source
from protocol.config import ImageConfig
from protocol.errors import (
    ImageAuthFailed,
    ImageDigestMismatch,
    ImageInvalid,
    ImageNotFound,
    ImageRegistryUnavailable,
    TCError,
)
from tests import oci
from tests.layers import Dir, File, layer

USER, PASSWORD = "tcuser", "Very-S3cret-pass!word"


class FakeSleep:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def make_image(arch="amd64", variant="", compression="gzip", docker=False, n=2):
    layers = [layer([Dir("etc"), File("etc/os-release", f"ID=test-{arch}-{i}\n".encode())]) for i in range(n)]
    return oci.image(layers, compression=compression, platform=("linux", arch, variant), docker=docker,
                     config={"Entrypoint": ["/bin/sh"]})


def cfg_for(reg, **kw) -> ImageConfig:
    return ImageConfig(insecure_registries=[reg.host], **kw)


def source(reg, ref, *, creds=None, platform="linux/amd64", sleep=None, **cfg):
    return open_source(f"{reg.host}/{ref}", cfg_for(reg, **cfg), credentials=creds, platform=platform,
                       sleep=sleep or FakeSleep())


def pull(src, img):
    """Resolve and fetch every blob; check everything against the built image."""
    res = src.resolve()
    assert res.manifest_digest == img.manifest_digest
    assert res.config_digest == img.config_digest
    assert [l.digest for l in res.layers] == [b.digest for b in img.layers]
    assert [l.diff_id for l in res.layers] == img.diff_ids
    for l, blob in zip(res.layers, img.layers):
        out = io.BytesIO()
        seen = []
        src.fetch_blob(l.descriptor, out, seen.append)
        assert out.getvalue() == blob.data
        assert seen and seen[-1] == blob.size
    return res


# --- auth modes (IMG-3) ---------------------------------------------------------------------

def test_anonymous_pull(registry_factory):
    reg = registry_factory("none")
    img = make_image()
    reg.push("test/app", "v1", img)
    with source(reg, "test/app:v1") as src:
        res = pull(src, img)
    assert res.reference == f"{reg.host}/test/app:v1"
    assert res.to_result()["config"]["digest"] == img.config_digest
    assert res.platform == Platform("linux", "amd64")


def test_pull_by_digest(registry_factory):
    reg = registry_factory("none")
    img = make_image()
    digest = reg.push("test/app", "v1", img)
    with source(reg, f"test/app@{digest}") as src:
        pull(src, img)


@pytest.mark.parametrize("mode", ["basic", "bearer"])
def test_authenticated_pull(registry_factory, mode):
    reg = registry_factory(mode, users={USER: PASSWORD})
    img = make_image()
    reg.push("test/app", "v1", img)
    with source(reg, "test/app:v1", creds=Credentials(USER, PASSWORD)) as src:
        pull(src, img)


def test_bearer_token_cached_and_refreshed(registry_factory):
    """Bearer tokens are cached per scope; an expired one is refreshed once."""
    reg = registry_factory("bearer", users={USER: PASSWORD})
    img = make_image(n=3)
    reg.push("test/app", "v1", img)
    with source(reg, "test/app:v1", creds=Credentials(USER, PASSWORD)) as src:
        res = src.resolve()
        for l in res.layers[:2]:
            src.fetch_blob(l.descriptor, io.BytesIO())
        assert reg.count("/token") == 1
        reg.expire_tokens()
        out = io.BytesIO()
        src.fetch_blob(res.layers[2].descriptor, out)
        assert out.getvalue() == img.layers[2].data
        assert reg.count("/token") == 2


def test_bearer_anonymous_pull_when_allowed(registry_factory):
    reg = registry_factory("bearer", users={USER: PASSWORD}, allow_anonymous_pull=True)
    img = make_image()
    reg.push("test/app", "v1", img)
    with source(reg, "test/app:v1") as src:
        pull(src, img)


@pytest.mark.parametrize("mode", ["basic", "bearer"])
@pytest.mark.parametrize("creds", [None, Credentials(USER, "wrong-" + PASSWORD), Credentials("nobody", PASSWORD)])
def test_auth_failures(registry_factory, mode, creds, caplog):
    """IMG-3: wrong or missing credentials -> ImageAuthFailed naming the host, never the password."""
    caplog.set_level(logging.DEBUG)
    reg = registry_factory(mode, users={USER: PASSWORD})
    reg.push("test/app", "v1", make_image())
    src = source(reg, "test/app:v1", creds=creds)
    with pytest.raises(ImageAuthFailed) as ei:
        src.resolve()
    src.close()
    assert reg.host in ei.value.message
    assert_no_secret(ei.value, caplog, src, creds)


def assert_no_secret(exc: TCError, caplog, src, creds) -> None:
    secrets = [PASSWORD, "wrong-" + PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()]
    if creds is not None:
        secrets.append(base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode())
    texts = [str(exc), repr(exc), repr(exc.details), repr(exc.to_wire()), caplog.text, repr(src),
             repr(getattr(src, "client", None)), repr(creds)]
    for s in secrets:
        for t in texts:
            assert s not in t


def test_password_never_leaks_on_success_and_faults(registry_factory, caplog):
    """IMG-4: the password is in no log line, exception, repr or result, even across retries."""
    caplog.set_level(logging.DEBUG)
    reg = registry_factory("basic", users={USER: PASSWORD}, front=True)
    img = make_image()
    reg.push("test/app", "v1", img)
    reg.fail(r"/manifests/", 503, times=1)
    reg.corrupt(r"/blobs/", times=1)
    creds = Credentials(USER, PASSWORD)
    with source(reg, "test/app:v1", creds=creds) as src:
        res = pull(src, img)
        reg.fail(r"/blobs/", 500, times=None)
        with pytest.raises(ImageRegistryUnavailable) as ei:
            src.fetch_blob(res.layers[0].descriptor, io.BytesIO())
        assert_no_secret(ei.value, caplog, src, creds)
        assert PASSWORD not in repr(res) and PASSWORD not in str(res.to_result())


# --- not found (IMG-3) ------------------------------------------------------------------------

@pytest.mark.parametrize("ref", ["test/app:nope", "test/missing:v1", "test/app@sha256:" + "0" * 64])
def test_not_found(registry_factory, ref):
    reg = registry_factory("none")
    reg.push("test/app", "v1", make_image())
    with source(reg, ref) as src, pytest.raises(ImageNotFound):
        src.resolve()


def test_missing_blob_not_found(registry_factory):
    reg = registry_factory("none")
    reg.push("test/app", "v1", make_image())
    with source(reg, "test/app:v1") as src, pytest.raises(ImageNotFound):
        src.fetch_blob(Descriptor(model.OCI_LAYER_GZIP, "sha256:" + "1" * 64, 10), io.BytesIO())


# --- manifests and platforms (IMG-6, IMG-7) -----------------------------------------------------

@pytest.mark.parametrize("docker", [False, True])
def test_multi_arch_index(registry_factory, docker):
    """IMG-6: OCI index / Docker list; linux/amd64 and linux/arm64/v8 picked; others ImageNotFound."""
    reg = registry_factory("none")
    amd, arm = make_image("amd64", docker=docker), make_image("arm64", "v8", docker=docker)
    multi = oci.index([amd, arm], docker=docker)
    reg.push("test/multi", "v1", multi)
    with source(reg, "test/multi:v1") as src:
        res = pull(src, amd)
        assert res.manifest_media_type == (model.DOCKER_MANIFEST if docker else model.OCI_MANIFEST)
    with source(reg, "test/multi:v1", platform="linux/arm64/v8") as src:
        assert pull(src, arm).platform == Platform("linux", "arm64", "v8")
    with source(reg, f"test/multi@{multi.digest}", platform="linux/arm64") as src:
        pull(src, arm)
    with source(reg, "test/multi:v1", platform="linux/riscv64") as src, \
            pytest.raises(ImageNotFound, match="no manifest for platform linux/riscv64"):
        src.resolve()


def test_docker_v2s2_manifest(registry_factory):
    reg = registry_factory("none")
    img = make_image(docker=True)
    reg.push("test/docker", "v1", img)
    with source(reg, "test/docker:v1") as src:
        res = pull(src, img)
    assert res.manifest_media_type == model.DOCKER_MANIFEST
    assert {l.descriptor.media_type for l in res.layers} == {model.DOCKER_LAYER_GZIP}


@pytest.mark.parametrize("compression", [["gzip", "zstd", "none"]])
def test_layer_media_types_pass_through(registry_factory, compression):
    """IMG-7: gzip, zstd and uncompressed layers keep their media type and compression."""
    reg = registry_factory("none")
    img = make_image(compression=compression, n=3)
    reg.push("test/mixed", "v1", img)
    with source(reg, "test/mixed:v1") as src:
        res = pull(src, img)
    assert [l.compression for l in res.layers] == compression
    assert [l.descriptor.media_type for l in res.layers] == [model.OCI_LAYER_GZIP, model.OCI_LAYER_ZSTD,
                                                            model.OCI_LAYER]


def test_schema1_refused(registry_factory):
    reg = registry_factory("none", front=True)
    reg.respond(r"/manifests/", 200, b'{"schemaVersion":1,"name":"test/old","tag":"v1","fsLayers":[]}',
                {"Content-Type": model.DOCKER_MANIFEST_V1_SIGNED})
    with source(reg, "test/old:v1") as src, pytest.raises(ImageInvalid, match="schema 1"):
        src.resolve()


def test_foreign_layer_refused(registry_factory):
    reg = registry_factory("none")
    img = oci.image([layer([File("a", b"a")])], layer_media_types=[model.OCI_LAYER_FOREIGN_GZIP])
    reg.push("test/foreign", "v1", img)
    with source(reg, "test/foreign:v1") as src, pytest.raises(ImageInvalid) as ei:
        src.resolve()
    assert img.layers[0].digest in ei.value.message


# --- retries and verification (IMG-8) ----------------------------------------------------------

def test_503_twice_then_success(registry_factory):
    reg = registry_factory("none", front=True)
    img = make_image()
    reg.push("test/app", "v1", img)
    reg.fail(r"/manifests/v1$", 503, times=2)
    sleep = FakeSleep()
    with source(reg, "test/app:v1", sleep=sleep) as src:
        pull(src, img)
    assert reg.count(r"/manifests/v1$") == 3
    assert reg.count(r"/manifests/v1$", status=503) == 2
    assert len(sleep.calls) == 2 and sleep.calls[1] > sleep.calls[0]  # exponential backoff


@pytest.mark.parametrize("retry_after", ["7", None])
def test_429_retry_after_honoured(registry_factory, retry_after):
    reg = registry_factory("none", front=True)
    img = make_image()
    reg.push("test/app", "v1", img)
    if retry_after is None:  # an HTTP date ~30 s ahead
        retry_after = email.utils.formatdate(time.time() + 30, usegmt=True)
    reg.fail(r"/blobs/", 429, times=1, retry_after=retry_after)
    sleep = FakeSleep()
    with source(reg, "test/app:v1", sleep=sleep) as src:
        pull(src, img)
    assert len(sleep.calls) == 1
    assert sleep.calls[0] >= (7 if retry_after == "7" else 25)


def test_persistent_503_unavailable(registry_factory):
    reg = registry_factory("none", front=True)
    reg.push("test/app", "v1", make_image())
    reg.fail(r"/manifests/", 503, times=None)
    sleep = FakeSleep()
    with source(reg, "test/app:v1", sleep=sleep) as src, pytest.raises(ImageRegistryUnavailable) as ei:
        src.resolve()
    assert reg.count(r"/manifests/") == 4  # 1 + 3 retries
    assert len(sleep.calls) == 3
    assert reg.host in ei.value.message and "503" in ei.value.message


def test_retries_setting(registry_factory):
    reg = registry_factory("none", front=True)
    reg.push("test/app", "v1", make_image())
    reg.fail(r"/manifests/", 502, times=None)
    with source(reg, "test/app:v1", registry_retries=1) as src, pytest.raises(ImageRegistryUnavailable):
        src.resolve()
    assert reg.count(r"/manifests/") == 2


def test_connection_refused_unavailable():
    sleep = FakeSleep()
    from tests.support import free_port
    host = f"127.0.0.1:{free_port()}"
    src = open_source(f"{host}/test/app:v1", ImageConfig(insecure_registries=[host]), sleep=sleep)
    with pytest.raises(ImageRegistryUnavailable, match=host):
        src.resolve()
    assert len(sleep.calls) == 3


def test_corrupt_blob_refetched_once(registry_factory):
    reg = registry_factory("none", front=True)
    img = make_image()
    reg.push("test/app", "v1", img)
    res_digest = img.layers[0].digest
    reg.corrupt(f"/blobs/{res_digest}", times=1)
    with source(reg, "test/app:v1") as src:
        pull(src, img)
    assert reg.count(f"/blobs/{res_digest}") == 2


def test_corrupt_blob_twice_mismatch(registry_factory):
    reg = registry_factory("none", front=True)
    img = make_image()
    reg.push("test/app", "v1", img)
    d = img.layers[0].digest
    reg.corrupt(f"/blobs/{d}", times=2)
    with source(reg, "test/app:v1") as src:
        res = src.resolve()
        out = io.BytesIO(b"keep")
        out.seek(4)
        with pytest.raises(ImageDigestMismatch) as ei:
            src.fetch_blob(res.layers[0].descriptor, out)
    assert ei.value.details["digest"] == d and ei.value.details["expected"] == d
    assert ei.value.details["actual"] != d and ei.value.details["actual"].startswith("sha256:")
    assert out.getvalue() == b"keep"  # nothing half-written stays behind
    assert reg.count(f"/blobs/{d}") == 2


def test_corrupt_config_refetched(registry_factory):
    reg = registry_factory("none", front=True)
    img = make_image()
    reg.push("test/app", "v1", img)
    reg.corrupt(f"/blobs/{img.config_digest}", times=2)
    with source(reg, "test/app:v1") as src, pytest.raises(ImageDigestMismatch):
        src.resolve()


def test_corrupt_child_manifest_mismatch(registry_factory):
    """A manifest fetched by digest is verified (refetched once)."""
    reg = registry_factory("none", front=True)
    amd = make_image()
    multi = oci.index([amd])
    reg.push("test/multi", "v1", multi)
    reg.corrupt(f"/manifests/{amd.manifest_digest}", times=1)
    with source(reg, "test/multi:v1") as src:
        pull(src, amd)
    reg.corrupt(f"/manifests/{amd.manifest_digest}", times=2)
    with source(reg, "test/multi:v1") as src, pytest.raises(ImageDigestMismatch):
        src.resolve()


def test_dropped_body_is_retried(registry_factory):
    """A transport drop mid-body counts as a retry: out is rewound and the blob fetched again."""
    reg = registry_factory("none", front=True)
    big = layer([File("big", bytes(range(256)) * 8192)])
    img = oci.image([big], compression="none")
    reg.push("test/big", "v1", img)
    d = img.layers[0].digest
    reg.drop(f"/blobs/{d}", times=2)
    sleep = FakeSleep()
    with source(reg, "test/big:v1", sleep=sleep) as src:
        pull(src, img)
    assert reg.count(f"/blobs/{d}") == 3 and len(sleep.calls) == 2


# --- open_source and the credentials file (IMG-4) -------------------------------------------------

def test_credentials_file_and_request_override(registry_factory, tmp_path):
    reg = registry_factory("basic", users={USER: PASSWORD})
    img = make_image()
    reg.push("test/app", "v1", img)
    path = tmp_path / "creds.toml"
    path.write_text(f'["{reg.host}"]\nusername = "{USER}"\npassword = "{PASSWORD}"\n')
    path.chmod(0o600)
    with source(reg, "test/app:v1", credentials_file=str(path)) as src:
        pull(src, img)
    with source(reg, "test/app:v1", creds=Credentials(USER, "wrong"), credentials_file=str(path)) as src, \
            pytest.raises(ImageAuthFailed):
        src.resolve()
    path.chmod(0o644)
    with pytest.raises(ImageAuthFailed, match="group or other") as ei:
        source(reg, "test/app:v1", credentials_file=str(path))
    assert PASSWORD not in repr(ei.value)


# --- transport details (httpx.MockTransport) -------------------------------------------------------

def test_redirect_does_not_forward_authorization():
    """Blob redirects are followed; Authorization goes only to the registry's own origin."""
    data = b"blob bytes"
    desc = Descriptor(model.OCI_LAYER, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    seen = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append((req.url.host, req.headers.get("authorization")))
        if req.url.host == "reg.example":
            if "authorization" not in req.headers:
                return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
            return httpx.Response(307, headers={"Location": "https://storage.example/blob?sig=1"})
        return httpx.Response(200, content=data)

    c = RegistryClient("reg.example", credentials=Credentials("u", "p"), transport=httpx.MockTransport(handler),
                       sleep=FakeSleep())
    out = io.BytesIO()
    c.fetch_blob("x/y", desc, out)
    assert out.getvalue() == data
    assert seen[-1] == ("storage.example", None)
    assert seen[-2][0] == "reg.example" and seen[-2][1].startswith("Basic ")


def test_docker_content_digest_header_checked():
    body = b'{"schemaVersion":2,"manifests":[]}'
    bad = "sha256:" + "f" * 64

    def handler(req):
        return httpx.Response(200, content=body, headers={"Docker-Content-Digest": bad,
                                                           "Content-Type": model.OCI_INDEX})
    c = RegistryClient("reg.example", transport=httpx.MockTransport(handler), sleep=FakeSleep())
    with pytest.raises(ImageDigestMismatch):
        c.get_manifest("x/y", "v1")


def test_oversized_blob_stops_early():
    data = b"x" * 100
    desc = Descriptor(model.OCI_LAYER, "sha256:" + hashlib.sha256(data[:10]).hexdigest(), 10)
    calls = []

    def handler(req):
        calls.append(1)
        return httpx.Response(200, content=data)
    c = RegistryClient("reg.example", transport=httpx.MockTransport(handler), sleep=FakeSleep())
    out = io.BytesIO()
    with pytest.raises(ImageDigestMismatch):
        c.fetch_blob("x/y", desc, out)
    assert out.getvalue() == b"" and len(calls) == 2


def test_parse_helpers():
    assert parse_challenge('Bearer realm="https://a/token",service="reg",scope="repository:x:pull"') == (
        "bearer", {"realm": "https://a/token", "service": "reg", "scope": "repository:x:pull"})
    assert parse_challenge('Basic realm="x y"') == ("basic", {"realm": "x y"})
    assert parse_retry_after("5") == 5 and parse_retry_after("100000") == 60 and parse_retry_after("x") is None
    assert parse_retry_after("-3") == 0 and parse_retry_after(None) is None
    later = email.utils.formatdate(1000 + 20, usegmt=True)
    assert 19 <= parse_retry_after(later, now=lambda: 1000) <= 20


def test_registry_source_insecure_and_reference():
    ref = parse("reg.example:5000/a/b:v1")
    src = RegistrySource(ref, platform=Platform(), image_cfg=ImageConfig(insecure_registries=["reg.example:5000"]))
    assert src.client.base == "http://reg.example:5000"
    src.close()
    src = RegistrySource(ref, platform=Platform(), image_cfg=ImageConfig())
    assert src.client.base == "https://reg.example:5000"
    src.close()


def test_credentials_file_rules(tmp_path):
    """IMG-4: hosts match case-insensitively, Docker Hub aliases are one host, request wins,
    a missing file is empty, garbage is refused without quoting it."""
    from agent.image import credentials as cm
    p = tmp_path / "c.toml"
    p.write_text('["Docker.io"]\nusername = "hub"\npassword = "hubpw"\n["reg.example:5000"]\n'
                 'username = "u"\npassword = "p"\n')
    p.chmod(0o600)
    f = cm.load(str(p))
    assert f.for_host("registry-1.docker.io") == Credentials("hub", "hubpw")
    assert f.for_host("REG.example:5000").username == "u" and f.for_host("other") is None
    assert "hubpw" not in repr(f) and "hubpw" not in repr(f.for_host("docker.io"))
    assert cm.pick(Credentials("r", "rp"), f, "docker.io").username == "r"
    assert cm.pick(None, f, "docker.io").username == "hub"
    assert len(cm.load(str(tmp_path / "missing.toml"))) == 0 and len(cm.load("")) == 0
    p.write_text('password = "leak-me" = broken')
    with pytest.raises(ImageAuthFailed) as ei:
        cm.load(str(p))
    assert "leak-me" not in repr(ei.value)
