"""The one error table (SPEC §1) and the exception hierarchy by family.

Both daemons and the CLI import this module: a code is looked up here and nowhere else.
Every error crosses the wire as ``{code, name, message, details}``; codes are stable and
never reused. Each error name is an exception class whose base is its family, so callers
can catch a whole family (``except NotFound``) or one error (``except TemplateNotFound``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

__all__ = [
    "ErrorSpec", "ERRORS", "BY_CODE", "TCError", "ProtocolError", "InvalidInput",
    "AuthError", "Unavailable", "TimeoutError_", "NotFound", "Conflict", "Failed",
    "error_class", "from_wire",
]


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    name: str
    code: int
    family: str
    when: str


# name, code, family, when — copied from SPEC §1; the "when" text becomes the class docstring.
_TABLE: tuple[tuple[str, int, str, str], ...] = (
    ("Internal", 1000, "failed", "An unexpected fault. Details carry a log reference; no traceback crosses the wire."),
    ("UnsupportedProtocol", 1001, "protocol", "The first frame is TC<n> with n != 1."),
    ("MalformedMessage", 1002, "protocol", "Undecodable body, codec limit exceeded, or schema violated."),
    ("UnsupportedMessage", 1003, "protocol", "Unknown message type or admin command."),
    ("SessionUnknown", 1004, "protocol", "An agent message arrived without a live session; the agent must send HELLO."),
    ("InvalidRequest", 1005, "invalid", "An argument failed validation (details.field, details.reason)."),
    ("Unauthorized", 1006, "auth", "The key is rejected or not allowed on this endpoint, or the node id is bound to another key."),
    ("NodeKeyPending", 1007, "auth", "The agent's key awaits `tcctl node accept`."),
    ("NotLeader", 1008, "unavailable", "This coordinator is a standby (details.leader)."),
    ("TemplateStoreNotInitialized", 1009, "unavailable", "The database is unreachable or its schema is not at head."),
    ("Timeout", 1010, "timeout", "A deadline passed; details.job_id is set if the job keeps running."),
    ("TemplateNotFound", 2001, "not-found", "Unknown template or alias, or the template is hidden because it is DELETING."),
    ("TemplateIDRequired", 2002, "invalid", "A command that needs a template got none."),
    ("DuplicateTemplate", 2003, "conflict", "The alias is held by another template and --transfer was not given."),
    ("TemplateAttemptInProgress", 2004, "conflict", "An active job holds the resource, or a request id was reused with another payload or operation."),
    ("TemplateHasNoReadyReplica", 2005, "unavailable", "No usable READY replica on a placeable node."),
    ("TemplateStaleNeedsRedo", 2006, "conflict", "Every otherwise-usable READY replica is STALE (details.nodes, sorted)."),
    ("NoTemplateNodes", 2007, "unavailable", "No placeable node can be a target or builder."),
    ("NoFailedTemplateReplicas", 2008, "not-found", "A failed-only redo matched nothing."),
    ("TemplateInUse", 2009, "conflict", "Sandboxes created from the template still exist."),
    ("TemplateCleanupLocatorMissing", 2010, "conflict", "A replica or placement sits on an unknown or removed node."),
    ("TemplateNotReady", 2011, "conflict", "Alias claim on a template that is not READY."),
    ("InvalidAlias", 2012, "invalid", "The alias breaks CONV-1."),
    ("AliasNotApplicableToSnapshot", 2013, "invalid", "An alias was given for a snapshot."),
    ("JobNotFound", 2014, "not-found", "Unknown job."),
    ("JobCancelled", 2015, "failed", "Recorded on jobs ended by `job cancel` or --force."),
    ("JobInterrupted", 2016, "failed", "No progress for 2 h (GC-8)."),
    ("SnapshotNotFound", 3001, "not-found", "The snapshot is unknown, gone, or tombstoned (DELETED)."),
    ("SnapshotOperationNotFound", 3002, "not-found", "The job is missing or is not a SNAPSHOT_* job."),
    ("SnapshotNotReady", 3003, "conflict", "The snapshot is FAILED where READY is needed."),
    ("SnapshotSandboxMismatch", 3004, "conflict", "Rollback of a sandbox that is not the snapshot's origin."),
    ("SnapshotReplicaMetadataIncomplete", 3005, "unavailable", "The origin node's catalog does not list the snapshot."),
    ("NodeStorageBlocked", 3006, "unavailable", "The storage gate refused a write (reject, delete_only or unknown)."),
    ("NodeNotFound", 4001, "not-found", "Unknown node id or address."),
    ("NodeNotEligible", 4002, "conflict", "A named node is not placeable (details.nodes, sorted, each with a reason)."),
    ("NodeUnavailable", 4003, "unavailable", "A needed node is SUSPECT, LOST or disconnected, or a task went undelivered."),
    ("InsufficientStorage", 4004, "unavailable", "The node's free space is below what the operation needs."),
    ("ImageNotFound", 5001, "not-found", "No such repository, tag, digest, local path or platform."),
    ("ImageAuthFailed", 5002, "auth", "The registry refused the credentials, or they were not persisted (IMG-5)."),
    ("ImageRegistryUnavailable", 5003, "unavailable", "Connection errors, 429 or 5xx after the retries."),
    ("ImageDigestMismatch", 5004, "failed", "A manifest, config, blob or diff_id digest did not match."),
    ("ImageInvalid", 5005, "invalid", "Unsupported manifest or media type, a corrupt tar, or an entry breaking the unpack rules."),
    ("ImageLimitExceeded", 5006, "invalid", "Unpack byte, entry, path or xattr limit exceeded."),
    ("BuilderPreflightFailed", 5007, "failed", "Build tools are missing or unusable on the builder."),
    ("Ext4BuildFailed", 5008, "failed", "mke2fs or e2fsck failed (details: stderr tail)."),
    ("ArtifactNotFound", 5009, "not-found", "Unknown artifact, or no copy on the node asked."),
    ("ArtifactNotReady", 5010, "conflict", "The distribution guard refused (DIST-1)."),
    ("ArtifactChecksumMismatch", 5011, "failed", "A chunk or whole-file digest did not match after the retries."),
    ("ArtifactInUse", 5012, "conflict", "The node refuses to remove an artifact that a sandbox, replica or snapshot needs."),
    ("TransferTokenInvalid", 5013, "auth", "No grant matches the artifact, token and requesting key."),
    ("TransferTokenExpired", 5014, "auth", "The grant expired; the target asks for a new one."),
    ("SandboxNotFound", 6001, "not-found", "Unknown sandbox."),
    ("SandboxUnsupported", 6002, "unavailable", "The node's runtime driver is `none`."),
    ("SandboxNotRunning", 6003, "conflict", "The operation needs a RUNNING sandbox."),
    ("RuntimeFailed", 6004, "failed", "A VM start, restore, snapshot, export or rollback failed (details: stage, console tail)."),
    ("ProbeTimeout", 6005, "timeout", "The readiness probe did not pass in time."),
    ("ReplicaIncompatible", 6006, "conflict", "The pinned versions or facts differ from the node's at restore (COMPAT-7)."),
)

ERRORS: dict[str, ErrorSpec] = {n: ErrorSpec(n, c, f, w) for n, c, f, w in _TABLE}
BY_CODE: dict[int, ErrorSpec] = {s.code: s for s in ERRORS.values()}
assert len(BY_CODE) == len(ERRORS), "error codes must be unique"


class TCError(Exception):
    """Base of every templatecenter error; carries the wire form ``{code, name, message, details}``."""

    name: str = "Internal"
    code: int = 1000
    family: str = "failed"

    def __init__(self, message: str = "", details: Mapping[str, Any] | None = None) -> None:
        self.message = message or self.__class__.__doc__ or self.name
        self.details: dict[str, Any] = dict(details or {})
        super().__init__(self.message)

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "name": self.name, "message": self.message, "details": self.details}

    def __repr__(self) -> str:
        return f"{self.name}({self.message!r}, details={self.details!r})"


class ProtocolError(TCError):
    """The peer broke the wire protocol."""
    family = "protocol"


class InvalidInput(TCError):
    """A request or its input failed validation."""
    family = "invalid"


class AuthError(TCError):
    """The caller is not allowed, or its credentials were refused."""
    family = "auth"


class Unavailable(TCError):
    """Something the operation needs is not available now; a retry later may succeed."""
    family = "unavailable"


class TimeoutError_(TCError):
    """A deadline passed."""
    family = "timeout"


class NotFound(TCError):
    """The named object does not exist."""
    family = "not-found"


class Conflict(TCError):
    """The object's current state does not allow the operation."""
    family = "conflict"


