"""Wire message types (SPEC §2). One frozen class per type; times are unix ms, sizes bytes.

Session (agent DEALER ↔ coordinator ROUTER): HELLO → WELCOME; HEARTBEAT ↔ HEARTBEAT_ACK;
VERSIONS, RUNTIME_REFS, CATALOG_SNAPSHOT and CATALOG_DELTA on change or on request.
Tasks: TASK → TASK_ACCEPTED → TASK_PROGRESS* → TASK_RESULT; TASK_CANCEL.
Admin (tcctl DEALER ↔ coordinator ROUTER): ADMIN → PROGRESS* → RESULT | ERROR.
Events (PUB): EVENT. Any request may be answered by ERROR.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from msgpack import packb

from . import ids
from .envelope import PROTOCOL
from .message import Message, opt, req
from .schema import Any_, Bin, Bool, Enum, Int, List, Map, Scalar, Str, Struct

_U64 = 2**63  # U64 below accepts 0 .. 2**63 - 1
MAX_MS = 2**53  # unix ms and durations stay well inside this
HEX64 = Str(64, ids.HEX64, 64, "sha256 hex digest")
_OPT_DIGEST_RE = re.compile(r"([0-9a-f]{64})?\Z")
_SESSION_RE = re.compile(r"[0-9a-f]{8,64}\Z")
OPT_DIGEST = Str(64, _OPT_DIGEST_RE, 0, "sha256 hex digest")
MSG_ID = Str(64, ids.MSG_ID, 1, "msg_id")
NODE_ID = Str(63, ids.NODE_ID, 1, "node id")
SESSION_ID = Str(64, _SESSION_RE, 8, "session id")
ENDPOINT = Str(256, re.compile(r"(tcp|ipc|inproc)://[!-~]+\Z"), 1, "endpoint")
U64 = Int(0, 2**63 - 1)
MS = Int(0, MAX_MS)
LABELS = Map(Str(256), Str(63, re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,62})\Z"), 1, "label key"), 64)
VERSIONS = Map(Str(256), Str(64, re.compile(r"[a-z_]{1,64}\Z"), 1, "version name"), 32)
FACTS = Map(Scalar(1024), Str(64, re.compile(r"[a-z_]{1,64}\Z"), 1, "fact name"), 64)
CAPABILITIES = Map(Bool(), Str(32, re.compile(r"[a-z_]{1,32}\Z"), 1, "capability"), 16)
# Heartbeat's inline path uses the very pattern objects of the validators above.
_MSG_ID_OK = ids.MSG_ID.match
_SESSION_OK = _SESSION_RE.match
_HEX64_OK = ids.HEX64.match
_OPT_DIGEST_OK = _OPT_DIGEST_RE.match
CATALOG_ID = Struct({"epoch": Str(64, re.compile(r"[0-9a-f]{0,64}\Z"), 0, "epoch"),
                     "seq": U64, "digest": OPT_DIGEST})
STORAGE = Struct({"total": U64, "used": U64, "free": U64})
ENTRY = Struct({"kind": Str(32, re.compile(r"[a-z_]{1,32}\Z"), 1, "entry kind"),
                "id": Str(256, re.compile(r"[!-~]{1,256}\Z"), 1, "entry id")},
               {"body": Map(Any_(), max_len=256)})
ERROR_BODY = Struct({"code": Int(0, 99_999), "name": Str(64), "message": Str(4096)},
                    {"details": Map(Any_(), max_len=256)})


# --- agent session -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Agent → coordinator, first message of a session (WIRE-6)."""
    TYPE = "HELLO"
    msg_id: str = req(MSG_ID)
    node_id: str = req(NODE_ID)
    address: str = req(Str(64, min_len=1))
    blob_endpoint: str = req(ENDPOINT)
    facts: dict[str, Any] = req(FACTS)
    versions: dict[str, str] = req(VERSIONS)
    labels: dict[str, str] = req(LABELS)
    capabilities: dict[str, bool] = req(CAPABILITIES)
    catalog: dict[str, Any] = req(CATALOG_ID)
    reconcile: dict[str, Any] | None = opt(Struct({}, {"missing": List(ENTRY, 100_000),
                                                       "orphans": List(Str(4096), 100_000)}))
    boot_ms: int | None = opt(MS)


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """Coordinator → agent: the session is live (WIRE-6). Intervals in ms."""
    TYPE = "WELCOME"
    parent_id: str = req(MSG_ID)
    session_id: str = req(SESSION_ID)
    heartbeat_interval: int = req(Int(10, 3_600_000))
    lease_ttl: int = req(Int(10, 86_400_000))
    want_full_catalog: bool = req(Bool())


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Agent → coordinator, once per effective interval; stays under 1 KiB (WIRE-8)."""
    TYPE = "HEARTBEAT"
    msg_id: str = req(MSG_ID)
    session_id: str = req(SESSION_ID)
    seq: int = req(U64)
    catalog_seq: int = req(U64)
    catalog_digest: str = req(OPT_DIGEST)
    versions_digest: str = req(HEX64)
    refs_digest: str = req(OPT_DIGEST)
    storage: dict[str, int] = req(STORAGE)
    mem_free: int = req(U64)
    sandboxes: int = req(Int(0, 1_000_000))

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "Heartbeat":
        """The hot path: the common, well-formed heartbeat is checked inline with the very same
        rules as the schema; anything it does not accept goes through the generic validator,
        which then names the exact field (so both paths accept and refuse the same bodies)."""
        g = body.get
        mid, sid, seq, cseq, cdig, vdig, rdig, st, mem, sbx = (
            g("msg_id"), g("session_id"), g("seq"), g("catalog_seq"), g("catalog_digest"),
            g("versions_digest"), g("refs_digest"), g("storage"), g("mem_free"), g("sandboxes"))
        if (type(mid) is str and _MSG_ID_OK(mid) and type(sid) is str and _SESSION_OK(sid)
                and type(seq) is int and 0 <= seq < _U64 and type(cseq) is int and 0 <= cseq < _U64
                and type(cdig) is str and _OPT_DIGEST_OK(cdig) and type(vdig) is str and _HEX64_OK(vdig)
                and type(rdig) is str and _OPT_DIGEST_OK(rdig) and type(mem) is int and 0 <= mem < _U64
                and type(sbx) is int and 0 <= sbx <= 1_000_000 and type(st) is dict):
            total, used, free = st.get("total"), st.get("used"), st.get("free")
            if (type(total) is int and type(used) is int and type(free) is int
                    and 0 <= total < _U64 and 0 <= used < _U64 and 0 <= free < _U64):
                obj = object.__new__(cls)
                for name, val in (("msg_id", mid), ("session_id", sid), ("seq", seq), ("catalog_seq", cseq),
                                  ("catalog_digest", cdig), ("versions_digest", vdig), ("refs_digest", rdig),
                                  ("storage", {"total": total, "used": used, "free": free}),
                                  ("mem_free", mem), ("sandboxes", sbx)):
                    object.__setattr__(obj, name, val)
                return obj
        return super(Heartbeat, cls).from_body(body)  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class HeartbeatAck(Message):
    """Coordinator → agent: the new interval (ms) if it changed, and what to send in full (WIRE-8)."""
    TYPE = "HEARTBEAT_ACK"
    parent_id: str = req(MSG_ID)
    interval: int | None = opt(Int(10, 3_600_000))
    wants: list[str] | None = opt(List(Enum(("catalog", "versions", "refs")), 3))

    @staticmethod
    def plain_frames(identity: bytes, parent_id: str) -> list[bytes]:
        """The common ACK (no new interval, nothing wanted) without building an instance: one
        per heartbeat, so it skips the dataclass. ``parent_id`` must be a msg_id that was
        validated on decode, which makes the result valid by construction."""
        return [identity, PROTOCOL, b"HEARTBEAT_ACK", packb({"parent_id": parent_id})]


@dataclass(frozen=True, slots=True)
class Versions(Message):
    """Agent → coordinator: the full versions map, sent when its digest changed (WIRE-9)."""
    TYPE = "VERSIONS"
    msg_id: str = req(MSG_ID)
    session_id: str = req(SESSION_ID)
    versions: dict[str, str] = req(VERSIONS)
    digest: str = req(HEX64)


@dataclass(frozen=True, slots=True)
class RuntimeRefs(Message):
    """Agent → coordinator: the node's complete runtime-ref report (WIRE-9, SNAP-19)."""
    TYPE = "RUNTIME_REFS"
    msg_id: str = req(MSG_ID)
    session_id: str = req(SESSION_ID)
    refs: list[dict[str, Any]] = req(List(Map(Any_(), max_len=64), 100_000))
    digest: str = req(OPT_DIGEST)


