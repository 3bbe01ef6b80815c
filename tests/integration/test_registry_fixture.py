"""The loopback registry fixture (tests/registry.py): a real docker-registry with no auth,
htpasswd basic auth or a bearer-token front (IMG-3), plus fault injection for the retry and
digest rules (IMG-8). Read back with plain httpx, so the fixture is checked independently of
the agent's registry client."""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable

import httpx
import pytest

from agent.image.model import (DOCKER_LIST, DOCKER_MANIFEST, MANIFEST_ACCEPT, OCI_INDEX, OCI_LAYER_FOREIGN_GZIP,
                               OCI_LAYER_GZIP, OCI_MANIFEST)
from tests import oci
from tests.layers import Dir, File, layer
from tests.registry import SERVICE, Registry  # fixtures come from the tests.registry plugin (conftest)

Factory = Callable[..., Registry]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def small_image(tag: bytes = b"x", **kw: object) -> oci.BuiltImage:
    return oci.image([layer([Dir("etc"), File("etc/id", tag * 5000)]),
                      layer([File("etc/more", b"more\n")])], **kw)  # type: ignore[arg-type]


def challenge(resp: httpx.Response) -> dict[str, str]:
    value = resp.headers["www-authenticate"]
    assert value.startswith("Bearer ")
    return dict(re.findall(r'(\w+)="([^"]*)"', value))


def bearer_token(reg: Registry, resp: httpx.Response, auth: tuple[str, str] | None) -> str:
    ch = challenge(resp)
    r = httpx.get(ch["realm"], params={"service": ch["service"], "scope": ch["scope"]}, auth=auth)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["token"] == doc["access_token"] and doc["expires_in"] == 300
    return doc["token"]


