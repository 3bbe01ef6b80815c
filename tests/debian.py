"""A real-world image: Debian bookworm minbase (debootstrap), as a 3-layer OCI layout.

    layer 1  the minbase root file system without the files of one package (``hostname``)
    layer 2  that package's files
    layer 3  whiteouts deleting /usr/share/doc

debootstrap takes ~25 s and needs the Debian mirror, so the root tarball and the OCI layout
are cached between runs under ``$TC_TEST_CACHE`` (default ``~/.cache/templatecenter``);
delete the directory to rebuild. The layers are GNU tar (pax format, numeric owners, xattrs),
so the reference tree a test compares with is a plain GNU tar extraction.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

CACHE_VERSION = "v2"
SUITE = "bookworm"
PACKAGE = "hostname"          # the files of layer 2
DELETED = "usr/share/doc"     # what layer 3 whites out
TAG = "bookworm"
TAR_FLAGS = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--format=pax",
             "--pax-option=delete=atime,delete=ctime"]


def cache_dir() -> Path:
    path = Path(os.environ.get("TC_TEST_CACHE", "~/.cache/templatecenter")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


class _Lock:
    """One builder at a time (parallel test runs share the cache)."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "w")

    def __enter__(self) -> None:
        fcntl.flock(self._fh, fcntl.LOCK_EX)

    def __exit__(self, *_: object) -> None:
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


def rootfs_tarball() -> Path:
    """The minbase root as one tar (debootstrap once, then cached)."""
    cache = cache_dir()
    tar = cache / f"debian-{SUITE}-minbase-{CACHE_VERSION}.tar"
    with _Lock(cache / ".debian.lock"):
        if tar.exists():
            return tar
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            root = Path(tmp) / "root"
            mirror = os.environ.get("TC_DEBIAN_MIRROR", "http://deb.debian.org/debian")
            subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(root), mirror], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=900)
            for deb in (root / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
            subprocess.run(["tar", *TAR_FLAGS, "--sort=name", "-C", str(root), "-cf", str(tar) + ".part", "."],
                           check=True, timeout=300)
            os.rename(str(tar) + ".part", tar)
    return tar


def extract(tarball: Path, dest: Path) -> Path:
    """GNU tar extraction with everything kept: the reference for comparisons."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--same-owner", "-xpf",
                    str(tarball), "-C", str(dest)], check=True, timeout=300)
    return dest


def reference_tree(dest: Path) -> Path:
    """What the 3-layer image must unpack to: the root with /usr/share/doc removed (and
    /usr/share's mtime as the layers left it: a whiteout does not touch its parent's times)."""
    extract(rootfs_tarball(), dest)
    parent = dest / os.path.dirname(DELETED)
    st = os.stat(parent)
    shutil.rmtree(dest / DELETED)
    os.utime(parent, ns=(st.st_atime_ns, st.st_mtime_ns))
    return dest


def _package_files(root: Path) -> list[str]:
    listed = (root / f"var/lib/dpkg/info/{PACKAGE}.list").read_text().split("\n")
    out = set()
    real_root = os.path.realpath(root)
    for line in listed:
        rel = line.strip().lstrip("/")
        if not rel:
            continue
        # Merged /usr: dpkg lists /bin/hostname, the file is usr/bin/hostname. Resolve the
        # parent directories (not the name itself) so layer 1 and layer 2 never overlap.
        parent = os.path.realpath(os.path.join(root, os.path.dirname(rel)))
        path = os.path.join(parent, os.path.basename(rel))
        if os.path.islink(path) or os.path.isfile(path):
            out.add(os.path.relpath(path, real_root))
    return sorted(out)


def _tar_list(root: Path, names: list[str], out: Path) -> bytes:
    listing = out.with_suffix(".list")
    listing.write_text("".join("./\n" if n == "." else f"./{n}\n" for n in names))
    subprocess.run(["tar", *TAR_FLAGS, "--no-recursion", "-C", str(root), "-cf", str(out), "-T", str(listing)],
                   check=True, timeout=300)
    return out.read_bytes()


def layers() -> list[bytes]:
    """The three uncompressed layer tars."""
    from tests.layers import Whiteout, layer
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        root = extract(rootfs_tarball(), Path(tmp) / "root")
        pkg = _package_files(root)
        assert pkg, f"package {PACKAGE} has no files in the minbase root"
        everything = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            rel = "" if rel == "." else rel
            everything += [os.path.join(rel, n) for n in sorted(dirnames + filenames)]
        skip = set(pkg)
        base = ["."] + [n for n in sorted(everything) if n not in skip]  # "." carries the root's metadata
        l1 = _tar_list(root, base, Path(tmp) / "l1.tar")
        l2 = _tar_list(root, pkg, Path(tmp) / "l2.tar")
    parent, name = os.path.split(DELETED)
    l3 = layer([Whiteout(os.path.join(parent, name))])
    return [l1, l2, l3]


def oci_layout() -> Path:
    """The cached OCI layout (tag ``bookworm``) of the 3-layer image."""
    from tests import oci
    cache = cache_dir()
    layout = cache / f"debian-{SUITE}-oci-{CACHE_VERSION}"
    with _Lock(cache / ".debian-oci.lock"):
        if (layout / "index.json").exists():
            return layout
        img = oci.image(layers(), compression="gzip",
                        config={"Cmd": ["/bin/bash"], "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
                        created="2024-06-01T00:00:00Z")
        part = layout.with_name(layout.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        oci.write_layout(part, img, tag=TAG)
        os.rename(part, layout)
    return layout


def pushable(layout: Path | None = None) -> Any:
    """The cached layout as something ``tests.registry.Registry.push`` takes (blobs + manifest)."""
    import json
    from types import SimpleNamespace

    from tests import oci
    layout = layout or oci_layout()
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == TAG)

    def blob(digest: str) -> bytes:
        return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()

    manifest = blob(desc["digest"])
    doc = json.loads(manifest)
    blobs = {d["digest"]: oci.Blob(d["mediaType"], blob(d["digest"])) for d in [doc["config"], *doc["layers"]]}
    return SimpleNamespace(blobs=blobs, manifest=manifest, manifest_digest=desc["digest"],
                           manifest_media_type=desc["mediaType"])