@dataclass(frozen=True, slots=True)
class CatalogSnapshot(Message):
    """Agent → coordinator: one page of a full catalog, tagged with its starting (epoch, seq) (CAT-5)."""
    TYPE = "CATALOG_SNAPSHOT"
    msg_id: str = req(MSG_ID)
    session_id: str = req(SESSION_ID)
    epoch: str = req(Str(64, re.compile(r"[0-9a-f]{1,64}\Z"), 1, "epoch"))
    seq: int = req(U64)
    page: int = req(Int(0, 1_000_000))
    last: bool = req(Bool())
    entries: list[dict[str, Any]] = req(List(ENTRY, 1000))
    digest: str = req(OPT_DIGEST)


@dataclass(frozen=True, slots=True)
class CatalogDelta(Message):
    """Agent → coordinator: committed catalog changes from_seq → to_seq (CAT-4)."""
    TYPE = "CATALOG_DELTA"
    msg_id: str = req(MSG_ID)
    session_id: str = req(SESSION_ID)
    epoch: str = req(Str(64, re.compile(r"[0-9a-f]{1,64}\Z"), 1, "epoch"))
    from_seq: int = req(U64)
    to_seq: int = req(U64)
    upserts: list[dict[str, Any]] = req(List(ENTRY, 10_000))
    deletes: list[dict[str, Any]] = req(List(ENTRY, 10_000))
    digest: str = req(OPT_DIGEST)