def client_for(reg: Registry, repo: str) -> httpx.Client:
    """A plain httpx client already authorised to pull ``repo`` in ``reg``'s mode."""
    if reg.mode == "none":
        return httpx.Client(base_url=reg.url)
    if reg.mode == "basic":
        return httpx.Client(base_url=reg.url, auth=reg.credentials)
    r = httpx.get(f"{reg.url}/v2/{repo}/manifests/latest")
    assert r.status_code == 401
    token = bearer_token(reg, r, reg.credentials)
    return httpx.Client(base_url=reg.url, headers={"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize("mode", ["none", "basic", "bearer"])
def test_push_and_read_back(registry_factory: Factory, mode: str) -> None:
    """IMG-3: in every auth mode a pushed image reads back by tag (with the manifest Accept
    header) and its blobs by digest, digests matching."""
    reg = registry_factory(mode)
    img = small_image()
    assert reg.push("test/app", "v1", img) == img.manifest_digest
    with client_for(reg, "test/app") as c:
        r = c.get("/v2/test/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == OCI_MANIFEST
        assert r.headers["docker-content-digest"] == img.manifest_digest == sha(r.content)
        for desc in r.json()["layers"] + [r.json()["config"]]:
            b = c.get(f"/v2/test/app/blobs/{desc['digest']}")
            assert b.status_code == 200 and sha(b.content) == desc["digest"] and len(b.content) == desc["size"]
        h = c.head(f"/v2/test/app/manifests/{img.manifest_digest}", headers={"Accept": MANIFEST_ACCEPT})
        assert h.status_code == 200 and int(h.headers["content-length"]) == len(img.manifest)


def test_push_index_docker_list_and_by_digest(registry_factory: Factory) -> None:
    """IMG-6: an OCI index and a Docker manifest list push with their children; a push
    without a tag is addressable by digest."""
    reg = registry_factory("none")
    amd = small_image(b"a")
    arm = small_image(b"b", platform=("linux", "arm64", "v8"))
    idx = oci.index([amd, arm])
    reg.push("test/multi", "latest", idx)
    dimg = small_image(b"d", docker=True)
    dlist = oci.index([dimg], docker=True)
    reg.push("test/docker", "v2", dlist)
    digest_only = small_image(b"z")
    reg.push("test/bydigest", None, digest_only)
    with httpx.Client(base_url=reg.url, headers={"Accept": MANIFEST_ACCEPT}) as c:
        r = c.get("/v2/test/multi/manifests/latest")
        assert r.headers["content-type"] == OCI_INDEX and sha(r.content) == idx.digest
        child = c.get(f"/v2/test/multi/manifests/{arm.manifest_digest}")
        assert child.status_code == 200 and child.content == arm.manifest
        r = c.get("/v2/test/docker/manifests/v2")
        assert r.headers["content-type"] == DOCKER_LIST
        r = c.get(f"/v2/test/docker/manifests/{dimg.manifest_digest}")
        assert r.headers["content-type"] == DOCKER_MANIFEST
        assert c.get(f"/v2/test/bydigest/manifests/{digest_only.manifest_digest}").status_code == 200
        tags = c.get("/v2/test/bydigest/tags/list")
        assert tags.status_code == 404 or not tags.json().get("tags")


def test_hostile_images_push(registry_factory: Factory) -> None:
    """IMG-7/IMG-8 fixtures reach a real registry: foreign layers (with urls), zstd bytes
    claiming gzip, wrong diff_ids and zstd layers in a Docker manifest are all accepted."""
    reg = registry_factory("none")
    tars = [layer([File("a", b"a" * 3000)]), layer([File("b", b"b")]), layer([File("c", b"c")])]
    hostile = oci.image(tars, compression=["zstd", "gzip", "gzip"],
                        layer_media_types=[OCI_LAYER_GZIP, OCI_LAYER_FOREIGN_GZIP, "application/x-weird"],
                        diff_ids=["sha256:" + "1" * 64] * 3)
    docker_zstd = oci.image(tars[:1], compression="zstd", docker=True)
    for i, img in enumerate((hostile, docker_zstd)):
        assert reg.push("test/hostile", f"t{i}", img) == img.manifest_digest
        r = httpx.get(f"{reg.url}/v2/test/hostile/manifests/t{i}", headers={"Accept": MANIFEST_ACCEPT})
        assert r.status_code == 200 and r.content == img.manifest


def test_bearer_challenges_and_tokens(registry_factory: Factory) -> None:
    """IMG-3: the bearer front challenges with realm/service/scope, its token endpoint checks
    credentials, tokens are scoped to repository and actions, and Location is rewritten."""
    reg = registry_factory("bearer", users={"alice": "alice-pw"})
    reg.push("test/app", "v1", small_image())

    r = httpx.get(f"{reg.url}/v2/test/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT})
    assert r.status_code == 401
    ch = challenge(r)
    assert ch == {"realm": f"{reg.url}/token", "service": SERVICE, "scope": "repository:test/app:pull"}
    assert challenge(httpx.get(f"{reg.url}/v2/"))["realm"] == f"{reg.url}/token"
    r_push = httpx.post(f"{reg.url}/v2/test/app/blobs/uploads/")
    assert r_push.status_code == 401 and challenge(r_push)["scope"] == "repository:test/app:pull,push"

    # wrong password and no credentials (anonymous not allowed): 401 from /token
    q = {"service": SERVICE, "scope": "repository:test/app:pull"}
    assert httpx.get(ch["realm"], params=q, auth=("alice", "wrong")).status_code == 401
    assert httpx.get(ch["realm"], params=q, auth=("mallory", "alice-pw")).status_code == 401
    assert httpx.get(ch["realm"], params=q).status_code == 401
    # a bogus token is refused
    bad = httpx.get(f"{reg.url}/v2/test/app/manifests/v1", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and challenge(bad)["error"] == "invalid_token"

    token = bearer_token(reg, r, ("alice", "alice-pw"))
    h = {"Authorization": f"Bearer {token}", "Accept": MANIFEST_ACCEPT}
    assert httpx.get(f"{reg.url}/v2/test/app/manifests/v1", headers=h).status_code == 200
    # scoped: another repository, or a push, needs another token
    other = httpx.get(f"{reg.url}/v2/test/other/manifests/v1", headers=h)
    assert other.status_code == 401 and challenge(other)["error"] == "insufficient_scope"
    assert httpx.post(f"{reg.url}/v2/test/app/blobs/uploads/", headers=h).status_code == 401

    push_token = bearer_token(reg, r_push, ("alice", "alice-pw"))
    up = httpx.post(f"{reg.url}/v2/test/app/blobs/uploads/", headers={"Authorization": f"Bearer {push_token}"})
    assert up.status_code == 202
    assert reg.backend not in up.headers["location"]
    assert up.headers["location"].startswith(f"{reg.url}/v2/test/app/blobs/uploads/")
    data = b"hello blob"
    # append ?digest= to the Location (httpx ``params=`` would drop its _state query)
    loc = up.headers["location"] + "&digest=" + sha(data).replace(":", "%3A")
    put = httpx.put(loc, content=data, headers={"Authorization": f"Bearer {push_token}"})
    assert put.status_code == 201 and put.headers["docker-content-digest"] == sha(data)

    reg.expire_tokens()
    assert httpx.get(f"{reg.url}/v2/test/app/manifests/v1", headers=h).status_code == 401
    # every logged request says whether it carried credentials
    assert any(not x.has_auth and x.status == 401 for x in reg.requests)
    assert any(x.has_auth and x.status == 200 for x in reg.requests)


def test_bearer_anonymous_pull_and_push_with_auth(registry_factory: Factory) -> None:
    """IMG-3: anonymous tokens (when allowed) pull but never push; push() with credentials
    goes through the public front and answers the challenges itself."""
    reg = registry_factory("bearer", allow_anonymous_pull=True)
    img = small_image()
    assert reg.push("test/app", "v1", img, auth=reg.credentials) == img.manifest_digest
    assert reg.count("/token", status=200) >= 1

    r = httpx.get(f"{reg.url}/v2/test/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT})
    anon = bearer_token(reg, r, None)
    ok = httpx.get(f"{reg.url}/v2/test/app/manifests/v1",
                   headers={"Authorization": f"Bearer {anon}", "Accept": MANIFEST_ACCEPT})
    assert ok.status_code == 200 and sha(ok.content) == img.manifest_digest
    r_push = httpx.post(f"{reg.url}/v2/test/app/blobs/uploads/")
    anon_push = bearer_token(reg, r_push, None)
    assert httpx.post(f"{reg.url}/v2/test/app/blobs/uploads/",
                      headers={"Authorization": f"Bearer {anon_push}"}).status_code == 401
    with pytest.raises(RuntimeError):
        reg.push("test/app", "v2", img, auth=("tcuser", "wrong"))


def test_basic_auth(registry_factory: Factory) -> None:
    """IMG-3: the registry's own htpasswd auth: no or wrong credentials are 401; the
    password never appears in the registry's log (IMG-4 grep helper)."""
    reg = registry_factory("basic", users={"bob": "bob-S3cret"})
    reg.push("test/app", "v1", small_image())
    url = f"{reg.url}/v2/test/app/manifests/v1"
    r = httpx.get(url)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert httpx.get(url, auth=("bob", "wrong")).status_code == 401
    assert httpx.get(url, auth=("bob", "bob-S3cret"), headers={"Accept": MANIFEST_ACCEPT}).status_code == 200
    assert reg.push("test/app2", "v1", small_image(), auth=("bob", "bob-S3cret"))
    text = reg.log_text()
    assert "/v2/test/app/manifests/v1" in text and "bob-S3cret" not in text


def test_fault_fail_then_success_and_retry_after(registry_factory: Factory) -> None:
    """IMG-8: injected 503s (twice) then success, and a 429 with Retry-After, are counted in
    the request log so retry tests can assert the number of attempts."""
    reg = registry_factory("none", front=True)
    img = small_image()
    reg.push("test/app", "v1", img)
    layer_path = f"/v2/test/app/blobs/{img.layers[0].digest}"
    reg.fail(r"/blobs/sha256:", status=503, times=2)
    statuses = [httpx.get(reg.url + layer_path).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert reg.count(re.escape(layer_path), method="GET") == 3
    assert [x.fault for x in reg.requests if x.path == layer_path] == ["fail", "fail", None]

    reg.fail(r"/manifests/", status=429, times=1, retry_after="1")
    r = httpx.get(f"{reg.url}/v2/test/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert httpx.get(f"{reg.url}/v2/test/app/manifests/v1",
                     headers={"Accept": MANIFEST_ACCEPT}).status_code == 200

    reg.fail(r"/manifests/", status=500, times=1, method="HEAD")
    acc = {"Accept": MANIFEST_ACCEPT}
    assert httpx.get(f"{reg.url}/v2/test/app/manifests/v1", headers=acc).status_code == 200  # GET not matched
    assert httpx.head(f"{reg.url}/v2/test/app/manifests/v1", headers=acc).status_code == 500
    assert httpx.head(f"{reg.url}/v2/test/app/manifests/v1", headers=acc).status_code == 200


def test_fault_corrupt_drop_respond(registry_factory: Factory) -> None:
    """IMG-8: a corrupted blob keeps its length but not its sha256 (once); a dropped
    connection cuts the body short; a canned response replaces the registry's."""
    reg = registry_factory("none", front=True)
    img = small_image()
    reg.push("test/app", "v1", img)
    blob = img.layers[0]
    url = f"{reg.url}/v2/test/app/blobs/{blob.digest}"

    reg.corrupt(re.escape(blob.digest), times=1)
    bad = httpx.get(url)
    assert bad.status_code == 200 and len(bad.content) == blob.size and sha(bad.content) != blob.digest
    assert bad.headers["docker-content-digest"] == blob.digest
    good = httpx.get(url)
    assert sha(good.content) == blob.digest

    reg.drop(re.escape(blob.digest), times=1)
    with pytest.raises(httpx.TransportError):
        httpx.get(url)
    assert sha(httpx.get(url).content) == blob.digest
    assert [x.fault for x in reg.requests if x.path.endswith(blob.digest)] == ["corrupt", None, "drop", None]

    reg.respond(r"/manifests/v1$", status=200, body=b'{"schemaVersion":1}',
                headers={"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"})
    r = httpx.get(f"{reg.url}/v2/test/app/manifests/v1")
    assert r.content == b'{"schemaVersion":1}' and "v1+prettyjws" in r.headers["content-type"]


def test_faults_in_bearer_mode_apply_after_auth(registry_factory: Factory) -> None:
    """IMG-3/IMG-8: faults are consumed by authorised requests, not by the 401 challenges."""
    reg = registry_factory("bearer")
    img = small_image()
    reg.push("test/app", "v1", img)
    reg.fail(r"/manifests/", status=503, times=1)
    r = httpx.get(f"{reg.url}/v2/test/app/manifests/v1")
    assert r.status_code == 401
    h = {"Authorization": f"Bearer {bearer_token(reg, r, reg.credentials)}", "Accept": MANIFEST_ACCEPT}
    assert httpx.get(f"{reg.url}/v2/test/app/manifests/v1", headers=h).status_code == 503
    assert httpx.get(f"{reg.url}/v2/test/app/manifests/v1", headers=h).status_code == 200


def test_no_front_no_faults(registry_factory: Factory) -> None:
    """Fault injection needs the front; without it the registry answers directly."""
    reg = registry_factory("none")
    assert reg.host == reg.backend
    with pytest.raises(RuntimeError):
        reg.fail(r".", status=503)


@pytest.mark.parametrize("mode", ["none", "bearer"])
def test_stop_leaves_no_process(registry_factory: Factory, mode: str) -> None:
    """The registry process (its whole process group) is gone after stop, and both ports
    stop answering."""
    reg = registry_factory(mode)
    pid = reg.pid
    assert pid is not None and reg.alive()
    reg.stop()
    assert not reg.alive()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    for host in {reg.host, reg.backend}:
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://{host}/v2/", timeout=2)
    reg.stop()  # idempotent
