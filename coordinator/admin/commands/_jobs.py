"""What the template and job commands share: id arguments, following a job to a terminal
state with PROGRESS (CLI-3, WIRE-19), and rendering a job (TPL-33)."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from protocol import ids
from protocol.errors import InvalidRequest, JobNotFound, TemplateNotFound
from protocol.schema import Bool, Str

from ..command import Arg
from .node_drain import duration

JOB = Arg("job", "job id", Str(28, ids.JOB_ID, 28, "job id"), positional=True, required=True, metavar="JOB")
TEMPLATE = Arg("template", "template id or alias", Str(64, None, 1, "template"), positional=True, required=True,
               metavar="TPL")
WAIT = Arg("wait", "follow the job to the end, showing its progress", Bool(), flag=True, default=False)
WAIT_TIMEOUT = Arg("wait_timeout", "longest wait with --wait, e.g. 30s or 15m (default admin.wait_timeout, 30m)",
                   duration, metavar="DURATION")
TERMINAL = ("READY", "FAILED")


def store(ctx: Any) -> Any:
    if ctx.jobs is None:
        raise InvalidRequest("templates are not served by this coordinator", {"field": "command"})
    return ctx.jobs


async def get_job(ctx: Any, job_id: str) -> dict[str, Any]:
    try:
        return await asyncio.to_thread(store(ctx).get_job, job_id)
    except KeyError:
        raise JobNotFound(f"job {job_id} not found", {"job_id": job_id}) from None


async def resolve_template(ctx: Any, name: str) -> dict[str, Any]:
    """CONV-2: ``tpl-…`` is an id, anything else an alias among non-DELETING templates."""
    from sqlalchemy import select

    from ...db.models import Template
    t = Template.__table__
    if name.startswith("tpl-"):
        if not ids.valid("template", name):
            raise InvalidRequest(f"template id {name!r} is malformed", {"field": "template", "reason": "format"})
        stmt = select(t).where(t.c.id == name)
    else:
        stmt = select(t).where(t.c.alias == name, t.c.status != "DELETING")

    def read() -> dict[str, Any] | None:
        with store(ctx).engine.connect() as c:
            row = c.execute(stmt).mappings().first()
            return dict(row) if row else None
    row = await asyncio.to_thread(read)
    if row is None:
        raise TemplateNotFound(f"template {name} not found", {"template": name})
    return row


def progress_line(info: dict[str, Any]) -> dict[str, Any]:
    pull = info.get("pull_progress") or {}
    return {"job_id": info["job_id"], "status": info["status"], "phase": info["phase"],
            "percent": info["progress"], "bytes_done": pull.get("bytes_done"), "bytes_total": pull.get("bytes_total"),
            "nodes_ready": info["nodes"]["ready"], "nodes_failed": info["nodes"]["failed"]}


async def follow(ctx: Any, job_id: str, timeout: float | None) -> tuple[dict[str, Any], bool]:
    """Poll the job until it is terminal; PROGRESS on every change and at least every
    ``admin.progress_every``. Returns (job info, timed_out)."""
    from ...jobs.store import job_info
    limit = ctx.config.admin.wait_timeout if timeout is None else timeout
    deadline = time.monotonic() + limit
    every = ctx.config.admin.progress_every
    last, last_sent = None, 0.0
    while True:
        info = job_info(await get_job(ctx, job_id))
        line = progress_line(info)
        now = time.monotonic()
        if line != last or now - last_sent >= every:
            ctx.progress(f"{info['phase']} {info['progress']}%", line)
            last, last_sent = line, now
        if info["status"] in TERMINAL:
            return info, False
        if now >= deadline:
            return info, True
        await asyncio.sleep(0.25)


async def maybe_wait(ctx: Any, args: dict[str, Any], job_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """With ``--wait``: follow the job (CLI-3) and fill ``job``, ``timed_out`` and, on a timeout,
    ``follow_up`` and ``remaining`` (CLI-4)."""
    if not args.get("wait"):
        return result
    info, timed_out = await follow(ctx, job_id, args.get("wait_timeout"))
    result.update(job=info, timed_out=timed_out)
    if timed_out:
        result["follow_up"] = f"tcctl job watch {job_id}"
        result["remaining"] = {"phase": info["phase"], "nodes_pending": info["nodes"]["pending"]}
    return result


def render_job(info: dict[str, Any], console: Any) -> None:
    err = info.get("error") or {}
    nodes = info.get("nodes") or {}
    console.print(f"job {info['job_id']}  {info['operation']} {info['resource_id']}  {info['status']}  "
                  f"{info['phase']} {info['progress']}%")
    console.print(f"  nodes: {nodes.get('ready', 0)} ready, {nodes.get('failed', 0)} failed, "
                  f"{nodes.get('pending', 0)} pending of {nodes.get('expected', 0)}")
    if info.get("artifact_id"):
        console.print(f"  artifact {info['artifact_id']}  builder {info.get('builder_node_id') or '-'}")
    if err:
        console.print(f"  error: {err.get('name')}: {err.get('message')}")