# --- tasks ---------------------------------------------------------------------------

TASK_OP = Str(32, re.compile(r"[A-Z_]{1,32}\Z"), 1, "task op")
TASK_ID = Str(28, ids.TASK_ID, 28, "task id")


@dataclass(frozen=True, slots=True)
class Task(Message):
    """Coordinator → agent: one unit of work, idempotent by task_id (WIRE-12, WIRE-13)."""
    TYPE = "TASK"
    msg_id: str = req(MSG_ID)
    task_id: str = req(TASK_ID)
    op: str = req(TASK_OP)
    args: dict[str, Any] = req(Map(Any_(), max_len=256))
    deadline: int = req(MS)


@dataclass(frozen=True, slots=True)
class TaskAccepted(Message):
    TYPE = "TASK_ACCEPTED"
    parent_id: str = req(MSG_ID)
    task_id: str = req(TASK_ID)


@dataclass(frozen=True, slots=True)
class TaskProgress(Message):
    TYPE = "TASK_PROGRESS"
    parent_id: str = req(MSG_ID)
    task_id: str = req(TASK_ID)
    progress: dict[str, Any] = req(Map(Any_(), max_len=64))


@dataclass(frozen=True, slots=True)
class TaskResult(Message):
    TYPE = "TASK_RESULT"
    parent_id: str = req(MSG_ID)
    task_id: str = req(TASK_ID)
    ok: bool = req(Bool())
    result: dict[str, Any] | None = opt(Map(Any_(), max_len=1000))
    error: dict[str, Any] | None = opt(ERROR_BODY)


@dataclass(frozen=True, slots=True)
class TaskCancel(Message):
    TYPE = "TASK_CANCEL"
    msg_id: str = req(MSG_ID)
    task_id: str = req(TASK_ID)


# --- admin ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Admin(Message):
    """tcctl → coordinator: run one admin command (WIRE-19)."""
    TYPE = "ADMIN"
    msg_id: str = req(MSG_ID)
    command: str = req(Str(64, re.compile(r"[a-z][a-z0-9-]*( [a-z][a-z0-9-]*){0,3}\Z"), 1, "command"))
    args: dict[str, Any] = req(Map(Any_(), max_len=128))


@dataclass(frozen=True, slots=True)
class Result(Message):
    """Coordinator → tcctl: the command's result."""
    TYPE = "RESULT"
    parent_id: str = req(MSG_ID)
    result: Any = req(Any_())


@dataclass(frozen=True, slots=True)
class Progress(Message):
    """Coordinator → tcctl: the command is still running (at least every 5 s, WIRE-19)."""
    TYPE = "PROGRESS"
    parent_id: str = req(MSG_ID)
    message: str | None = opt(Str(4096))
    data: dict[str, Any] | None = opt(Map(Any_(), max_len=256))


@dataclass(frozen=True, slots=True)
class Error(Message):
    """Any peer → requester: ``{code, name, message, details}`` from the one table (WIRE-4)."""
    TYPE = "ERROR"
    code: int = req(Int(0, 99_999))
    name: str = req(Str(64))
    message: str = req(Str(4096))
    details: dict[str, Any] = req(Map(Any_(), max_len=256))
    parent_id: str | None = opt(MSG_ID)

    @classmethod
    def of(cls, exc: Any, parent_id: str | None = None) -> "Error":
        w = exc.to_wire()
        return cls(code=w["code"], name=w["name"], message=w["message"][:4096],
                   details=w["details"], parent_id=parent_id)


# --- events --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Event(Message):
    """PUB: ``job.<id>``, ``node.<id>``, ``template.<id>``, ``snapshot.<id>`` with a per-coordinator seq (WIRE-18)."""
    TYPE = "EVENT"
    seq: int = req(U64)
    topic: str = req(Str(128, re.compile(r"(job|node|template|snapshot)\.[!-~]{1,120}\Z"), 1, "topic"))
    ts: int = req(MS)
    kind: str = req(Str(64, min_len=1))
    data: dict[str, Any] = req(Map(Any_(), max_len=256))
    epoch: str | None = opt(Str(64))


