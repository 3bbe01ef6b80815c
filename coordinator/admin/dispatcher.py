"""The one place where admin exceptions become error codes (STYLE 4).

``dispatch`` validates the arguments, runs the command and returns a RESULT or an ERROR
message; while a command runs past ``progress_every`` it sends PROGRESS so the client can
tell slow from dead (WIRE-19). Unexpected faults become Internal with a log reference —
no traceback crosses the wire.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from typing import Any, Callable

from protocol.errors import Internal, TCError, UnsupportedMessage
from protocol.message import Message
from protocol.messages import Admin, Error, Progress, Result

from .command import REGISTRY
from .context import AdminContext

log = logging.getLogger(__name__)


async def dispatch(ctx: AdminContext, req: Admin, send: Callable[[Message], None],
                   progress_every: float) -> Message:
    try:
        cls = REGISTRY.get(req.command)
        if cls is None:
            raise UnsupportedMessage(f"unknown admin command {req.command!r}",
                                     {"field": "command", "command": req.command})
        args = cls.validate(req.args)

        def progress(message: str, data: dict[str, Any] | None = None) -> None:
            send(Progress(parent_id=req.msg_id, message=message, data=data))

        task = asyncio.ensure_future(cls().execute(dataclasses.replace(ctx, progress=progress), args))
        while True:
            done, _ = await asyncio.wait({task}, timeout=progress_every)
            if done:
                break
            progress(f"{req.command}: still running")
        return Result(parent_id=req.msg_id, result=task.result())
    except TCError as exc:
        if exc.code >= 2000 or exc.family in ("invalid", "protocol"):
            log.info("admin %s: %s: %s", req.command, exc.name, exc.message)
        else:
            log.warning("admin %s: %s: %s", req.command, exc.name, exc.message)
        return Error.of(exc, req.msg_id)
    except Exception:  # noqa: BLE001
        ref = uuid.uuid4().hex[:12]
        log.exception("admin %s failed (ref %s)", req.command, ref)
        return Error.of(Internal(f"internal error (log ref {ref})", {"log_ref": ref}), req.msg_id)
