"""Identifier formats (SPEC CONV-1) and their generators."""
from __future__ import annotations

import hashlib
import re
import secrets
import uuid

NODE_ID = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
TEMPLATE_ID = re.compile(r"tpl-[0-9a-f]{24}\Z")
SNAPSHOT_ID = re.compile(r"snap-[0-9a-f]{24}\Z")
SANDBOX_ID = re.compile(r"sbx-[0-9a-f]{24}\Z")
JOB_ID = re.compile(r"job-[0-9a-f]{24}\Z")
ARTIFACT_ID = re.compile(r"art-[0-9a-f]{24}\Z")
TASK_ID = re.compile(r"tsk-[0-9a-f]{24}\Z")
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
ALIAS = re.compile(r"(?!tpl-|snap-|sbx-)[a-z0-9][a-z0-9-]{0,63}\Z")
# msg_id: <= 64 printable ASCII characters without spaces (WIRE-4).
MSG_ID = re.compile(r"[!-~]{1,64}\Z")
HEX64 = re.compile(r"[0-9a-f]{64}\Z")

KINDS = {"node": NODE_ID, "template": TEMPLATE_ID, "snapshot": SNAPSHOT_ID, "sandbox": SANDBOX_ID,
         "job": JOB_ID, "artifact": ARTIFACT_ID, "task": TASK_ID, "request": REQUEST_ID, "alias": ALIAS}


def valid(kind: str, value: object) -> bool:
    return isinstance(value, str) and KINDS[kind].match(value) is not None


def new_id(prefix: str) -> str:
    """A random coordinator id: ``tpl-``/``snap-``/``sbx-``/``job-`` + 24 lowercase hex."""
    return f"{prefix}-{secrets.token_hex(12)}"


def task_id(job_id: str, step: str, node_id: str, attempt: int) -> str:
    """Deterministic task id, so a re-sent task returns the agent's recorded outcome."""
    h = hashlib.sha256("\x00".join((job_id, step, node_id, str(attempt))).encode()).hexdigest()
    return f"tsk-{h[:24]}"


def new_request_id() -> str:
    return str(uuid.uuid4())
