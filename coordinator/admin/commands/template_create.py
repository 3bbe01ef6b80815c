"""``template create --image REF [options] [--wait]`` — a template from an image (TPL-1 to TPL-17);
``template create --from-sandbox SBX|--from-snapshot SNAP [--rootfs-only] [--nodes N,…] [--alias A]``
— a template committed from a running sandbox or a READY snapshot (TPL-23 to TPL-25, a COMMIT
job: ``coordinator.templates.commit_job``).

Wire: ADMIN {command: "template create", args: {image, alias?, nodes?, builder?, platform?,
writable_size?, entrypoint?, cmd?, env?, workdir?, user?, ports?, vcpus?, memory_mib?,
snapshot_mode?, probe?, compat_policy?, credentials?, wait?, wait_timeout?, request_id}} — or, for a commit,
{from_sandbox | from_snapshot, rootfs_only?, alias?, nodes?, wait?, wait_timeout?, request_id}
→ RESULT {template_id, job: TPL-33 view, created} (with ``wait``: the finished job, and
``timed_out``/``follow_up`` when the wait ran out).

Idempotent by (request id, CREATE or COMMIT) over the sanitised request (TPL-5). Registry credentials
(``--username`` with ``--password-stdin`` or ``--password-file``) are read by tcctl and sent
with the request; the coordinator keeps them in memory only (IMG-4).
"""
from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from protocol.errors import InvalidRequest
from protocol.schema import Any_, Bool, Int, Map, SchemaError, Str

from ..command import Arg, Command
from ._jobs import maybe_wait, WAIT, WAIT_TIMEOUT, render_job


def _list(x: Any, p: str) -> list[Any]:
    """A JSON list, or a comma-separated string from the CLI."""
    if isinstance(x, list):
        return x
    if isinstance(x, str):
        text = x.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise SchemaError(p, f"not a JSON list: {exc}") from None
            if isinstance(value, list):
                return value
        return [v for v in text.split(",") if v]
    raise SchemaError(p, "must be a list")


def _int(lo: int, hi: int) -> Any:
    inner = Int(lo, hi)

    def check(x: Any, p: str) -> int:
        if isinstance(x, str) and x.strip().lstrip("-").isdigit():
            x = int(x)
        return inner(x, p)
    return check


def _size(x: Any, p: str) -> int:
    from protocol.config import parse_size
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    try:
        return int(parse_size(x))
    except (TypeError, ValueError) as exc:
        raise SchemaError(p, str(exc)) from None


TEXT = Str(4096)


