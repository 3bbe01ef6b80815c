"""The unpacked-tree cache (agent/image/chains.py): images built on a cached base reuse its
tree through overlayfs, and the ext4 is byte-identical to a build with nothing cached
(IMG-12, IMG-13, IMG-20); the cached tree is never changed; no mount outlives a build."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.catalog import Catalog
from agent.config import load_config
from agent.image.chains import chain_ids, overlay
from agent.image.service import ImageService
from tests import oci, treecmp
from tests.layers import Dir, File, Hardlink, Opaque, Symlink, Whiteout, layer
from tests.registry import Registry


class Agent:
    def __init__(self, state: Path, registry: Registry, *extra: str) -> None:
        state.mkdir(parents=True)
        self.state = state
        cfg = load_config(None, [f"agent.state_dir={state}", f'image.insecure_registries=["{registry.host}"]',
                                 *extra])
        self.catalog = Catalog.open(str(state))
        self.service = ImageService(cfg, self.catalog)

    def build(self, ref: str, n: int, writable: int = 0) -> dict[str, Any]:
        return self.service.build(f"art-{n:024x}", ref, writable=writable)

    @property
    def chains(self) -> Path:
        return self.state / "store" / "chains"


@pytest.fixture
def agents(tmp_path: Path) -> Callable[..., Agent]:
    made: list[Agent] = []

    def make(name: str, registry: Registry, *extra: str) -> Agent:
        a = Agent(tmp_path / name, registry, *extra)
        made.append(a)
        return a

    yield make
    for a in made:
        a.catalog.close()


def mounts_under(path: Path) -> list[str]:
    real = os.path.realpath(path)
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(real)]


BASE = [
    layer([Dir("etc"), File("etc/keep", b"k"), File("etc/gone", b"g"), Dir("etc/deep"), Dir("etc/deep/er"),
           File("etc/deep/er/f", b"f"), Dir("opq"), File("opq/old", b"o"), Dir("owned", mode=0o755),
           File("data", b"1" * 5000), Hardlink("data-link", "data"), File("suid", b"s", mode=0o4755),
           Symlink("lnk", "etc/keep")]),
    layer([File("etc/second", b"2", xattrs={"user.x": b"y"})]),
]
TOP = layer([
    File("etc/deep/er/new", b"n"), Whiteout("etc/gone"), Opaque("opq"), File("opq/new", b"n"),
    Dir("owned", mode=0o700, uid=42, gid=43), File("etc/keep", b"replaced"), Hardlink("third-link", "data"),
    Dir("fresh"), File("fresh/a", b"a", xattrs={"user.a": b"1", "user.b": b"2"}), Symlink("fresh/l", "/etc/keep"),
])


def test_derived_image_over_a_cached_tree_is_byte_identical_and_the_tree_unchanged(
        registry_factory: Callable[..., Registry], agents: Callable[..., Agent]) -> None:
    reg = registry_factory("none", front=True)
    base = oci.image(BASE)
    derived = oci.image([*BASE, TOP], created="2024-02-02T00:00:00Z")
    reg.push("t/base", "1", base)
    reg.push("t/derived", "1", derived)
    warm = agents("warm", reg)
    warm.build(f"{reg.host}/t/base:1", 1)
    cached = warm.chains / chain_ids(base.diff_ids)[-1].split(":")[1] / "root"
    assert cached.is_dir()
    before = treecmp.snapshot(cached)

    base_blob_gets = reg.count(r"/blobs/" + base.layers[0].digest)
    got = warm.build(f"{reg.host}/t/derived:1", 2)
    assert reg.count(r"/blobs/" + base.layers[0].digest) == base_blob_gets  # not needed, not fetched
    assert treecmp.diff(before, treecmp.snapshot(cached)) == []
    assert mounts_under(warm.state) == []

    cold = agents("cold", reg)
    old = os.umask(0o022)  # the warm agent ran under the suite's umask; this one under another
    try:
        os.umask(0o077 if old != 0o077 else 0o022)
        want = cold.build(f"{reg.host}/t/derived:1", 2)
    finally:
        os.umask(old)
    assert got["sha256"] == want["sha256"], "a cached base changed the image bytes (IMG-20)"
    assert (warm.state / "store/artifacts" / f"art-{2:024x}" / "rootfs.ext4").read_bytes() == \
        (cold.state / "store/artifacts" / f"art-{2:024x}" / "rootfs.ext4").read_bytes()

    # The same image with another writable size: the whole tree is cached, nothing unpacked.
    again = warm.build(f"{reg.host}/t/base:1", 3, writable=8 << 20)
    fresh = cold.build(f"{reg.host}/t/base:1", 3, writable=8 << 20)
    assert again["sha256"] == fresh["sha256"]
    assert again["timings"].get("UNPACKING", 0) < 1.0


def test_tree_cache_keeps_the_configured_number_and_can_be_off(registry_factory: Callable[..., Registry],
                                                               agents: Callable[..., Agent]) -> None:
    reg = registry_factory("none")
    refs = []
    for i in range(3):
        reg.push(f"t/img{i}", "1", oci.image([layer([File(f"f{i}", bytes([i]) * 10)])]))
        refs.append(f"{reg.host}/t/img{i}:1")
    one = agents("one", reg, "build.tree_cache=1")
    for i, ref in enumerate(refs):
        one.build(ref, 10 + i)
    assert len([p for p in one.chains.iterdir()]) == 1
    off = agents("off", reg, "build.tree_cache=0")
    off.build(refs[0], 20)
    assert list(off.chains.iterdir()) == []
    assert list((off.state / "store" / "work").iterdir()) == []


def test_recover_unmounts_a_leftover_overlay_before_removing_it(tmp_path: Path, registry_factory: Callable[..., Registry],
                                                                agents: Callable[..., Agent]) -> None:
    """A crash mid-build can leave an overlay mounted in work/; start-up unmounts it first, so
    removing the scratch never reaches through into the cached tree."""
    reg = registry_factory("none")
    a = agents("a", reg)
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "precious").write_text("keep")
    scratch = a.state / "store" / "work" / ("art-" + "9" * 24) / "try1"
    scratch.mkdir(parents=True)
    cm = overlay(lower, scratch)
    merged, _ = cm.__enter__()  # "crash": never exited
    assert (merged / "precious").exists() and mounts_under(a.state)
    a.service.recover()
    assert mounts_under(a.state) == []
    assert (lower / "precious").read_text() == "keep"
    assert list((a.state / "store" / "work").iterdir()) == []
    subprocess.run(["true"])  # the abandoned context manager holds nothing else
