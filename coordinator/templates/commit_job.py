"""The COMMIT job: a template from a RUNNING sandbox or a READY snapshot (TPL-23 to TPL-25, DIST-8).

Submission (``plan_commit``, TPL-23): the source must exist (SandboxNotFound / SnapshotNotFound),
be RUNNING (SandboxNotRunning) or READY (SnapshotNotReady; CREATING/DELETING →
TemplateAttemptInProgress), on a READY node (NodeUnavailable) with writable storage
(NodeStorageBlocked, SNAP-16). Targets default to the origin node; named ones must be
placeable (NodeNotEligible). The runtime config, vCPUs, memory, probe and compat policy are
inherited from the sandbox record (a snapshot: its row's runtime config, its origin sandbox's
or template's settings). The template (PENDING, ``source_kind`` commit) and the job (COMMIT,
PENDING, SNAPSHOTTING) are inserted together, idempotent per TPL-5.

Steps, each idempotent:

    EXPORT      SNAPSHOTTING 10: EXPORT_SANDBOX on the origin node (``commit.rpc_timeout``):
                a sandbox is paused, its guest-visible disk copied as a standalone ext4 and
                resumed (it keeps running); a snapshot's frozen disk is copied as it is
    REGISTER    REGISTERING 70: the ``rootfs`` artifact row READY with the origin's placement,
                the origin replica READY with pins (DIST-7)
    DISTRIBUTE  DISTRIBUTING 75, only when there are other targets: CREATE's fan-out (DIST-2
                to DIST-7), the origin as the first source; matching targets also get the
                memstate (DIST-8)
    PUBLISH     CREATING_TEMPLATE 85 → READY, PARTIALLY_READY or FAILED as CREATE (TPL-14 to
                TPL-16), keeping the inherited runtime config

**Why the agent names the artifact.** TPL-25's rootfs fingerprint is sha256 of canonical
``{kind: "flat", sha256}`` and the id is ``art-`` + its first 24 hex (CONV-1), so the id is
only known once the agent has hashed the export. EXPORT_SANDBOX is therefore sent without an
``artifact_id``: the agent hashes the copy and files it under the fingerprint's id, returning
id, sha256 and fingerprint. The step stays idempotent through the agent's task record (the
task id is deterministic per job and step, so a re-sent EXPORT after a coordinator crash gets
the recorded result, the same id); the coordinator checks that the returned id matches the
sha256 it reports. Only a task interrupted on the agent itself runs again, possibly giving a
new id; the first copy, if it got that far, matches no row and goes as a stray (GC-12). The
other choice, a job-derived id, would break CONV-1 (ids from fingerprints) and dedup.

**Memory mode.** A sandbox source without ``--rootfs-only`` is committed in memory mode
(TPL-23): the export's pause also captures device state and memory, kept on the origin node as
the template's memory snapshot (the origin replica ``has_memory_snapshot``; sandboxes there
resume the committed guest) and registered as a ``memstate`` artifact (fingerprint: sha256
over its files' sha256s, TPL-25) placed on the origin. DIST-8: in DISTRIBUTE, once a target
holds the rootfs, it gets the memstate too when its current versions equal the origin's pins
under STRICT (guest image, agent, hypervisor, host kernel) and its accelerator and CPU flags
hash equal the origin's (``memory_refusal``): FETCH_ARTIFACT under a grant as for the rootfs,
a placement, then INSTALL_MEMORY_REPLICA (agent/runtime/memstate.py) makes it the node's
memory snapshot, pinned to the origin's versions and facts so the agent's COMPAT-7 check at
restore stays the safety net; the replica is READY ``has_memory_snapshot`` with the
``memstate_artifact_id``. Other targets (build-only nodes, other versions or facts, or a
failed memstate fetch or install) get rootfs-only replicas and cold-boot. Snapshot sources
and ``--rootfs-only`` give rootfs templates.

On failure after the export (TPL-25): the template's replica rows go; unless another template
uses the artifact, REMOVE_ARTIFACT runs on every node with a copy (the origin always, 1 min
each, ``cleanup.rpc_timeout``) and the row goes; the template ends FAILED; the source sandbox
runs on (the agent's export resumed it).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar, Mapping

from protocol import canonical, ids
from protocol.errors import (InvalidAlias, InvalidRequest, NodeUnavailable, SandboxNotFound, SandboxNotRunning,
                             TCError, Timeout)
from protocol.fingerprints import artifact_id

from ..compat.evaluate import Compat, Policy, evaluate
from ..health import Health
from ..jobs.base import JobContext
from ..sandboxes import locate, record, template_row
from ..snapshots import rows as snapshot_rows
from ..storage import check_writable
from .create_job import GC_TTL_MS, CreateJob, Services
from .placement import targets as placeable_targets
from .spec import TemplateSpec

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 300.0      # commit.rpc_timeout (TPL-24)
CLEANUP_TIMEOUT_S = 60.0   # cleanup.rpc_timeout (TPL-25)
# Options of `template create` that only an image source has.
IMAGE_ONLY = ("image", "builder", "platform", "writable_size", "entrypoint", "cmd", "env", "workdir", "user",
              "ports", "vcpus", "memory_mib", "snapshot_mode", "probe", "compat_policy", "credentials")


# --- submission (TPL-23) --------------------------------------------------------------------------

def commit_request(args: Mapping[str, Any]) -> dict[str, Any]:
    """The validated COMMIT request (TPL-23) — what TPL-5 digests: source, alias, nodes, rootfs_only."""
    sbx, snap = args.get("from_sandbox"), args.get("from_snapshot")
    if bool(sbx) == bool(snap):
        raise InvalidRequest("give exactly one of --from-sandbox or --from-snapshot",
                             {"field": "from_sandbox", "reason": "conflict"})
    extra = sorted(k for k in IMAGE_ONLY if args.get(k) not in (None, "", [], False))
    if extra:
        raise InvalidRequest(f"--{extra[0].replace('_', '-')} does not apply to a commit "
                             "(--from-sandbox/--from-snapshot)", {"field": extra[0], "reason": "conflict"})
    kind, source = ("sandbox", sbx) if sbx else ("snapshot", snap)
    if not ids.valid(kind, source):
        raise InvalidRequest(f"{kind} id {str(source)[:80]!r} is malformed", {"field": f"from_{kind}",
                                                                               "reason": "format"})
    alias = args.get("alias") or None
    if alias is not None and not ids.valid("alias", alias):
        raise InvalidAlias(f"alias {alias!r} must be [a-z0-9][a-z0-9-]{{0,63}}, not starting with tpl-, snap- "
                           "or sbx-", {"field": "alias", "alias": alias})
    nodes = args.get("nodes") or []
    if not isinstance(nodes, list) or not all(ids.valid("node", n) for n in nodes):
        raise InvalidRequest("nodes must be node ids (DNS labels)", {"field": "nodes", "reason": "format"})
    return {"operation": "COMMIT", "source": {"kind": kind, "id": source}, "alias": alias,
            "nodes": sorted(set(nodes)), "rootfs_only": bool(args.get("rootfs_only"))}


def source_of(services: Services, request: Mapping[str, Any]) -> dict[str, Any]:
    """The commit source as it is now: origin node, export arguments and what the template
    inherits (TPL-23). Raises the source's refusal."""
    engine = services.fleet.engine
    kind, sid = request["source"]["kind"], request["source"]["id"]
    if kind == "sandbox":
        rec, _, state = locate(engine, sid)
        if rec is None:  # on a node but never recorded: no runtime config to inherit
            raise SandboxNotFound(f"sandbox {sid} not found", {"sandbox": sid})
        if state != "RUNNING":
            raise SandboxNotRunning(f"sandbox {sid} is {state}, not RUNNING", {"sandbox": sid, "state": state})
        spec = rec["spec"] or {}
        return {"node": rec["node_id"], "export": {"sandbox_id": sid}, "runtime_config": rec["runtime_config"] or {},
                "vcpus": rec["vcpus"], "memory_mib": rec["memory_mib"],
                "probe": spec.get("template_probe") or "started", "compat_policy": spec.get("compat_policy")}
    snap = snapshot_rows.check_source(sid, snapshot_rows.get(engine, sid))  # SNAP-8, SNAP-12
    rec = record(engine, snap["sandbox_id"]) or {}
    tpl = template_row(engine, snap["template_id"]) if snap["template_id"] else None
    tspec = (tpl or {}).get("spec") or {}
    return {"node": snap["node_id"], "export": {"snapshot_id": sid},
            "runtime_config": snap["runtime_config"] or rec.get("runtime_config") or (tpl or {}).get("runtime_config")
            or {},
            "vcpus": rec.get("vcpus") or tspec.get("vcpus") or 1,
            "memory_mib": rec.get("memory_mib") or tspec.get("memory_mib") or 512,
            "probe": tspec.get("probe") or "started", "compat_policy": tspec.get("compat_policy")}


