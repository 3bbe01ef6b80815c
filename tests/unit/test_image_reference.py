"""Image references (SPEC IMG-1) and local-path checks (IMG-2)."""
from __future__ import annotations

import os

import pytest

from agent.image.reference import DOCKER_HUB, Reference, check_local, parse
from protocol.errors import InvalidRequest

D = "sha256:" + "a" * 64


@pytest.mark.parametrize("text, registry, repo, tag, digest", [
    ("busybox", DOCKER_HUB, "library/busybox", "latest", None),
    ("busybox:1.36", DOCKER_HUB, "library/busybox", "1.36", None),
    ("myorg/app:v1", DOCKER_HUB, "myorg/app", "v1", None),
    ("docker.io/busybox", DOCKER_HUB, "library/busybox", "latest", None),
    ("index.docker.io/library/busybox:x", DOCKER_HUB, "library/busybox", "x", None),
    ("docker://quay.io/org/img:tag", "quay.io", "org/img", "tag", None),
    ("quay.io/img", "quay.io", "img", "latest", None),
    ("localhost/app", "localhost", "app", "latest", None),
    ("localhost:5000/a/b/c:t", "localhost:5000", "a/b/c", "t", None),
    ("127.0.0.1:5000/test/app", "127.0.0.1:5000", "test/app", "latest", None),
    ("Registry.Example.com/x", "registry.example.com", "x", "latest", None),
    ("[::1]:5000/x", "[::1]:5000", "x", "latest", None),
    (f"host.io/app@{D}", "host.io", "app", None, D),
    (f"host.io:443/app:v2@{D}", "host.io:443", "app", "v2", D),
    ("a/b__c.d-e--f:_T.a-g", DOCKER_HUB, "a/b__c.d-e--f", "_T.a-g", None),
])
def test_registry_references(text, registry, repo, tag, digest):
    """IMG-1: host detection, default registry, library/, default tag, digests."""
    ref = parse(text)
    assert (ref.transport, ref.registry, ref.repository, ref.tag, ref.digest) == ("docker", registry, repo, tag, digest)
    assert parse(str(ref)) == ref  # the canonical form round-trips


def test_default_registry_setting():
    """IMG-1: a short name goes to image.default_registry, one-part names get library/."""
    assert parse("app", "mirror.local:5000") == Reference("docker", "mirror.local:5000", "library/app", "latest")
    assert parse("org/app:v", "mirror.local") == Reference("docker", "mirror.local", "org/app", "v")
    assert str(parse("app", "mirror.local")) == "mirror.local/library/app:latest"


@pytest.mark.parametrize("text, transport, path, tag", [
    ("oci:/srv/layout", "oci", "/srv/layout", None),
    ("oci:/srv/layout:v1", "oci", "/srv/layout", "v1"),
    ("oci-archive:/srv/a.tar", "oci-archive", "/srv/a.tar", None),
    ("oci-archive:/srv/a.tar:latest", "oci-archive", "/srv/a.tar", "latest"),
    ("docker-archive:/srv/d.tar", "docker-archive", "/srv/d.tar", None),
    ("docker-archive:/srv/d.tar:test/x:v1", "docker-archive", "/srv/d.tar", "test/x:v1"),
    ("oci:relative/dir", "oci", "relative/dir", None),  # parse keeps it; check_local refuses it
])
def test_local_references(text, transport, path, tag):
    ref = parse(text)
    assert (ref.transport, ref.path, ref.tag) == (transport, path, tag)
    assert ref.is_local and str(ref) == text


@pytest.mark.parametrize("text", [
    "", "UPPER/case", "host.io/Repo", "host.io/app:", "host.io/app:-bad", "host.io/app:" + "t" * 129,
    "host.io/app@sha512:" + "a" * 128, "host.io/app@sha256:abc", "host.io/app@sha256:" + "A" * 64,
    "host.io//app", "host.io/app/", "host.io/a..b", "host.io/-a", "bad_host.io:x/app",
    "a b", "app\n", "ftp://host/app", "oci:", "oci:/x:", "oci:/x:bad tag", "oci-archive:/x:t:u",
    "docker-archive:/x:", "host.io:99999999/app", "x" * 5000, "host.io/" + "a" * 256,
])
def test_invalid_references(text):
    """IMG-1: malformed input is InvalidRequest with field=image and a reason."""
    with pytest.raises(InvalidRequest) as ei:
        parse(text)
    assert ei.value.details["field"] == "image"
    assert ei.value.details["reason"]


def test_reference_is_frozen():
    ref = parse("busybox")
    with pytest.raises(AttributeError):
        ref.tag = "x"  # type: ignore[misc]


def test_check_local_inside_root(tmp_path):
    """IMG-2: an absolute path under a local root passes and comes back as its real path."""
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    link_root = tmp_path / "rootlink"
    link_root.symlink_to(root)
    ref = check_local(parse(f"oci:{root}/img:v1"), [str(root)])
    assert ref.path == os.path.realpath(root / "img") and ref.tag == "v1"
    # a root given through a symlink is compared by its real path too
    assert check_local(parse(f"oci:{root}/img"), [str(link_root)]).path == str(root / "img")
    # registry references are untouched
    r = parse("busybox")
    assert check_local(r, []) is r


@pytest.mark.parametrize("make", ["relative", "dotdot", "outside", "symlink", "prefix", "noroots"])
def test_check_local_refusals(tmp_path, make):
    """IMG-2: relative paths, '..', paths outside the roots (also via a symlink or a name that
    merely shares the root's prefix) are InvalidRequest."""
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    (tmp_path / "root-evil").mkdir()
    path = {
        "relative": "root/img",
        "dotdot": f"{root}/../outside",
        "outside": str(outside),
        "symlink": f"{root}/escape",
        "prefix": f"{tmp_path}/root-evil",
        "noroots": f"{root}/img",
    }[make]
    roots = [] if make == "noroots" else [str(root)]
    with pytest.raises(InvalidRequest) as ei:
        check_local(parse(f"oci-archive:{path}"), roots)
    assert ei.value.details["field"] == "image"
