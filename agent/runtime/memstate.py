"""A commit's memory snapshot installed on another node (SPEC DIST-8, TPL-24, TPL-25, COMPAT-1,
COMPAT-7, CAT-8).

Task INSTALL_MEMORY_REPLICA ``{template_id, artifact_id, memstate_artifact_id, pins, facts}``:
the coordinator has fetched both artifacts here (FETCH_ARTIFACT, verified file by file) — the
``rootfs`` export and the ``memstate`` one (``config.img``, ``memory.img``, ``meta.json``,
``state.mig``; snapshots.MEMSTATE_FILES) — and this task turns them into the template's memory
snapshot on this node: ``<state_dir>/replicas/<template id>/`` in the layout the origin's
export and PREPARE_REPLICA leave (RT-12), so CREATE_SANDBOX ``restore: memory`` works
unchanged (RT-11).

**The frozen disk.** The origin's export is ``disks.standalone`` of the snapshot's frozen
``disk.raw`` — the same bytes — so the replica's ``disk.raw`` is the rootfs artifact's
``rootfs.ext4``. Files are hard links where the store allows (neither side is ever written
again: a sandbox's disk is a reflink clone or a qcow2 overlay over a pinned link, disks.layer),
else clones; removing either artifact later leaves the replica whole.

**meta.json** names the guest kernel and initramfs by path on the origin. The pins say the
guest image (sha256 of kernel ‖ initramfs, RT-6) is the same here, so the replica's meta.json is
rewritten with this node's paths — a new file, never the artifact's hard-linked one.

**Pins.** The entry pins the ORIGIN's versions and facts (``pins``, ``facts``: what the memory
was captured under, COMPAT-1), not this node's: CREATE_SANDBOX's COMPAT-7 check then compares
them with the node's at every restore — the safety net. The task itself refuses
(ReplicaIncompatible) when they differ already; the coordinator then leaves the node
rootfs-only (DIST-8). CAT-8: files first (``<tpl>.new``, fsync, rename), then the entry.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import ids
from protocol.errors import InvalidRequest

from ..catalog import ARTIFACT_KIND, REPLICA_KIND
from ..image.store import ROOTFS, fsync_dir, fsync_tree
from ..storage import check_writable
from ..tasks import TaskContext
from . import disks

if TYPE_CHECKING:
    from .sandboxes import SandboxService

log = logging.getLogger("memstate")

DISK = "disk.raw"


class MemoryReplicaInstaller:
    """INSTALL_MEMORY_REPLICA; shares the sandbox service's locks (the template's ``<tpl>_0``
    key, as PREPARE_REPLICA), so the two never build one replica at the same time."""

    def __init__(self, sandboxes: "SandboxService") -> None:
        self.sb = sandboxes

    def handlers(self) -> dict[str, Any]:
        return {"INSTALL_MEMORY_REPLICA": self.install_task}

    def install_task(self, ctx: TaskContext) -> dict[str, Any]:
        from .sandboxes import FACT_NAMES, PIN_NAMES
        from .snapshots import MEMSTATE_FILES
        self.sb._require()
        a = ctx.args
        tpl = _id("template", a.get("template_id"), "template_id", "tpl-<24 hex>")
        aid = _id("artifact", a.get("artifact_id"), "artifact_id", "art-<24 hex>")
        mid = _id("artifact", a.get("memstate_artifact_id"), "memstate_artifact_id", "art-<24 hex>")
        pins = _strings(a.get("pins"), "pins", PIN_NAMES)
        facts = _strings(a.get("facts"), "facts", FACT_NAMES)
        with self.sb._lock(f"{tpl}_0"):
            existing = self.sb.catalog.get(REPLICA_KIND, tpl)
            if existing is not None and (self.sb.replica_root / tpl).is_dir():
                b = existing["body"]
                if b.get("memory") and b.get("memstate_artifact_id") == mid and b.get("artifact_id") == aid:
                    return _result(tpl, b)  # a re-sent task: already installed
            # Refused before any file is written: the coordinator leaves this node rootfs-only.
            self.sb.check_compat(tpl, {"pins": pins, "facts": facts})
            disk = self._file(aid, ROOTFS)
            mem = {name: self._file(mid, name) for name in MEMSTATE_FILES}
            check_writable(self.sb.cfg, "memory replicas")
            root = self.sb.replica_root
            root.mkdir(parents=True, exist_ok=True)
            dest = root / f"{tpl}.new"
            shutil.rmtree(dest, ignore_errors=True)  # a leftover of an interrupted attempt
            try:
                dest.mkdir()
                for name, src in mem.items():
                    if name != "meta.json":
                        _link(src, dest / name)
                _link(disk, dest / DISK)
                meta = self._meta(mem["meta.json"])
                (dest / "meta.json").write_text(json.dumps(meta, sort_keys=True))
                fsync_tree(dest)
            except BaseException:
                shutil.rmtree(dest, ignore_errors=True)
                raise
            final, old = root / tpl, root / f"{tpl}.old"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.rename(final, old)
            os.rename(dest, final)
            fsync_dir(root)
            shutil.rmtree(old, ignore_errors=True)
            files = [{"name": p.name, "size": p.stat().st_size} for p in sorted(final.iterdir()) if p.is_file()]
            body = {"artifact_id": aid, "memstate_artifact_id": mid, "memory": True, "pins": pins, "facts": facts,
                    "files": files, "vcpus": meta.get("vcpus"), "memory_mib": meta.get("memory_mib"),
                    "source": {"memstate_artifact_id": mid}}
            self.sb.catalog.put(REPLICA_KIND, tpl, body)  # after the files (CAT-8)
            log.info("memory snapshot of %s installed from %s + %s", tpl, mid, aid)
            return _result(tpl, body)

    def _file(self, artifact: str, name: str) -> Path:
        """A file of a verified artifact held here, or InvalidRequest naming what is missing."""
        entry = self.sb.catalog.get(ARTIFACT_KIND, artifact)
        path = self.sb.artifact_root / artifact / name
        if entry is None or entry["body"].get("state") != "verified":
            raise InvalidRequest(f"artifact {artifact} has no verified copy on this node",
                                 {"field": "artifact_id", "artifact_id": artifact, "reason": "absent"})
        listed = {f.get("name"): f.get("size") for f in entry["body"].get("files") or [] if isinstance(f, dict)}
        if name not in listed or not path.is_file() or path.stat().st_size != listed[name]:
            raise InvalidRequest(f"artifact {artifact} on this node has no {name}",
                                 {"field": "artifact_id", "artifact_id": artifact, "reason": "file"})
        return path

    def _meta(self, path: Path) -> dict[str, Any]:
        """The origin's snapshot meta with this node's guest kernel and initramfs paths."""
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidRequest(f"the memstate's meta.json is unreadable: {exc}",
                                 {"field": "memstate_artifact_id", "reason": "meta"}) from None
        need = ("vcpus", "memory_mib", "accel", "kernel", "initramfs", "append")
        if not isinstance(meta, dict) or any(k not in meta for k in need):
            raise InvalidRequest("the memstate's meta.json lacks the snapshot fields",
                                 {"field": "memstate_artifact_id", "reason": "meta"})
        image = getattr(self.sb.driver, "image", None)  # the qemu driver's guest image (RT-5)
        if image is not None:
            meta.update(kernel=image.kernel, initramfs=image.initramfs)
        return meta


def _result(tpl: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"template_id": tpl, "has_memory_snapshot": True, "pins": body.get("pins") or {},
            "facts": body.get("facts") or {}, "memstate_artifact_id": body.get("memstate_artifact_id")}


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        disks.clone(str(src), str(dst))


def _id(kind: str, value: Any, field: str, shape: str) -> str:
    if not ids.valid(kind, value):
        raise InvalidRequest(f"{field} {str(value)[:80]!r} is not {shape}", {"field": field, "reason": "format"})
    return str(value)


def _strings(value: Any, field: str, names: tuple[str, ...]) -> dict[str, str]:
    """The origin's pins or facts: a map naming exactly ``names``, string values."""
    if not isinstance(value, dict) or set(value) != set(names) or \
            not all(isinstance(v, str) and len(v) <= 256 for v in value.values()):
        raise InvalidRequest(f"{field} must map {', '.join(names)} to strings", {"field": field, "reason": "format"})
    return {k: value[k] for k in names}