class TemplateCreate(Command):
    name = "template create"
    summary = "create a template from an image, a running sandbox or a snapshot (--wait to follow it)"
    args = (
        Arg("image", "image reference (registry, oci:, oci-archive:, docker-archive:)", Str(1024, None, 1, "image"),
            metavar="REF"),
        Arg("from_sandbox", "commit a RUNNING sandbox instead of building an image", Str(28), metavar="SBX"),
        Arg("from_snapshot", "commit a READY snapshot instead of building an image", Str(29), metavar="SNAP"),
        Arg("rootfs_only", "commit a sandbox's disk only: replicas cold-boot (default: memory mode, the "
            "origin node's replica resumes the committed guest)", Bool(), flag=True, default=False),
        Arg("alias", "alias to claim once the template is usable", Str(256), metavar="ALIAS"),
        Arg("nodes", "target nodes, comma-separated (default: every placeable node; a commit: the origin node)",
            _list, metavar="N,..."),
        Arg("builder", "the node that builds the image", Str(63), metavar="NODE"),
        Arg("platform", "os/arch[/variant] (default image.platform)", Str(64), metavar="PLATFORM"),
        Arg("writable_size", "free space in the root file system (default 1GiB, up to 1TiB)", _size, metavar="SIZE"),
        Arg("entrypoint", "override the image entrypoint (JSON list or comma-separated)", _list, metavar="ARGV"),
        Arg("cmd", "override the image cmd (JSON list or comma-separated)", _list, metavar="ARGV"),
        Arg("env", "environment KEY=VALUE entries over the image's (comma-separated)", _list, metavar="K=V,..."),
        Arg("workdir", "working directory (default the image's, else /)", TEXT, metavar="DIR"),
        Arg("user", "uid[:gid] or name[:group] (default the image's, else 0:0)", Str(65), metavar="USER"),
        Arg("ports", "exposed ports added to the image's (comma-separated)", _list, metavar="PORT,..."),
        Arg("vcpus", "vCPUs, 1-64 (default 1)", _int(1, 64), metavar="N"),
        Arg("memory_mib", "memory in MiB, 64-262144 (default 512)", _int(64, 262_144), metavar="MIB"),
        Arg("snapshot_mode", "rootfs (cold boot) or memory", Str(16), choices=("rootfs", "memory"), metavar="MODE"),
        Arg("probe", "readiness probe: started, exec:CMD or delay:SECONDS", Str(4200), metavar="PROBE"),
        Arg("compat_policy", "STRICT or GUEST_ONLY", Str(16), choices=("STRICT", "GUEST_ONLY"), metavar="POLICY"),
        Arg("username", "registry user (with --password-stdin or --password-file)", Str(256), metavar="USER"),
        Arg("password_stdin", "read the registry password from standard input", Bool(), flag=True, default=False),
        Arg("password_file", "read the registry password from this file", Str(4096), metavar="FILE"),
        Arg("credentials", "registry credentials {username, password}", Map(Any_(), max_len=2), cli=False),
        WAIT, WAIT_TIMEOUT,
    )
    mutating = True

    @classmethod
    def client_args(cls, raw: dict[str, Any]) -> dict[str, Any]:
        user = raw.pop("username", None)
        from_stdin = raw.pop("password_stdin", False)
        path = raw.pop("password_file", None)
        if user is None and (from_stdin or path):
            raise InvalidRequest("--password-stdin/--password-file need --username",
                                 {"field": "username", "reason": "required"})
        if user is not None:
            if from_stdin == bool(path):
                raise InvalidRequest("give the password with exactly one of --password-stdin or --password-file",
                                     {"field": "password", "reason": "required"})
            try:
                secret = sys.stdin.readline() if from_stdin else open(path, encoding="utf-8").readline()
            except OSError as exc:
                raise InvalidRequest(f"cannot read the password file: {exc.strerror}",
                                     {"field": "password_file", "reason": "unreadable"}) from None
            raw["credentials"] = {"username": user, "password": secret.rstrip("\r\n")}
        return raw

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        from ...templates.spec import parse_create, sanitised_request
        from ._jobs import store
        jobs = store(ctx)
        if args.get("from_sandbox") or args.get("from_snapshot"):
            return await _commit(ctx, args)
        if args.get("rootfs_only"):
            raise InvalidRequest("--rootfs-only needs --from-sandbox or --from-snapshot",
                                 {"field": "rootfs_only", "reason": "conflict"})
        creds = args.get("credentials")
        if creds is not None and not (isinstance(creds.get("username"), str) and isinstance(creds.get("password"), str)):
            raise InvalidRequest("credentials must be {username, password}", {"field": "credentials", "reason": "type"})
        request = {k: v for k, v in args.items() if v is not None and k not in (
            "credentials", "username", "password_stdin", "password_file", "wait", "wait_timeout", "rootfs_only")}
        spec = parse_create(request)
        sanitised, _ = sanitised_request("CREATE", spec)
        submitted = await asyncio.to_thread(
            jobs.create_template, request_id=args["request_id"], request=sanitised, image_ref=spec.image,
            spec=spec.to_dict(), requested_alias=spec.alias)
        job = submitted.job
        if submitted.created:
            if creds:  # IMG-4: memory only; the job notes that they existed (IMG-5), never what they were
                ctx.templates.credentials[job["id"]] = {"username": creds["username"], "password": creds["password"]}
                await asyncio.to_thread(_mark_inline_credentials, jobs, job["id"])
            ctx.wake_jobs()
        from ...jobs.store import job_info
        result: dict[str, Any] = {"template_id": job["resource_id"], "created": submitted.created,
                                  "job": job_info(job)}
        return await maybe_wait(ctx, args, job["id"], result)

    def render(self, result, console):  # type: ignore[no-untyped-def]
        console.print(f"template {result['template_id']}" + ("" if result.get("created") else " (existing request)"))
        render_job(result["job"], console)


async def _commit(ctx: Any, args: dict[str, Any]) -> dict[str, Any]:
    """TPL-23: a COMMIT job. An equal resubmit returns the existing job before the source is
    looked at again (TPL-5: the sandbox may be gone by then)."""
    from ...jobs.requests import sanitize_and_digest
    from ...jobs.store import job_info
    from ...templates.commit_job import commit_request, plan_commit
    from ._jobs import store
    jobs = store(ctx)
    request = commit_request({k: v for k, v in args.items() if k not in ("wait", "wait_timeout", "request_id")})
    _, dig = sanitize_and_digest(request)
    existing = await asyncio.to_thread(jobs.existing, args["request_id"], "COMMIT", dig)
    if existing is not None:
        job, created = existing, False
    else:
        plan = await asyncio.to_thread(plan_commit, ctx.templates, request)
        submitted = await asyncio.to_thread(
            jobs.create_template, request_id=args["request_id"], request=request, source_kind="commit",
            spec=plan["spec"], requested_alias=request["alias"], runtime_config=plan["runtime_config"],
            operation="COMMIT", phase="SNAPSHOTTING")
        job, created = submitted.job, submitted.created
        if created:
            ctx.wake_jobs()
    result: dict[str, Any] = {"template_id": job["resource_id"], "created": created, "job": job_info(job)}
    return await maybe_wait(ctx, args, job["id"], result)


def _mark_inline_credentials(jobs: Any, job_id: str) -> None:
    from ...jobs import transitions as tr
    with jobs.sessions.begin() as s:
        tr.update_active_job(s, job_id, touch=False, step_state={"inline_credentials": True})