def check_origin(services: Services, node: str) -> None:
    """TPL-23: the origin node is READY (NodeUnavailable) and may write (NodeStorageBlocked)."""
    health = services.fleet.health(node)
    if health is not Health.READY:
        raise NodeUnavailable(f"node {node} of the commit source is {health or 'unknown'}", {"node": node})
    cand = next((c for c in services.fleet.candidates() if c.node_id == node), None)
    if cand is not None:
        check_writable(node, cand.usage, cand.storage_mode, "commits")


def plan_commit(services: Services, request: Mapping[str, Any]) -> dict[str, Any]:
    """TPL-23's checks and the new template's spec, targets and inherited runtime config."""
    src = source_of(services, request)
    origin = src["node"]
    check_origin(services, origin)
    nodes = list(request.get("nodes") or []) or [origin]
    others = [n for n in nodes if n != origin]
    if others:
        placeable_targets(services.fleet.candidates(), others)  # NodeNotEligible, listing the offenders
    memory = request["source"]["kind"] == "sandbox" and not request.get("rootfs_only")
    spec = TemplateSpec(image="", alias=request.get("alias"), nodes=tuple(nodes), vcpus=int(src["vcpus"] or 1),
                        memory_mib=int(src["memory_mib"] or 512), snapshot_mode="memory" if memory else "rootfs",
                        probe=str(src["probe"] or "started"), compat_policy=str(src["compat_policy"] or "STRICT"))
    return {"spec": spec.to_dict(), "runtime_config": src["runtime_config"], "origin": origin}