class Failed(TCError):
    """The operation ran and failed."""
    family = "failed"


_FAMILIES: dict[str, type[TCError]] = {
    "protocol": ProtocolError, "invalid": InvalidInput, "auth": AuthError,
    "unavailable": Unavailable, "timeout": TimeoutError_, "not-found": NotFound,
    "conflict": Conflict, "failed": Failed,
}

_CLASSES: dict[str, type[TCError]] = {}
for _spec in ERRORS.values():
    _cls = type(_spec.name, (_FAMILIES[_spec.family],), {
        "__doc__": _spec.when, "name": _spec.name, "code": _spec.code, "__module__": __name__,
    })
    _CLASSES[_spec.name] = _cls
    globals()[_spec.name] = _cls
    __all__.append(_spec.name)


def error_class(name: str) -> type[TCError]:
    """The exception class for an error name from the table (KeyError if unknown)."""
    return _CLASSES[name]


def from_wire(err: Mapping[str, Any]) -> TCError:
    """Rebuild the exception a peer sent, by code, else by name; one known by neither becomes Internal."""
    spec = BY_CODE.get(err.get("code")) if isinstance(err.get("code"), int) else None
    if spec is None and isinstance(err.get("name"), str):
        spec = ERRORS.get(err["name"])
    cls = _CLASSES[spec.name] if spec else _CLASSES["Internal"]
    details = err.get("details") if isinstance(err.get("details"), Mapping) else {}
    msg = err.get("message") if isinstance(err.get("message"), str) else ""
    return cls(msg, details)


# Static names for type checkers and readers; the real classes are generated above.
Internal: type[TCError]
UnsupportedProtocol: type[TCError]
MalformedMessage: type[TCError]
UnsupportedMessage: type[TCError]
SessionUnknown: type[TCError]
InvalidRequest: type[TCError]
Unauthorized: type[TCError]
NodeKeyPending: type[TCError]
NotLeader: type[TCError]
TemplateStoreNotInitialized: type[TCError]
Timeout: type[TCError]
NodeNotFound: type[TCError]
NodeNotEligible: type[TCError]
NodeUnavailable: type[TCError]