# --- artifact transfer (WIRE-16, WIRE-17, DIST-4, DIST-5, SEC-6) ----------------------
#
# Coordinator → source agent (session):  GRANT → GRANT_ACK; REVOKE (no reply).
# Target agent → coordinator (session):  TOKEN_REQUEST → TOKEN (or ERROR TransferTokenInvalid).
# Target DEALER → source blob ROUTER:     FETCH → CHUNK | ERROR (TransferTokenInvalid,
#                                         TransferTokenExpired, ArtifactNotFound, InvalidRequest).

ARTIFACT_ID = Str(28, ids.ARTIFACT_ID, 28, "artifact id")
TOKEN = Str(64, ids.HEX64, 64, "transfer token")  # 256 random bits as hex (SEC-6)
# The z85 public key of the target's CURVE pair, or "" when security.curve is off.
CURVE_KEY = Str(40, re.compile(r"([0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40})?\Z"), 0, "z85 public key")
# A file of an artifact, as listed in the catalog entry's ``files``; never a path (SEC-7).
FILE_NAME = Str(64, re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z"), 1, "artifact file name")
MAX_CHUNK = 1 << 20  # WIRE-16: one FETCH asks for at most 1 MiB


@dataclass(frozen=True, slots=True)
class Grant(Message):
    """Coordinator → source agent: serve ``artifact_id`` to ``target_node`` (key ``target_key``)
    with ``token`` until ``expires`` (unix ms) (DIST-4, SEC-6). Answered by GRANT_ACK."""
    TYPE = "GRANT"
    msg_id: str = req(MSG_ID)
    artifact_id: str = req(ARTIFACT_ID)
    token: str = req(TOKEN)
    expires: int = req(MS)
    target_node: str = req(NODE_ID)
    target_key: str = req(CURVE_KEY)


@dataclass(frozen=True, slots=True)
class GrantAck(Message):
    """Source agent → coordinator: the grant is live; FETCHes under it are served from now on."""
    TYPE = "GRANT_ACK"
    parent_id: str = req(MSG_ID)


@dataclass(frozen=True, slots=True)
class Revoke(Message):
    """Coordinator → source agent: drop the grants for ``artifact_id`` (to one target if given)."""
    TYPE = "REVOKE"
    msg_id: str = req(MSG_ID)
    artifact_id: str = req(ARTIFACT_ID)
    target_node: str | None = opt(NODE_ID)


@dataclass(frozen=True, slots=True)
class Fetch(Message):
    """Target → source blob ROUTER: ``length`` bytes of ``file`` from ``offset`` (WIRE-16)."""
    TYPE = "FETCH"
    msg_id: str = req(MSG_ID)
    artifact_id: str = req(ARTIFACT_ID)
    file: str = req(FILE_NAME)
    offset: int = req(U64)
    length: int = req(Int(1, MAX_CHUNK))
    token: str = req(TOKEN)


@dataclass(frozen=True, slots=True)
class Chunk(Message):
    """Source → target: the bytes of ``file`` at ``[offset, offset + length)``; ``sha256`` is their
    digest. ``zero``: the range is all zero bytes and ``data`` is empty (holes of a sparse file
    cross the wire as a flag). ``eof``: the range ends the file. ``length`` < the asked length
    only at the end of the file."""
    TYPE = "CHUNK"
    parent_id: str = req(MSG_ID)
    artifact_id: str = req(ARTIFACT_ID)
    file: str = req(FILE_NAME)
    offset: int = req(U64)
    length: int = req(Int(0, MAX_CHUNK))
    data: bytes = req(Bin(MAX_CHUNK))
    sha256: str = req(HEX64)
    eof: bool = req(Bool())
    zero: bool | None = opt(Bool())


@dataclass(frozen=True, slots=True)
class TokenRequest(Message):
    """Target agent → coordinator: the grant for this transfer expired, please renew it (DIST-5).
    The coordinator sends a new GRANT to ``source_node`` and TOKEN (or an ERROR) to the target."""
    TYPE = "TOKEN_REQUEST"
    msg_id: str = req(MSG_ID)
    artifact_id: str = req(ARTIFACT_ID)
    source_node: str = req(NODE_ID)
    task_id: str | None = opt(TASK_ID)


@dataclass(frozen=True, slots=True)
class TokenGrant(Message):
    """Coordinator → target agent: the renewed token for a TOKEN_REQUEST (DIST-5)."""
    TYPE = "TOKEN"
    parent_id: str = req(MSG_ID)
    artifact_id: str = req(ARTIFACT_ID)
    token: str = req(TOKEN)
    expires: int = req(MS)