# --- DIST-8: who gets the memory ----------------------------------------------------------------

MEMORY_FACTS = ("accelerator", "cpu_flags_hash")   # COMPAT-1: what a memstate pins besides versions


def memory_refusal(pins: Mapping[str, Any] | None, facts: Mapping[str, Any] | None, current: Mapping[str, Any],
                   node_facts: Mapping[str, Any], *, node_ready: bool) -> str | None:
    """DIST-8: None if a target may get the commit's memstate — its current versions equal the
    origin's pins under STRICT with the host kernel (COMPAT-2/COMPAT-3 give OK; UNKNOWN, an
    empty value on either side, refuses too) and its accelerator and CPU flags hash equal the
    origin's — else why not."""
    verdict = evaluate(Policy.STRICT, pins, current, node_ready=node_ready, has_memory_snapshot=True)
    if verdict is not Compat.OK:
        return f"versions {verdict}"
    for name in MEMORY_FACTS:
        pinned, here = str((facts or {}).get(name) or ""), str(node_facts.get(name) or "")
        if not pinned or pinned != here:
            return f"{name} {pinned!r} ≠ {here!r}"
    return None


# --- the job (TPL-24, TPL-25) -------------------------------------------------------------------

class CommitJob(CreateJob):
    operation = "COMMIT"
    steps = ("EXPORT", "REGISTER", "DISTRIBUTE", "PUBLISH")
    rpc_timeout: ClassVar[float] = RPC_TIMEOUT_S
    cleanup_timeout: ClassVar[float] = CLEANUP_TIMEOUT_S

    async def _timed(self, ctx: JobContext, node: str, op: str, args: dict[str, Any], timeout: float,
                     step: str | None = None) -> dict[str, Any]:
        """One agent task under a deadline; running out cancels it on the agent (the dispatcher
        sends TASK_CANCEL when the job stops waiting)."""
        try:
            return await asyncio.wait_for(ctx.run_task(node, op, args, step=step), timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"{op} on node {node} did not finish within {timeout:.0f} s",
                          {"node": node, "job_id": ctx.job_id}) from None

    async def step_export(self, ctx: JobContext) -> None:
        await ctx.set_phase("SNAPSHOTTING")
        tpl = self._template(ctx)
        if "origin" not in ctx.state:
            src = await ctx.db(source_of, self.services, ctx.job["request"])
            ctx.state.update(origin=src["node"], export_args=src["export"],
                             targets=list((tpl["spec"] or {}).get("nodes") or [src["node"]]))
            ctx.state["builder"] = src["node"]  # the first source of the fan-out (DIST-3 ties)
            ctx.stage(builder_node_id=src["node"])
            await ctx.save()
        origin = ctx.state["origin"]
        args = dict(ctx.state["export_args"])
        if (tpl["spec"] or {}).get("snapshot_mode") == "memory":
            args["memory_template_id"] = tpl["id"]  # TPL-24: capture memory, kept as the origin's replica
        res = await self._timed(ctx, origin, "EXPORT_SANDBOX", args, self.rpc_timeout)
        sha = str(res.get("sha256") or "")
        fp = canonical.digest({"kind": "flat", "sha256": sha})  # TPL-25
        if len(sha) != 64 or not res.get("size") or res.get("artifact_id") != artifact_id(fp):
            raise InvalidRequest(f"the export on {origin} returned an inconsistent result", {"field": "result"})
        ctx.state["exported"] = {k: res[k] for k in ("artifact_id", "sha256", "size", "files")}
        if args.get("memory_template_id"):
            if not (res.get("memory") or {}).get("has_memory_snapshot"):
                raise InvalidRequest(f"the export on {origin} kept no memory snapshot", {"field": "result"})
            mem = res["memory"].get("memstate") or {}
            doc = {"kind": "memstate", "files": [{"name": f.get("name"), "sha256": f.get("sha256")}
                                                 for f in mem.get("files") or []]}
            if not mem.get("files") or mem.get("artifact_id") != artifact_id(canonical.digest(doc)):
                raise InvalidRequest(f"the memstate export on {origin} returned an inconsistent result",
                                     {"field": "result"})
            ctx.state["memory"] = res["memory"]
        ctx.stage(artifact_id=res["artifact_id"], fingerprint=fp)

    async def step_register(self, ctx: JobContext) -> None:
        await ctx.set_phase("REGISTERING")
        exp, origin, tpl_id = ctx.state["exported"], ctx.state["origin"], ctx.job["resource_id"]
        rows = self.services.rows
        ctx.state["registered"] = await ctx.db(
            rows.register_export, exp["artifact_id"], ctx.job["fingerprint"], ctx.job_id, sha256=exp["sha256"],
            size=exp["size"], files=exp["files"], node=origin, gc_ttl_ms=GC_TTL_MS)
        await ctx.db(rows.set_template, tpl_id, artifact_id=exp["artifact_id"])
        mem = (ctx.state.get("memory") or {}).get("memstate")
        if mem:  # TPL-24: the memstate artifact, placed on the origin
            ctx.state["memstate_registered"] = await ctx.db(
                rows.register_export, mem["artifact_id"], mem["fingerprint"], ctx.job_id, sha256=mem["sha256"],
                size=mem["size"], files=mem["files"], node=origin, gc_ttl_ms=GC_TTL_MS, kind="memstate")
            await ctx.db(rows.set_template, tpl_id, memstate_artifact_id=mem["artifact_id"])
        if origin in ctx.state["targets"]:
            await self._replica_ready(ctx, tpl_id, origin, exp["artifact_id"])  # TPL-24, DIST-7
            if mem:
                await ctx.db(rows.replica, tpl_id, origin, memstate_artifact_id=mem["artifact_id"])
        await self._counts(ctx)

    async def step_distribute(self, ctx: JobContext) -> None:
        if any(n != ctx.state["origin"] for n in ctx.state["targets"]):
            await super().step_distribute(ctx)  # DISTRIBUTING 75; the memstate per DIST-8

    async def _prepare_replica(self, ctx: JobContext, tpl: dict[str, Any], node: str,
                               art_id: str) -> dict[str, Any] | None:
        """Memory mode (DIST-8): the origin's memory snapshot was taken with the export
        (TPL-24). Another target whose current versions equal the origin's pins under STRICT,
        with the same accelerator and CPU flags hash, gets the ``memstate`` artifact (fetched
        like the rootfs, DIST-4/DIST-5; placed, DIST-6) and INSTALL_MEMORY_REPLICA makes it its
        memory snapshot; the replica then pins the origin's versions with
        ``has_memory_snapshot`` (DIST-7). Any other target — or one whose memstate fetch or
        install fails — keeps a rootfs-only replica and cold-boots."""
        memory = ctx.state.get("memory") or {}
        if node == ctx.state.get("origin") and memory:
            return dict(memory)
        mem = memory.get("memstate")
        if not mem:
            return {"has_memory_snapshot": False}
        fleet = self.services.fleet
        n = fleet.registry.nodes.get(node)
        refusal = memory_refusal(memory.get("pins"), memory.get("facts"), fleet.versions(node),
                                 (n.facts if n is not None else None) or {},
                                 node_ready=fleet.health(node) is Health.READY)
        if refusal is not None:
            log.info("job %s: %s stays rootfs-only on %s (DIST-8: %s)", ctx.job_id, tpl["id"], node, refusal)
            return {"has_memory_snapshot": False}
        try:
            await self._fetch_memstate(ctx, mem, node)
            ctx.state.setdefault("memory_nodes", [])
            if node not in ctx.state["memory_nodes"]:
                ctx.state["memory_nodes"].append(node)  # cleanup removes its replica files (TPL-25)
                await ctx.save()
            res = await ctx.run_task(node, "INSTALL_MEMORY_REPLICA",
                                     {"template_id": tpl["id"], "artifact_id": art_id,
                                      "memstate_artifact_id": mem["artifact_id"], "pins": memory.get("pins") or {},
                                      "facts": memory.get("facts") or {}}, step="INSTALL_MEMORY_REPLICA")
        except TCError as exc:
            log.warning("job %s: memory snapshot of %s on %s not installed, rootfs only: %s", ctx.job_id,
                        tpl["id"], node, exc.message)
            return {"has_memory_snapshot": False}
        if not res.get("has_memory_snapshot"):
            return {"has_memory_snapshot": False}
        await ctx.db(self.services.rows.replica, tpl["id"], node, memstate_artifact_id=mem["artifact_id"])
        return {"has_memory_snapshot": True, "pins": res.get("pins") or memory.get("pins") or {}}

    async def _fetch_memstate(self, ctx: JobContext, mem: Mapping[str, Any], target: str) -> None:
        """The memstate artifact onto ``target`` with CREATE's machinery (DIST-4, DIST-5): a
        grant on a source holding a verified copy (the origin first, then targets that got
        it), FETCH_ARTIFACT on the target, a failed source replaced up to ``max_attempts``;
        the target's placement on success (DIST-6). Nothing to fetch if it holds a copy."""
        rows = self.services.rows
        mid, origin = mem["artifact_id"], ctx.state.get("origin")
        art = await ctx.db(rows.artifact, mid)
        if art is None or art["status"] != "READY":
            raise TCError(f"memstate artifact {mid} is not ready for distribution", {"artifact_id": mid})
        holders = await self._holders(ctx, art, [target])
        if target in holders:
            await ctx.db(rows.placement, mid, target)
            return
        sources = sorted(holders, key=lambda s: (s != origin, s))
        if not sources:
            raise NodeUnavailable(f"no node holds a verified copy of {mid}", {"node": target})
        last: TCError | None = None
        for try_no in range(self.services.max_attempts):
            source = sources[try_no % len(sources)]
            try:
                await self._transfer_memstate(ctx, art, source, target, try_no)
                return
            except TCError as exc:
                last = exc
                log.warning("job %s: memstate %s → %s failed: %s", ctx.job_id, source, target, exc.message)
                if isinstance(exc, NodeUnavailable) and exc.details.get("node") == target:
                    break
        assert last is not None
        raise last

    async def _transfer_memstate(self, ctx: JobContext, art: Mapping[str, Any], source: str, target: str,
                                 try_no: int) -> None:
        await self._fetch(ctx, art, source, target, try_no, step="DISTRIBUTE:MEMSTATE")

    async def _runtime_config(self, ctx: JobContext, tpl: dict[str, Any]) -> dict[str, Any] | None:
        return None  # inherited at submission (TPL-23): PUBLISH keeps it

    async def cleanup(self, ctx: JobContext, error: Mapping[str, str]) -> None:
        """TPL-25: the template's replica rows go; the export is removed from the nodes holding
        it unless another template uses the artifact, and a memory snapshot kept on the origin
        goes too (each removal tried, 1 min); the template ends FAILED. The source sandbox is
        not touched."""
        exp, origin, tpl_id = ctx.state.get("exported"), ctx.state.get("origin"), ctx.job["resource_id"]
        mem = (ctx.state.get("memory") or {}).get("memstate")
        # The memory snapshots kept (origin) or installed (DIST-8 targets) for this template.
        kept = [origin] if ctx.state.get("memory") and origin else []
        for node in kept + list(ctx.state.get("memory_nodes") or []):
            try:
                await self._timed(ctx, node, "REMOVE_REPLICA", {"template_id": tpl_id}, self.cleanup_timeout,
                                  step="CLEANUP:REPLICA")
            except TCError as exc:
                log.warning("job %s: removing the memory snapshot on %s failed: %s", ctx.job_id, node, exc.message)
        if exp and origin:
            for aid in [exp["artifact_id"], *([mem["artifact_id"]] if mem else [])]:
                await self._release(ctx, aid, origin, tpl_id)
        await ctx.db(self._drop_replicas, tpl_id)
        await super().cleanup(ctx, error)

    async def _release(self, ctx: JobContext, aid: str, origin: str, tpl_id: str) -> None:
        """GC-3 for one export: unless another template uses it, REMOVE_ARTIFACT on every
        node with a copy (the origin always), then the row and its placements go."""
        rows = self.services.rows
        row = await ctx.db(rows.artifact, aid)
        if row is None:
            nodes: list[str] | None = [origin]
        else:
            copies = await ctx.db(self.services.fleet.copies, aid)
            nodes = await ctx.db(rows.cleanup_begin, aid, tpl_id, sorted({origin, *copies}))
        removed = True
        for node in nodes or []:
            try:
                await self._timed(ctx, node, "REMOVE_ARTIFACT", {"artifact_id": aid}, self.cleanup_timeout,
                                  step=f"CLEANUP:{aid}:{node}")
            except TCError as exc:
                removed = False
                log.warning("job %s: removing %s from %s failed: %s", ctx.job_id, aid, node, exc.message)
        if row is not None and nodes and removed:
            await ctx.db(rows.cleanup_finish, aid, tpl_id)

    def _drop_replicas(self, template_id: str) -> None:
        from ..db.models import Replica
        with self.services.rows.sessions.begin() as s:
            s.execute(Replica.__table__.delete().where(Replica.__table__.c.template_id == template_id))


def bind_commit(services: Services, *, rpc_timeout: float = RPC_TIMEOUT_S,
                cleanup_timeout: float = CLEANUP_TIMEOUT_S) -> type[CommitJob]:
    """CommitJob with its services and the configured deadlines (``commit.rpc_timeout``,
    ``cleanup.rpc_timeout``) attached."""
    return type("CommitJob", (CommitJob,), {"services": services, "rpc_timeout": float(rpc_timeout),
                                           "cleanup_timeout": float(cleanup_timeout)})
