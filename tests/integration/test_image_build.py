"""BUILD_ARTIFACT and RESOLVE_IMAGE end to end (issue 4): images pushed to a real
`docker-registry` on loopback (or written as local layouts), pulled, cached, unpacked and
built into ext4 by the agent's image service, with no coordinator. The ext4 is read back with
debugfs; nothing is mounted here."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.catalog import TASK_KIND, Catalog
from agent.config import AgentConfig, load_config
from agent.image.service import ARTIFACT_KIND, BuildProgress, ImageService
from agent.image.store import CONFIG, ROOTFS
from agent.tasks import TaskRunner
from protocol.messages import Task, TaskCancel, TaskProgress, TaskResult
from protocol.errors import (ImageDigestMismatch, ImageInvalid, ImageLimitExceeded,
                             ImageNotFound, InvalidRequest, TCError)
from tests import oci
from tests.debugfs import Image as Ext4Image
from tests.layers import (Block, Char, Dir, Fifo, File, Hardlink, Opaque, Symlink, Whiteout, layer)
from tests.registry import Registry

ART = "art-" + "1" * 24
ART2 = "art-" + "2" * 24
PASSWORD = "s3cret-Pa55word-never-logged"
MIB = 1 << 20


def make_cfg(state: Path, registry: Registry | None = None, *extra: str) -> AgentConfig:
    sets = [f"agent.state_dir={state}", f"image.local_roots=[\"{state.parent}\"]", "build.default_writable=0"]
    if registry is not None:
        sets.append(f"image.insecure_registries=[\"{registry.host}\"]")
    return load_config(None, [*sets, *extra])


class Agentlet:
    """The image half of one agent: its own state dir, catalog and service."""

    def __init__(self, state: Path, registry: Registry | None = None, *extra: str) -> None:
        state.mkdir(parents=True, exist_ok=True)
        self.cfg = make_cfg(state, registry, *extra)
        self.catalog = Catalog.open(str(state))
        self.service = ImageService(self.cfg, self.catalog)
        self.state = state

    def build(self, image: str, artifact: str = ART, **kw: Any) -> dict[str, Any]:
        kw.setdefault("writable", 0)
        return self.service.build(artifact, image, **kw)

    def rootfs(self, artifact: str = ART) -> Path:
        return self.service.store.artifact_dir(artifact) / ROOTFS

    def close(self) -> None:
        self.catalog.close()


@pytest.fixture
def agentlets(tmp_path: Path) -> Callable[..., Agentlet]:
    made: list[Agentlet] = []

    def make(name: str = "agent", registry: Registry | None = None, *extra: str) -> Agentlet:
        a = Agentlet(tmp_path / name, registry, *extra)
        made.append(a)
        return a

    yield make
    for a in made:
        a.close()


# --- images ------------------------------------------------------------------------------

def feature_image() -> oci.BuiltImage:
    """Every layer feature the unpacker must keep (IMG-12, IMG-13)."""
    l1 = layer([
        Dir("etc"), File("etc/os-release", b"ID=tc\n"),
        Dir("data"), File("data/gone.txt", b"x\n"), File("data/hl1", b"h\n"),
        Hardlink("data/hl2", "data/hl1"),
        File("data/owned", b"o\n", mode=0o4750, uid=1234, gid=5678, xattrs={"user.test": b"hello"}),
        Dir("tmp", mode=0o1777), Dir("dev"), Char("dev/null", 1, 3, mode=0o666), Block("dev/loopX", 7, 200),
        Fifo("data/fifo"), Symlink("bin", "usr/bin"), Dir("usr"), Dir("usr/bin"),
        Symlink("data/long", "/" + "x" * 80),
        Dir("opq"), File("opq/a", b"a\n"),
    ])
    l2 = layer([Whiteout("data/gone.txt"), Opaque("opq"), File("opq/c", b"c\n")])
    l3 = layer([File("usr/bin/tool", b"#!/bin/sh\n", mode=0o755)])
    return oci.image([l1, l2, l3], compression=["gzip", "zstd", "none"],
                     config={"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "true"], "Env": ["A=1"],
                             "WorkingDir": "/data", "User": "1234", "ExposedPorts": {"80/tcp": {}},
                             "Labels": {"b": "2", "a": "1"}})


def push(registry: Registry, img: Any, repo: str = "test/features", tag: str = "v1") -> str:
    registry.push(repo, tag, img, auth=registry.credentials if registry.mode != "none" else None)
    return f"{registry.host}/{repo}:{tag}"


# --- tests -----------------------------------------------------------------------------------

def test_features_survive_registry_pull_unpack_and_ext4(registry: Registry, agentlets: Callable[..., Agentlet]) -> None:
    """IMG-9, IMG-12, IMG-13, IMG-18, IMG-19, IMG-21: the built ext4 holds every feature, the
    artifact and its layers are in the catalog, the config is normalised, work/ is empty."""
    img = feature_image()
    ref = push(registry, img)
    a = agentlets("agent", registry)
    phases: list[str] = []
    body = a.build(ref, progress=BuildProgress(lambda p: phases.append(p["phase"])))
    assert body["manifest_digest"] == img.manifest_digest
    assert [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p] == \
        ["PULLING", "UNPACKING", "BUILDING_EXT4", "GENERATING_JSON"]
    fs = Ext4Image(a.rootfs())
    owned = fs.stat("/data/owned")
    assert (owned["uid"], owned["gid"], owned["mode"] & 0o7777) == (1234, 5678, 0o4750)
    assert fs.xattrs("/data/owned").get("user.test") == b"hello"
    assert fs.stat("/tmp")["mode"] & 0o7777 == 0o1777
    assert fs.stat("/data/hl1")["links"] == 2 and fs.stat("/data/hl1")["ino"] == fs.stat("/data/hl2")["ino"]
    assert (fs.stat("/dev/null")["major"], fs.stat("/dev/null")["minor"]) == (1, 3)
    assert (fs.stat("/dev/loopX")["major"], fs.stat("/dev/loopX")["minor"]) == (7, 200)
    assert fs.stat("/data/fifo")["type"] == "fifo"
    assert fs.stat("/bin")["target"] == "usr/bin"
    assert fs.stat("/data/long")["target"] == "/" + "x" * 80
    names = fs.ls("/opq")
    assert "c" in names and "a" not in names and not any(n.startswith(".wh.") for n in names)
    assert "gone.txt" not in fs.ls("/data")
    assert fs.stat("/usr/bin/tool")["mode"] & 0o777 == 0o755
    subprocess.run(["e2fsck", "-fn", str(a.rootfs())], check=True, capture_output=True)

    entry = a.catalog.get(ARTIFACT_KIND, ART)["body"]
    assert entry["sha256"] == body["sha256"] and entry["state"] == "verified"
    st = os.stat(a.rootfs())
    assert st.st_size == entry["size"] and st.st_blocks * 512 < st.st_size  # sparse (IMG-19)
    config = json.loads((a.rootfs().parent / CONFIG).read_text())
    assert config == {"entrypoint": ["/bin/sh"], "cmd": ["-c", "true"], "env": ["A=1"], "workdir": "/data",
                      "user": "1234", "exposed_ports": ["80/tcp"], "labels": {"a": "1", "b": "2"}}
    layers = {e["id"] for e in a.catalog.entries("layer")}
    assert layers == {b.digest for b in img.layers}
    assert list((a.state / "store" / "work").iterdir()) == []


def test_layer_cache_serves_shared_layers_and_a_rebuild_is_a_no_op(registry_factory: Callable[..., Registry],
                                                                   agentlets: Callable[..., Agentlet]) -> None:
    """IMG-9: a derived image sharing the base layers downloads only its new layer; WIRE-14:
    rebuilding an existing artifact returns it without pulling a layer."""
    registry = registry_factory("none", front=True)  # the front counts requests
    base = [layer([Dir("etc"), File("etc/base", b"b" * 5000)]), layer([File("etc/two", b"2")])]
    img1 = oci.image(base)
    img2 = oci.image([*base, layer([File("etc/three", b"3")])])
    ref1 = push(registry, img1, "test/base", "1")
    ref2 = push(registry, img2, "test/derived", "1")
    a = agentlets("agent", registry)
    a.build(ref1)
    blob_gets = registry.count(r"/blobs/sha256:", method="GET")
    a.build(ref2, ART2)
    new_gets = registry.count(r"/blobs/sha256:", method="GET") - blob_gets
    assert new_gets == 2  # the config and the one new layer
    again = registry.count(r"/blobs/sha256:", method="GET")
    a.build(ref2, ART2)
    assert registry.count(r"/blobs/sha256:", method="GET") - again <= 1  # at most the config


def test_reproducible_in_different_agent_state_dirs(registry: Registry, agentlets: Callable[..., Agentlet]) -> None:
    """IMG-20: the same image built by two agents (other state dirs, other times) is byte-identical."""
    ref = push(registry, feature_image())
    one, two = agentlets("one", registry), agentlets("two", registry)
    r1 = one.build(ref)
    os.utime(two.state, (1, 1))  # a different host state does not matter
    r2 = two.build(ref)
    assert r1["sha256"] == r2["sha256"] and r1["fingerprint"] == r2["fingerprint"]
    assert one.rootfs().read_bytes() == two.rootfs().read_bytes()


@pytest.mark.parametrize("mode", ["none", "basic", "bearer"])
def test_auth_modes_and_credentials_never_leak(mode: str, registry_factory: Callable[..., Registry],
                                               agentlets: Callable[..., Agentlet], tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """IMG-3, IMG-4: anonymous, basic and bearer pulls build; wrong credentials → ImageAuthFailed;
    the password is in no log line, result, error, catalog entry or task record."""
    caplog.set_level(logging.DEBUG)
    users = {"puller": PASSWORD} if mode != "none" else None
    reg = registry_factory(mode, users=users) if users else registry_factory(mode)
    ref = f"{reg.host}/test/auth:1"
    reg.push("test/auth", "1", oci.image([layer([File("f", b"auth")])]),
             auth=("puller", PASSWORD) if users else None)
    a = agentlets("agent", reg)
    creds = {"username": "puller", "password": PASSWORD} if users else None
    runner = TaskRunner(a.catalog, a.service.handlers())

    async def run(op: str, args: dict[str, Any], task_id: str) -> Any:
        return await runner.run(op, args, task_id)

    args = {"artifact_id": ART, "image": ref, "writable_size": 0}
    if creds:
        args["credentials"] = creds
    ok = asyncio.run(run("BUILD_ARTIFACT", args, "tsk-" + "1" * 24))
    assert ok.ok, ok.error
    resolved = asyncio.run(run("RESOLVE_IMAGE", {k: v for k, v in args.items() if k in ("image", "credentials")},
                               "tsk-" + "2" * 24))
    assert resolved.ok and resolved.result["manifest_digest"] == ok.result["manifest_digest"]
    outputs = [json.dumps(ok.to_body() if hasattr(ok, "to_body") else ok.result),
               json.dumps(resolved.result)]
    if users:
        bad = asyncio.run(run("BUILD_ARTIFACT", {**args, "artifact_id": ART2,
                                                 "credentials": {"username": "puller", "password": "wrong-" + PASSWORD}},
                              "tsk-" + "3" * 24))
        assert not bad.ok and bad.error["name"] == "ImageAuthFailed", bad.error
        none = asyncio.run(run("RESOLVE_IMAGE", {"image": ref}, "tsk-" + "4" * 24))
        assert not none.ok and none.error["name"] == "ImageAuthFailed", none.error
        outputs += [json.dumps(bad.error), json.dumps(none.error)]
    records = json.dumps(a.catalog.entries())
    assert a.catalog.entries(TASK_KIND)
    state_files = [f.read_bytes().decode("latin-1") for f in a.state.glob("catalog.db*")]
    for text in (*outputs, records, caplog.text, reg.log_text(), *state_files):
        assert PASSWORD not in text


def test_local_sources_build_the_same_artifact(agentlets: Callable[..., Agentlet], tmp_path: Path,
                                               registry: Registry) -> None:
    """IMG-1, IMG-2: oci:, oci-archive: and docker-archive: sources under image.local_roots give
    the same ext4 as the registry (same manifest → same fingerprint → same sha256)."""
    img = feature_image()
    a = agentlets("agent", registry)
    root = a.state.parent
    oci.write_layout(root / "layout", img, tag="v1")
    oci.write_oci_archive(root / "image.oci.tar", img, tag="v1")
    from_registry = a.build(push(registry, img), "art-" + "a" * 24)
    from_layout = a.build(f"oci:{root / 'layout'}:v1", "art-" + "b" * 24)
    from_archive = a.build(f"oci-archive:{root / 'image.oci.tar'}:v1", "art-" + "c" * 24)
    assert from_registry["sha256"] == from_layout["sha256"] == from_archive["sha256"]
    with pytest.raises(InvalidRequest):
        a.build("oci:/etc:v1", "art-" + "d" * 24)  # outside image.local_roots


def test_hostile_images_fail_with_the_spec_error_and_leave_nothing(registry: Registry,
                                                                   agentlets: Callable[..., Agentlet],
                                                                   tmp_path: Path) -> None:
    """IMG-7, IMG-8, IMG-14, IMG-16: wrong diff_id, a zstd layer claiming gzip, an escape, a tar
    bomb: each gives its SPEC error, the sentinel outside the root is untouched, work/ is empty."""
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep").write_text("keep")
    good = layer([File("f", b"data")])
    cases: list[tuple[str, Any, type[TCError]]] = [
        ("diffid", oci.image([good], diff_ids=["sha256:" + "0" * 64]), ImageDigestMismatch),
        ("zstd-as-gzip", oci.image([good], compression="zstd",
                                    layer_media_types=["application/vnd.oci.image.layer.v1.tar+gzip"]), ImageInvalid),
        ("foreign", oci.image([good], layer_media_types=[
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"]), ImageInvalid),
        ("escape", oci.image([layer([Symlink("evil", str(sentinel)), File("evil/pwned", b"x")])]), None),
        ("bomb", oci.image([layer([File(f"f{i}", b"") for i in range(50)])]), ImageLimitExceeded),
    ]
    a = agentlets("agent", registry, "unpack.max_entries=20")
    for n, (name, img, error) in enumerate(cases):
        ref = push(registry, img, f"test/{name}", "1")
        art = f"art-{n:024x}"
        if error is None:  # the escape is contained: the link points inside the root
            a.build(ref, art)
            assert "evil" in Ext4Image(a.rootfs(art)).ls("/")
        else:
            with pytest.raises(error):
                a.build(ref, art)
            assert a.catalog.get(ARTIFACT_KIND, art) is None
        assert sorted(p.name for p in sentinel.iterdir()) == ["keep"]
        assert list((a.state / "store" / "work").iterdir()) == []


def test_missing_tag_is_image_not_found(registry: Registry, agentlets: Callable[..., Agentlet]) -> None:
    """IMG-1, IMG-11: resolving a tag that is not there → ImageNotFound."""
    a = agentlets("agent", registry)
    with pytest.raises(ImageNotFound):
        a.build(f"{registry.host}/test/nothing:here")


def test_recover_removes_interrupted_build_scratch(agentlets: Callable[..., Agentlet]) -> None:
    """IMG-21, CAT-3: scratch of a build a crash interrupted, and half-written layer downloads,
    are removed at start; cached layers and artifacts stay."""
    a = agentlets()
    store = a.service.store
    (store.work / ART / "abcd1234" / "root" / "etc").mkdir(parents=True)
    (store.layers / "tmp").mkdir(exist_ok=True)
    (store.layers / "tmp" / "partial.download").write_bytes(b"x" * 100)
    (store.artifacts / ART).mkdir()
    removed = a.service.recover()
    assert ART in removed[0] and "partial.download" in removed
    assert list(store.work.iterdir()) == [] and list((store.layers / "tmp").iterdir()) == []
    assert (store.artifacts / ART).is_dir()


def test_cancel_during_unpack_ends_with_job_cancelled_and_leaves_nothing(
        registry: Registry, agentlets: Callable[..., Agentlet]) -> None:
    """WIRE-12: TASK_CANCEL mid-unpack stops the build within a chunk; a TASK_RESULT JobCancelled
    follows; no artifact, no scratch (IMG-21)."""
    big = layer([File(f"zeros{i}", b"\0" * (64 << 20)) for i in range(4)])  # 256 MiB, tiny gzip
    ref = push(registry, oci.image([big]), "test/big", "1")
    a = agentlets("agent", registry)
    task_id = "tsk-" + "5" * 24

    async def main() -> TaskResult:
        runner = TaskRunner(a.catalog, a.service.handlers(), progress_interval=0.05)
        seen: list[Any] = []
        done = asyncio.Event()

        async def send(msg: Any) -> bool:
            seen.append(msg)
            if isinstance(msg, TaskProgress) and msg.progress["phase"] == "UNPACKING":
                await runner.on_cancel(TaskCancel(msg_id="c-1", task_id=task_id))
            if isinstance(msg, TaskResult):
                done.set()
            return True

        runner.attach(send)
        await runner.on_task(Task(
            msg_id="b-1", task_id=task_id, op="BUILD_ARTIFACT",
            args={"artifact_id": ART, "image": ref, "writable_size": 0}, deadline=0))
        await asyncio.wait_for(done.wait(), 120)
        return next(m for m in seen if isinstance(m, TaskResult))

    result = asyncio.run(main())
    assert not result.ok and result.error["name"] == "JobCancelled", result.error
    assert a.catalog.get(ARTIFACT_KIND, ART) is None
    assert list((a.state / "store" / "work").iterdir()) == []
