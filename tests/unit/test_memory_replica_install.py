"""INSTALL_MEMORY_REPLICA (agent/runtime/memstate.py) on real files and a real catalog, without
a VM: the fetched rootfs and memstate artifacts become the template's memory snapshot in the
layout RT-11's restore reads (DIST-8, TPL-24, COMPAT-1, COMPAT-7, CAT-8)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.catalog import Catalog
from agent.config import load_config
from agent.runtime.sandboxes import SandboxService
from agent.tasks import TaskContext
from protocol.errors import InvalidRequest, ReplicaIncompatible

PINS = {"guest_image": "6.1+abc", "agent": "0.1.0", "hypervisor": "7.2.22", "host_kernel": "6.1.0"}
FACTS = {"accelerator": "tcg", "cpu_flags_hash": "f" * 16}
TPL, ROOTFS_ID, MEM_ID = "tpl-" + "1" * 24, "art-" + "2" * 24, "art-" + "3" * 24
ORIGIN_META = {"vcpus": 1, "memory_mib": 128, "accel": "tcg", "kernel": "/origin/vmlinuz",
               "initramfs": "/origin/initramfs.img", "append": "console=hvc0"}


@dataclass
class Image:
    kernel: str
    initramfs: str


class StubDriver:
    """A runtime that is never driven: installing a replica touches files only."""
    name, sandbox = "stub", True
    image = Image("/here/vmlinuz", "/here/initramfs.img")


def service(tmp_path: Path) -> SandboxService:
    c = load_config(None, [f"agent.state_dir={tmp_path}", "security.curve=false", "agent.node_id=n1",
                           "runtime.driver=none"])
    return SandboxService(c, Catalog.open(str(tmp_path)), StubDriver(), lambda: dict(PINS),  # type: ignore[arg-type]
                          lambda: dict(FACTS))


def artifact(svc: SandboxService, aid: str, files: dict[str, bytes]) -> None:
    """A verified artifact as FETCH_ARTIFACT leaves it: files, then the entry (CAT-8)."""
    d = svc.artifact_root / aid
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    svc.catalog.put("artifact", aid, {"state": "verified", "sha256": "x" * 64, "size": 1,
                                      "files": [{"name": n, "size": len(b), "sha256": "y" * 64}
                                                for n, b in files.items()]})


def test_install_makes_the_restore_layout_pinned_to_the_origin(tmp_path: Path) -> None:
    """DIST-8, TPL-24, COMPAT-1, CAT-8: the replica dir holds state.mig, memory.img, config.img
    from the memstate and disk.raw = the rootfs export's bytes; meta.json keeps the origin's
    snapshot fields with this node's kernel and initramfs, while the artifact's own meta.json is
    untouched; the `replica` entry (memory, the origin's pins and facts, both artifact ids) comes
    after the files; a re-sent task returns the same result; REMOVE of the rootfs artifact's
    file leaves the replica's disk whole (links, not references)."""
    svc = service(tmp_path)
    h = svc.handlers()
    artifact(svc, ROOTFS_ID, {"rootfs.ext4": b"ext4-bytes"})
    artifact(svc, MEM_ID, {"config.img": b"cfg", "memory.img": b"mem", "meta.json": json.dumps(ORIGIN_META).encode(),
                           "state.mig": b"state"})
    args: dict[str, Any] = {"template_id": TPL, "artifact_id": ROOTFS_ID, "memstate_artifact_id": MEM_ID,
                            "pins": PINS, "facts": FACTS}
    res = h["INSTALL_MEMORY_REPLICA"](TaskContext("tsk-1", "INSTALL_MEMORY_REPLICA", args, lambda _: None))
    assert res == {"template_id": TPL, "has_memory_snapshot": True, "pins": PINS, "facts": FACTS,
                   "memstate_artifact_id": MEM_ID}
    d = svc.replica_root / TPL
    assert sorted(p.name for p in d.iterdir()) == ["config.img", "disk.raw", "memory.img", "meta.json", "state.mig"]
    assert (d / "disk.raw").read_bytes() == b"ext4-bytes" and (d / "state.mig").read_bytes() == b"state"
    meta = json.loads((d / "meta.json").read_text())
    assert meta == {**ORIGIN_META, "kernel": "/here/vmlinuz", "initramfs": "/here/initramfs.img"}
    assert json.loads((svc.artifact_root / MEM_ID / "meta.json").read_text()) == ORIGIN_META
    body = svc.catalog.get("replica", TPL)["body"]
    assert (body["memory"], body["pins"], body["facts"], body["artifact_id"], body["memstate_artifact_id"]) == \
        (True, PINS, FACTS, ROOTFS_ID, MEM_ID)
    assert body["memory_mib"] == 128 and {f["name"] for f in body["files"]} == {p.name for p in d.iterdir()}
    again = h["INSTALL_MEMORY_REPLICA"](TaskContext("tsk-2", "INSTALL_MEMORY_REPLICA", args, lambda _: None))
    assert again == res
    (svc.artifact_root / ROOTFS_ID / "rootfs.ext4").unlink()
    assert (d / "disk.raw").read_bytes() == b"ext4-bytes"


def test_install_refusals_write_nothing(tmp_path: Path) -> None:
    """COMPAT-7 (checked at install too), §1: origin pins or facts other than the node's →
    ReplicaIncompatible naming them; a missing artifact or file, malformed ids or pins →
    InvalidRequest naming the field; no replica dir or entry is left behind."""
    svc = service(tmp_path)
    h = svc.handlers()
    artifact(svc, ROOTFS_ID, {"rootfs.ext4": b"ext4"})
    artifact(svc, MEM_ID, {"config.img": b"c", "memory.img": b"m", "meta.json": b"{}"})  # no state.mig

    def run(**over: Any) -> Any:
        args = {"template_id": TPL, "artifact_id": ROOTFS_ID, "memstate_artifact_id": MEM_ID, "pins": PINS,
                "facts": FACTS, **over}
        return h["INSTALL_MEMORY_REPLICA"](TaskContext("tsk-1", "INSTALL_MEMORY_REPLICA", args, lambda _: None))

    with pytest.raises(ReplicaIncompatible, match="guest_image"):
        run(pins={**PINS, "guest_image": "other"})
    with pytest.raises(ReplicaIncompatible, match="cpu_flags_hash"):
        run(facts={**FACTS, "cpu_flags_hash": "0" * 16})
    with pytest.raises(InvalidRequest, match="state.mig"):
        run()
    with pytest.raises(InvalidRequest, match="no verified copy"):
        run(memstate_artifact_id="art-" + "4" * 24)
    for field, bad in (("template_id", "tpl-x"), ("artifact_id", None), ("pins", {"agent": "1"}),
                       ("facts", "tcg"), ("pins", {**PINS, "agent": 5})):
        with pytest.raises(InvalidRequest) as err:
            run(**{field: bad})
        assert err.value.details["field"] == field
    assert svc.catalog.get("replica", TPL) is None
    assert not svc.replica_root.exists() or not any(svc.replica_root.iterdir())
