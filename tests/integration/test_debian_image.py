"""A real-world image end to end (issue 4): Debian bookworm minbase from debootstrap as three
layers (the base, one package's files, whiteouts deleting /usr/share/doc), pushed to the
loopback registry, pulled and built by the agent's image service. The ext4 must pass
``e2fsck -fn`` and, loop-mounted read-only, match a GNU tar extraction of the same root in
every piece of metadata (IMG-12, IMG-13, IMG-18, IMG-19)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent.catalog import Catalog
from agent.config import load_config
from agent.image.service import ImageService
from agent.image.store import ROOTFS
from tests import debian, treecmp
from tests.registry import Registry

ART = "art-" + "d" * 24

pytestmark = pytest.mark.skipif(shutil.which("debootstrap") is None,
                                reason="debootstrap is not installed (the Makefile installs it)")


@pytest.fixture
def mounted(tmp_path: Path):
    mounts: list[Path] = []

    def mount(image: Path) -> Path:
        point = tmp_path / f"mnt{len(mounts)}"
        point.mkdir()
        subprocess.run(["mount", "-o", "loop,ro", str(image), str(point)], check=True, capture_output=True)
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-d", str(point)], check=False, capture_output=True)


def test_debian_minbase_pulled_and_built_matches_the_gnu_tar_tree(registry: Registry, tmp_path: Path,
                                                                   mounted) -> None:
    image = debian.pushable()
    registry.push("debian/minbase", debian.TAG, image)
    state = tmp_path / "agent"
    state.mkdir()
    cfg = load_config(None, [f"agent.state_dir={state}", f"image.insecure_registries=[\"{registry.host}\"]"])
    catalog = Catalog.open(str(state))
    try:
        body = ImageService(cfg, catalog).build(ART, f"{registry.host}/debian/minbase:{debian.TAG}",
                                                writable=256 << 20)
    finally:
        catalog.close()
    assert body["manifest_digest"] == image.manifest_digest and len(body["layers"]) == 3
    rootfs = state / "store" / "artifacts" / ART / ROOTFS
    fsck = subprocess.run(["e2fsck", "-fn", str(rootfs)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    reference = debian.reference_tree(tmp_path / "reference")
    expected = treecmp.snapshot(reference)
    actual = treecmp.snapshot(mounted(rootfs), skip=("lost+found",))
    assert len(expected) > 5000
    assert "usr/share/doc" not in actual and "usr/bin/hostname" in actual
    assert treecmp.diff(expected, actual) == []
