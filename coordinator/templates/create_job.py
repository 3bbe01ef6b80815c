"""The CREATE job: a template from an image (TPL-7 to TPL-17, DIST-1 to DIST-7).

Steps, each idempotent (a crash re-runs the current one; agent tasks have deterministic ids,
so a re-sent task returns the agent's recorded outcome instead of running twice):

    RESOLVE_IMAGE   RESOLVE_IMAGE on a target (the builder for local sources) → fingerprint
    CLAIM_ARTIFACT  adopt a READY artifact with a surviving copy, wait for a live build of
                    the same fingerprint, or claim the row (BUILDING, owner = this job)
    BUILD           BUILD_ARTIFACT on the chosen builder, progress mirrored into the job;
                    a lost builder is replaced once (TPL-11)
    REGISTER        BUILDING → READY fenced on owner and generation, the builder's placement
    DISTRIBUTE      targets holding a verified copy are done; the others FETCH_ARTIFACT from
                    a source under a grant, finished targets becoming sources (fan-out)
    PUBLISH         aggregate the replicas, claim the alias, write the runtime config

Credentials given with the request stay in coordinator memory (``Services.credentials``);
after a restart a job that still has to pull fails as IMG-5 says.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, ClassVar, Mapping

from protocol.errors import (ArtifactChecksumMismatch, ImageAuthFailed, InvalidRequest, NodeUnavailable, TCError,
                             TemplateHasNoReadyReplica, TemplateNotFound)
from protocol.fingerprints import artifact_id, image_fingerprint

from ..jobs import transitions as tr
from ..jobs.base import JobContext, JobType, PHASE_PROGRESS
from ..health import Health
from .fleet import Fleet
from .placement import LayerInfo, choose_builder, pick_source, storage_refusal, target_fits, targets
from .rows import Rows
from .spec import Overrides, TemplateSpec, runtime_config

log = logging.getLogger(__name__)

LOCAL_PREFIXES = ("oci:", "oci-archive:", "docker-archive:")
BUILD_PHASES = ("PULLING", "UNPACKING", "BUILDING_EXT4", "GENERATING_JSON")
MAX_BUILDERS = 2
WAIT_POLL_S = 5.0
GC_TTL_MS = 7 * 86400 * 1000

Grant = Callable[[str, str, str], Awaitable[dict[str, Any]]]   # (source, artifact, target) -> {token, expires}


@dataclass
class Services:
    """What template jobs use besides the job context; one instance per coordinator."""
    fleet: Fleet
    rows: Rows
    grant: Grant | None = None
    credentials: dict[str, dict[str, str]] = field(default_factory=dict)   # job id -> {username, password}
    wait_poll_s: float = WAIT_POLL_S
    per_source: int = 2
    max_attempts: int = 3
    space_reserve: int = 1 << 30


def bind(job_type: type[JobType], services: Services) -> type[JobType]:
    """The job type with its services attached (the runner builds job types without arguments)."""
    return type(job_type.__name__, (job_type,), {"services": services})


def spec_of(template: Mapping[str, Any]) -> TemplateSpec:
    d = dict(template["spec"])
    o = dict(d.pop("overrides", {}) or {})
    o["env"] = tuple(sorted((o.get("env") or {}).items()))
    for k in ("entrypoint", "cmd"):
        o[k] = tuple(o[k]) if o.get(k) is not None else None
    o["ports"] = tuple(o.get("ports") or ())
    d["nodes"] = tuple(d.get("nodes") or ())
    return TemplateSpec(**d, overrides=Overrides(**o))


class CreateJob(JobType):
    operation = "CREATE"
    steps = ("RESOLVE_IMAGE", "CLAIM_ARTIFACT", "BUILD", "REGISTER", "DISTRIBUTE", "PUBLISH")
    services: ClassVar[Services]
    claims_alias: ClassVar[bool] = True  # REDO keeps the current alias and never re-claims one (TPL-22)

    # --- helpers -------------------------------------------------------------------------------

    def _template(self, ctx: JobContext) -> dict[str, Any]:
        tpl = self.services.rows.template(ctx.job["resource_id"])
        if tpl is None:
            raise TemplateNotFound(f"template {ctx.job['resource_id']} is gone", {})
        return tpl

    async def _settle(self, ctx: JobContext) -> None:
        """After a coordinator (re)start, wait for the known nodes to reconnect before choosing
        any (at most the failover grace, NODE-8): a resumed job must not fail for nodes that are
        merely not back yet (TPL-31)."""
        while await ctx.db(self.services.fleet.settling):
            await asyncio.sleep(0.2)

    def _credentials(self, ctx: JobContext) -> dict[str, str] | None:
        creds = self.services.credentials.get(ctx.job_id)
        if creds is None and ctx.state.get("inline_credentials"):
            raise ImageAuthFailed("registry credentials are not persisted; submit again with a new request id",
                                  {"job_id": ctx.job_id})
        return creds

    def _with_creds(self, ctx: JobContext, args: dict[str, Any]) -> dict[str, Any]:
        creds = self._credentials(ctx)
        return {**args, "credentials": creds} if creds else args

    # --- steps -----------------------------------------------------------------------------------

    async def step_resolve_image(self, ctx: JobContext) -> None:
        tpl = self._template(ctx)
        spec = spec_of(tpl)
        await ctx.set_phase("PULLING")
        await self._settle(ctx)
        nodes = targets(await ctx.db(self.services.fleet.candidates), spec.nodes)
        local = spec.image.startswith(LOCAL_PREFIXES)
        if local and not spec.builder and len(nodes) != 1:
            raise InvalidRequest("a local image source needs --builder unless there is one target (IMG-2)",
                                 {"field": "builder", "reason": "required"})
        node = spec.builder if (local or spec.builder) and spec.builder else nodes[0].node_id
        ctx.state["targets"] = [n.node_id for n in nodes]
        args: dict[str, Any] = {"image": spec.image}
        if spec.platform:
            args["platform"] = spec.platform
        resolved = await ctx.run_task(node, "RESOLVE_IMAGE", self._with_creds(ctx, args))
        fp = image_fingerprint(resolved["manifest_digest"], spec.writable_size)
        config = json.loads(resolved["config"]["content"])
        ctx.state["resolved"] = {"manifest_digest": resolved["manifest_digest"], "layers": resolved["layers"],
                                 "config": config, "resolve_node": node}
        ctx.stage(fingerprint=fp, artifact_id=artifact_id(fp))
        await ctx.db(self.services.rows.set_template, tpl["id"], manifest_digest=resolved["manifest_digest"])

    async def step_claim_artifact(self, ctx: JobContext) -> None:
        art, fp = ctx.job["artifact_id"], ctx.job["fingerprint"]
        rows, fleet = self.services.rows, self.services.fleet
        while True:
            row = await ctx.db(rows.artifact, art)
            has_copy = bool(row and row["status"] == tr.READY and await ctx.db(fleet.copies, art, row["sha256"]))
            claim = await ctx.db(rows.claim_artifact, art, fp, ctx.job_id, has_copy=has_copy,
                                 manifest_digest=ctx.state["resolved"]["manifest_digest"])
            if claim.outcome != "wait":
                break
            await ctx.progress(phase="PULLING", pull_progress={"waiting": f"waiting for build of {art} by "
                                                                          f"{claim.owner_job_id}"})
            await asyncio.sleep(self.services.wait_poll_s)
        ctx.state["claim"] = {"outcome": claim.outcome, "generation": claim.generation}
        if claim.outcome == "adopt":
            log.info("job %s adopts READY artifact %s", ctx.job_id, art)

    async def step_build(self, ctx: JobContext) -> None:
        if ctx.state["claim"]["outcome"] == "adopt" or ctx.state.get("built"):
            return
        tpl = self._template(ctx)
        spec = spec_of(tpl)
        resolved = ctx.state["resolved"]
        layers = [LayerInfo(l["digest"], l["size"]) for l in resolved["layers"]]
        failed: list[str] = ctx.state.setdefault("failed_builders", [])
        await self._settle(ctx)
        while True:
            builder = ctx.state.get("builder")
            candidates = await ctx.db(self.services.fleet.candidates, [l.digest for l in layers])
            by_id = {c.node_id: c for c in candidates}
            if builder is None or builder in failed:
                # SNAP-16: a requested builder that may not write is refused as such, not
                # reported as "cannot build".
                if spec.builder and spec.builder not in failed and (
                        refusal := storage_refusal(by_id.get(spec.builder), "builds")) is not None:
                    raise refusal
                builder = choose_builder(candidates, layers, spec.writable_size, exclude=failed,
                                         prefer=spec.builder).node_id
                ctx.state["builder"] = builder
                ctx.stage(builder_node_id=builder)
                await ctx.save()
            refusal = storage_refusal(by_id.get(builder), "builds")  # a resumed job's builder filled up
            if refusal is not None:
                raise refusal
            args = {"artifact_id": ctx.job["artifact_id"], "image": spec.image,
                    "manifest_digest": resolved["manifest_digest"], "writable_size": spec.writable_size}
            if spec.platform:
                args["platform"] = spec.platform
            try:
                ctx.state["built"] = await ctx.run_task(builder, "BUILD_ARTIFACT", self._with_creds(ctx, args),
                                                        try_no=len(failed), on_progress=self._mirror(ctx))
                return
            except NodeUnavailable as exc:
                failed.append(builder)
                log.warning("job %s: builder %s unavailable (%s)", ctx.job_id, builder, exc.message)
                if len(failed) >= MAX_BUILDERS:
                    raise
                await ctx.save()

    def _mirror(self, ctx: JobContext) -> Callable[[dict[str, Any]], None]:
        """Agent build progress → the job's phase, progress and pull figures (IMG-23)."""
        loop = asyncio.get_running_loop()
        table = PHASE_PROGRESS

        def on_progress(p: dict[str, Any]) -> None:
            phase = p.get("phase") if p.get("phase") in BUILD_PHASES else "PULLING"
            i = BUILD_PHASES.index(phase)
            lo = table[phase]["CREATE"]
            hi = table[BUILD_PHASES[i + 1]]["CREATE"] if i + 1 < len(BUILD_PHASES) else table["DISTRIBUTING"]["CREATE"]
            pct = max(0.0, min(100.0, float(p.get("percent") or 0)))
            pull = {k: p[k] for k in ("bytes_done", "bytes_total", "layers_done", "layers_total", "speed") if k in p}
            loop.create_task(ctx.progress(int(lo + (hi - lo) * pct / 100), phase=phase, pull_progress=pull))
        return on_progress

    async def step_register(self, ctx: JobContext) -> None:
        if ctx.state["claim"]["outcome"] == "adopt":
            return
        built = ctx.state["built"]
        art = ctx.job["artifact_id"]
        if built.get("artifact_id") != art or len(str(built.get("sha256", ""))) != 64 or not built.get("size"):
            raise InvalidRequest(f"the builder's result for {art} is incomplete", {"field": "result"})
        rows = self.services.rows
        ok = await ctx.db(rows.register_artifact, art, ctx.job_id, ctx.state["claim"]["generation"],
                          sha256=built["sha256"], size=built["size"], files=built.get("files", []),
                          image_config=built.get("config", {}), builder=ctx.state["builder"], gc_ttl_ms=GC_TTL_MS)
        if not ok:
            row = await ctx.db(rows.artifact, art)
            if row is None or row["status"] != tr.READY:
                raise TCError(f"artifact {art} was claimed by another job while this one built it", {})
            ctx.state["claim"]["outcome"] = "adopt"  # TPL-12: the lost compare-and-set adopts
        await ctx.db(self.services.rows.set_template, ctx.job["resource_id"], artifact_id=art)

    async def step_distribute(self, ctx: JobContext) -> None:
        await ctx.set_phase("DISTRIBUTING")
        await self._settle(ctx)
        art = await ctx.db(self.services.rows.artifact, ctx.job["artifact_id"])
        if art is None or art["status"] != tr.READY:
            raise TCError(f"artifact {ctx.job['artifact_id']} is not ready for distribution", {})
        await ctx.db(self.services.rows.set_template, ctx.job["resource_id"], artifact_id=art["id"])
        tpl_id = ctx.job["resource_id"]
        fleet, rows = self.services.fleet, self.services.rows
        wanted = ctx.state["targets"]
        holders = await self._holders(ctx, art, wanted)
        todo: list[str] = []
        by_id = {c.node_id: c for c in await ctx.db(fleet.candidates)}
        for node in wanted:
            if node in holders:
                await self._replica_ready(ctx, tpl_id, node, art["id"])
            elif (refusal := storage_refusal(by_id.get(node), "incoming transfers")) is not None:
                # SNAP-16, DIST-2: the target filled up since it was chosen; no transfer is tried.
                await ctx.db(rows.replica, tpl_id, node, status=tr.FAILED, phase="FAILED", cleanup_required=False,
                             artifact_id=art["id"], job_id=ctx.job_id, last_error_phase="DISTRIBUTING",
                             last_error=refusal.message)
            elif node in by_id and not target_fits(by_id[node], art["size"], self.services.space_reserve):
                c = by_id[node]
                await ctx.db(rows.replica, tpl_id, node, status=tr.FAILED, phase="FAILED", cleanup_required=False,
                             artifact_id=art["id"], job_id=ctx.job_id, last_error_phase="DISTRIBUTING",
                             last_error=f"insufficient storage on node {node} (need "
                                        f"{art['size'] + self.services.space_reserve}, free {c.free})")
            else:
                await ctx.db(rows.replica, tpl_id, node, status=tr.FAILED, phase="DISTRIBUTING", cleanup_required=True,
                             artifact_id=art["id"], job_id=ctx.job_id, last_error="", last_error_phase="")
                todo.append(node)
        await self._counts(ctx)
        if todo:
            await self._transfer_all(ctx, art, todo, sorted(holders))

    async def _holders(self, ctx: JobContext, art: dict[str, Any], wanted: list[str]) -> set[str]:
        """Nodes with a verified copy: recorded placements (known from task results at once)
        and catalog mirrors, LOST nodes left out."""
        fleet, rows = self.services.fleet, self.services.rows
        recorded = [n for n in await ctx.db(rows.placements, art["id"]) if fleet.health(n) not in (None, Health.LOST)]
        return set(await ctx.db(fleet.copies, art["id"], art["sha256"])) | set(recorded)

    async def _transfer_all(self, ctx: JobContext, art: dict[str, Any], todo: list[str], sources: list[str]) -> None:
        """DIST-3 to DIST-5: each target pulls from the least busy source (≤ per_source each);
        finished targets become sources; a failing source is replaced, up to max_attempts."""
        active: dict[str, int] = {}
        attempts: dict[str, int] = {}
        pending = list(todo)
        running: dict[asyncio.Task[None], tuple[str, str]] = {}
        errors: dict[str, str] = {}
        builder = ctx.state.get("builder")
        while pending or running:
            for target in list(pending):
                source = pick_source(sources, active, builder=builder, per_source=self.services.per_source)
                if source is None:
                    break
                pending.remove(target)
                active[source] = active.get(source, 0) + 1
                attempts[target] = attempts.get(target, 0) + 1
                task = asyncio.ensure_future(self._transfer(ctx, art, source, target, attempts[target] - 1))
                running[task] = (source, target)
            if not running:
                for target in pending:  # no source left at all
                    errors[target] = "no source holds a verified copy"
                    await self._replica_failed(ctx, art["id"], target, errors[target])
                break
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                source, target = running.pop(task)
                active[source] -= 1
                exc = task.exception()
                if exc is None:
                    sources.append(target)  # fan-out
                    continue
                msg = exc.message if isinstance(exc, TCError) else str(exc)
                log.warning("job %s: %s → %s failed: %s", ctx.job_id, source, target, msg)
                if source in sources and (
                        (isinstance(exc, NodeUnavailable) and exc.details.get("node") == source)
                        # A source that kept sending bad chunks (or a whole file that does not
                        # match) is not asked again in this job: its copy or its wire lies.
                        or (isinstance(exc, ArtifactChecksumMismatch) and exc.details.get("source") == source)):
                    sources.remove(source)
                # A target that is itself unavailable (LOST, or never accepted the task) is not
                # asked again: the dispatcher already re-sent across its sessions, and another
                # source cannot help. Its replica fails now; `redo --failed-only` brings it back.
                target_gone = isinstance(exc, NodeUnavailable) and exc.details.get("node") == target
                if attempts[target] < self.services.max_attempts and not target_gone:
                    pending.append(target)
                else:
                    await self._replica_failed(ctx, art["id"], target, msg)
            await self._counts(ctx)

    async def _transfer(self, ctx: JobContext, art: dict[str, Any], source: str, target: str, try_no: int) -> None:
        await self._fetch(ctx, art, source, target, try_no)
        await self._replica_ready(ctx, ctx.job["resource_id"], target, art["id"])

    async def _fetch(self, ctx: JobContext, art: Mapping[str, Any], source: str, target: str, try_no: int,
                     step: str = "DISTRIBUTE") -> None:
        """One copy under a grant (DIST-4, DIST-5): FETCH_ARTIFACT on the target, then its
        placement (DIST-6)."""
        if self.services.grant is None:
            raise NodeUnavailable("artifact transfer is not available on this coordinator", {"node": target})
        grant = await self.services.grant(source, art["id"], target)
        args = {"artifact_id": art["id"], "files": art["files"], "sha256": art["sha256"], "size": art["size"],
                "source": {"node": source, "endpoint": self.services.fleet.blob_endpoint(source),
                           "key": grant.get("source_key", "")},
                "token": grant["token"]}
        await ctx.run_task(target, "FETCH_ARTIFACT", args, try_no=try_no, step=step)
        await ctx.db(self.services.rows.placement, art["id"], target)

    async def _replica_ready(self, ctx: JobContext, tpl_id: str, node: str, art_id: str) -> None:
        """DIST-6/DIST-7: rootfs mode has no snapshot step, so DISTRIBUTED is READY at once. In
        memory mode a sandbox-capable node first makes the template's memory snapshot (DIST-9,
        TPL-13); build-only nodes get rootfs-only READY replicas."""
        from ..compat.evaluate import evaluate, policy_of
        await ctx.db(self.services.rows.placement, art_id, node)
        pins = await ctx.db(self.services.fleet.versions, node)
        # DIST-7: the template's compat policy evaluated at once (COMPAT-3; UNKNOWN if a value is empty).
        tpl = await ctx.db(self.services.rows.template, tpl_id)
        memory = False
        if ((tpl or {}).get("spec") or {}).get("snapshot_mode") == "memory" and self._sandbox_capable(node):
            prepared = await self._prepare_replica(ctx, tpl or {}, node, art_id)
            if prepared is None:
                return  # FAILED in SNAPSHOTTING, recorded
            memory = bool(prepared.get("has_memory_snapshot", True))
            pins = {**pins, **{k: str(v) for k, v in (prepared.get("pins") or {}).items()}}
        current = await ctx.db(self.services.fleet.versions, node)
        compat = evaluate(policy_of((tpl or {}).get("spec")), pins, current,
                          node_ready=self.services.fleet.health(node) is Health.READY, has_memory_snapshot=memory)
        await ctx.db(self.services.rows.replica, tpl_id, node, status=tr.READY, phase="READY",
                     cleanup_required=False, artifact_id=art_id, job_id=ctx.job_id, last_error="",
                     last_error_phase="", pins=pins, compat=str(compat), has_memory_snapshot=memory,
                     compat_checked_ms=self.services.rows.now_ms())

    def _sandbox_capable(self, node: str) -> bool:
        n = self.services.fleet.registry.nodes.get(node)
        return bool(n is not None and (n.capabilities or {}).get("sandbox"))

    async def _prepare_replica(self, ctx: JobContext, tpl: dict[str, Any], node: str,
                               art_id: str) -> dict[str, Any] | None:
        """DIST-9: the replica turns SNAPSHOTTING (still FAILED with cleanup_required, CONV-9),
        the node boots the template once, waits for its probe and snapshots it
        (PREPARE_REPLICA). The task result, or None after recording the replica FAILED with
        ``last_error_phase`` SNAPSHOTTING."""
        rows = self.services.rows
        if ctx.job.get("phase") != "SNAPSHOTTING":
            await ctx.set_phase("SNAPSHOTTING")  # TPL-13: SNAPSHOTTING 80 on sandbox-capable targets
        await ctx.db(rows.replica, tpl["id"], node, status=tr.FAILED, phase="SNAPSHOTTING", cleanup_required=True,
                     artifact_id=art_id, job_id=ctx.job_id, last_error="", last_error_phase="")
        spec = spec_of(tpl)
        art = await ctx.db(rows.artifact, art_id)
        args = {"template_id": tpl["id"], "artifact_id": art_id,
                "runtime_config": tpl.get("runtime_config") or runtime_config((art or {}).get("image_config") or {},
                                                                              spec),
                "vcpus": spec.vcpus, "memory_mib": spec.memory_mib, "probe": spec.probe}
        try:
            return await ctx.run_task(node, "PREPARE_REPLICA", args, step="PREPARE_REPLICA")
        except TCError as exc:
            log.warning("job %s: memory snapshot of %s on %s failed: %s", ctx.job_id, tpl["id"], node, exc.message)
            await ctx.db(rows.replica, tpl["id"], node, status=tr.FAILED, phase="FAILED", artifact_id=art_id,
                         job_id=ctx.job_id, last_error=f"{exc.name}: {exc.message}", last_error_phase="SNAPSHOTTING")
            return None

    async def _replica_failed(self, ctx: JobContext, art_id: str, node: str, message: str) -> None:
        await ctx.db(self.services.rows.replica, ctx.job["resource_id"], node, status=tr.FAILED, phase="FAILED",
                     artifact_id=art_id, job_id=ctx.job_id, last_error=message, last_error_phase="DISTRIBUTING")

    async def _counts(self, ctx: JobContext) -> None:
        reps = [r for r in await ctx.db(self.services.rows.replicas, ctx.job["resource_id"])
                if r["node_id"] in ctx.state["targets"]]
        ready = sum(1 for r in reps if r["status"] == tr.READY)
        failed = sum(1 for r in reps if r["status"] == tr.FAILED and r["phase"] == "FAILED")
        await ctx.progress(nodes_expected=len(ctx.state["targets"]), nodes_ready=ready, nodes_failed=failed,
                           nodes_pending=len(ctx.state["targets"]) - ready - failed)

    async def step_publish(self, ctx: JobContext) -> None:
        await ctx.set_phase("CREATING_TEMPLATE")
        tpl = self._template(ctx)
        reps = await ctx.db(self.services.rows.replicas, tpl["id"])
        ready = [r for r in reps if r["status"] == tr.READY]
        failed = [r for r in reps if r["status"] != tr.READY]
        if not ready:
            first = next((r["last_error"] for r in failed if r["last_error"]), "")
            message = (f"artifact distribution failed on all {len(failed)} node(s): {first}" if failed
                       else "artifact distribution did not reach any node")
            await ctx.db(self.services.rows.publish, tpl["id"], ctx.job_id, tr.FAILED, last_error=message)
            raise TemplateHasNoReadyReplica(message, {"template_id": tpl["id"]})
        status = tr.READY if not failed else tr.PARTIALLY_READY
        last_error = next((r["last_error"] for r in failed if r["last_error"]), "")
        warning = await ctx.db(self.services.rows.publish, tpl["id"], ctx.job_id, status, last_error=last_error,
                               runtime_config=await self._runtime_config(ctx, tpl), claim_alias=self.claims_alias)
        ctx.state["warning"] = warning
        self.services.credentials.pop(ctx.job_id, None)  # nothing left to pull (IMG-4)

    async def _runtime_config(self, ctx: JobContext, tpl: dict[str, Any]) -> dict[str, Any] | None:
        """The runtime config PUBLISH writes: image config + overrides (TPL-30); COMMIT keeps
        the inherited one (TPL-23)."""
        art = await ctx.db(self.services.rows.artifact, ctx.job["artifact_id"])
        config = (art or {}).get("image_config") or {}  # normalised by the builder (IMG-21)
        return runtime_config(config, spec_of(tpl))

    async def cleanup(self, ctx: JobContext, error: Mapping[str, str]) -> None:
        """A failed job: a claim it still holds ends FAILED; the template shows the error; the
        credentials are forgotten."""
        self.services.credentials.pop(ctx.job_id, None)
        art = ctx.job.get("artifact_id")
        if art and ctx.state.get("claim", {}).get("outcome") == "claimed":
            await ctx.db(self.services.rows.fail_artifact, art, ctx.job_id)
        tpl = self.services.rows.template(ctx.job["resource_id"])
        if tpl is not None and tpl["status"] == tr.PENDING:
            await ctx.db(self.services.rows.publish, tpl["id"], ctx.job_id, tr.FAILED,
                         last_error=error.get("message", ""))
