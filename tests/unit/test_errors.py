"""The one error table (SPEC §1 "Errors", WIRE-4) and the exception families."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from protocol import errors
from protocol.errors import BY_CODE, ERRORS, TCError, error_class, from_wire

SPEC_PATH = Path(__file__).parents[2].parent / "shared" / "SPEC.md"

# Used only when the shared SPEC.md is not next to the repository (a bare checkout).
FALLBACK_TABLE: tuple[tuple[str, int, str], ...] = (
    ("Internal", 1000, "failed"), ("UnsupportedProtocol", 1001, "protocol"),
    ("MalformedMessage", 1002, "protocol"), ("UnsupportedMessage", 1003, "protocol"),
    ("SessionUnknown", 1004, "protocol"), ("InvalidRequest", 1005, "invalid"),
    ("Unauthorized", 1006, "auth"), ("NodeKeyPending", 1007, "auth"),
    ("NotLeader", 1008, "unavailable"), ("TemplateStoreNotInitialized", 1009, "unavailable"),
    ("Timeout", 1010, "timeout"),
    ("TemplateNotFound", 2001, "not-found"), ("TemplateIDRequired", 2002, "invalid"),
    ("DuplicateTemplate", 2003, "conflict"), ("TemplateAttemptInProgress", 2004, "conflict"),
    ("TemplateHasNoReadyReplica", 2005, "unavailable"), ("TemplateStaleNeedsRedo", 2006, "conflict"),
    ("NoTemplateNodes", 2007, "unavailable"), ("NoFailedTemplateReplicas", 2008, "not-found"),
    ("TemplateInUse", 2009, "conflict"), ("TemplateCleanupLocatorMissing", 2010, "conflict"),
    ("TemplateNotReady", 2011, "conflict"), ("InvalidAlias", 2012, "invalid"),
    ("AliasNotApplicableToSnapshot", 2013, "invalid"), ("JobNotFound", 2014, "not-found"),
    ("JobCancelled", 2015, "failed"), ("JobInterrupted", 2016, "failed"),
    ("SnapshotNotFound", 3001, "not-found"), ("SnapshotOperationNotFound", 3002, "not-found"),
    ("SnapshotNotReady", 3003, "conflict"), ("SnapshotSandboxMismatch", 3004, "conflict"),
    ("SnapshotReplicaMetadataIncomplete", 3005, "unavailable"), ("NodeStorageBlocked", 3006, "unavailable"),
    ("NodeNotFound", 4001, "not-found"), ("NodeNotEligible", 4002, "conflict"),
    ("NodeUnavailable", 4003, "unavailable"), ("InsufficientStorage", 4004, "unavailable"),
    ("ImageNotFound", 5001, "not-found"), ("ImageAuthFailed", 5002, "auth"),
    ("ImageRegistryUnavailable", 5003, "unavailable"), ("ImageDigestMismatch", 5004, "failed"),
    ("ImageInvalid", 5005, "invalid"), ("ImageLimitExceeded", 5006, "invalid"),
    ("BuilderPreflightFailed", 5007, "failed"), ("Ext4BuildFailed", 5008, "failed"),
    ("ArtifactNotFound", 5009, "not-found"), ("ArtifactNotReady", 5010, "conflict"),
    ("ArtifactChecksumMismatch", 5011, "failed"), ("ArtifactInUse", 5012, "conflict"),
    ("TransferTokenInvalid", 5013, "auth"), ("TransferTokenExpired", 5014, "auth"),
    ("SandboxNotFound", 6001, "not-found"), ("SandboxUnsupported", 6002, "unavailable"),
    ("SandboxNotRunning", 6003, "conflict"), ("RuntimeFailed", 6004, "failed"),
    ("ProbeTimeout", 6005, "timeout"), ("ReplicaIncompatible", 6006, "conflict"),
)

_ROW = re.compile(r"^\|\s*([A-Za-z0-9]+)\s*\|\s*([0-9]+)\s*\|\s*([a-z-]+)\s*\|")


def spec_table() -> list[tuple[str, int, str]]:
    """The (name, code, family) rows of SPEC §1's error table, or the fallback list."""
    if not SPEC_PATH.exists():
        return list(FALLBACK_TABLE)
    text = SPEC_PATH.read_text(encoding="utf-8")
    start = text.index("**Errors.**")
    rows: list[tuple[str, int, str]] = []
    for line in text[start:].splitlines()[1:]:
        if rows and not line.startswith("|"):
            break  # the table ended
        m = _ROW.match(line)
        if m:
            rows.append((m.group(1), int(m.group(2)), m.group(3)))
    assert len(rows) > 50, f"could not parse the error table out of {SPEC_PATH}"
    return rows


TABLE = spec_table()

FAMILY_CLASSES = {
    "protocol": errors.ProtocolError, "invalid": errors.InvalidInput, "auth": errors.AuthError,
    "unavailable": errors.Unavailable, "timeout": errors.TimeoutError_, "not-found": errors.NotFound,
    "conflict": errors.Conflict, "failed": errors.Failed,
}


def test_table_matches_spec_exactly() -> None:
    """§1 errors / WIRE-4: the code table has exactly the spec's names, codes and families."""
    ours = sorted((s.name, s.code, s.family) for s in ERRORS.values())
    assert ours == sorted(TABLE)


def test_spec_table_itself_has_unique_names_and_codes() -> None:
    """§1: codes are stable and never reused — the spec table has no duplicate name or code."""
    names = [n for n, _, _ in TABLE]
    codes = [c for _, c, _ in TABLE]
    assert len(set(names)) == len(names)
    assert len(set(codes)) == len(codes)


def test_codes_unique_and_by_code_complete() -> None:
    """§1: every code maps back to exactly one name."""
    assert len(BY_CODE) == len(ERRORS)
    for spec in ERRORS.values():
        assert BY_CODE[spec.code] is spec


@pytest.mark.parametrize("name,code,family", TABLE, ids=[n for n, _, _ in TABLE])
def test_each_name_is_a_class_under_its_family(name: str, code: int, family: str) -> None:
    """§1 / STYLE 5: each error name is an exception class whose direct base is its family."""
    cls = error_class(name)
    assert getattr(errors, name) is cls
    assert cls.__name__ == name
    assert cls.__bases__ == (FAMILY_CLASSES[family],)
    assert issubclass(cls, TCError)
    assert (cls.name, cls.code, cls.family) == (name, code, family)
    assert cls.__doc__ and cls.__doc__.strip(), "each class is documented in one sentence"
    exc = cls("boom", {"field": "x"})
    assert exc.to_wire() == {"code": code, "name": name, "message": "boom", "details": {"field": "x"}}


@pytest.mark.parametrize("name", [n for n, _, _ in TABLE])
def test_from_wire_round_trip(name: str) -> None:
    """§1 / WIRE-4: ``{code, name, message, details}`` rebuilds the same exception class."""
    exc = error_class(name)("something went wrong", {"job_id": "job-" + "0" * 24, "n": 3})
    back = from_wire(exc.to_wire())
    assert type(back) is type(exc)
    assert back.message == "something went wrong"
    assert back.details == {"job_id": "job-" + "0" * 24, "n": 3}
    assert back.to_wire() == exc.to_wire()


def test_from_wire_code_wins_over_name() -> None:
    """§1: the code is the stable key; a mismatched name does not change the class."""
    back = from_wire({"code": 2001, "name": "JobNotFound", "message": "m", "details": {}})
    assert type(back) is errors.TemplateNotFound


@pytest.mark.parametrize("wire", [
    {"code": 9999, "name": "NoSuchError", "message": "m", "details": {}},
    {"code": 0, "message": "m"},
    {"code": "1001", "name": 5, "message": "m"},
    {"code": 1001.0, "message": "m"},
    {},
])
def test_from_wire_unknown_code_is_internal(wire: dict) -> None:
    """§1: an unknown code (and no known name) becomes Internal, never a crash."""
    back = from_wire(wire)
    assert type(back) is errors.Internal
    assert back.code == 1000 and back.name == "Internal"
    assert isinstance(back.details, dict)


def test_from_wire_tolerates_bad_message_and_details() -> None:
    """§1 / WIRE-5: a peer's garbage message or details does not break the rebuilt error."""
    back = from_wire({"code": 1005, "message": 12, "details": ["not", "a", "map"]})
    assert type(back) is errors.InvalidRequest
    assert back.details == {}
    assert isinstance(back.message, str) and back.message


def test_family_catch() -> None:
    """STYLE 5: callers can catch a whole family."""
    with pytest.raises(errors.NotFound):
        raise errors.TemplateNotFound("no such template")
    with pytest.raises(errors.ProtocolError):
        raise errors.MalformedMessage("bad")
    assert not issubclass(errors.TemplateNotFound, errors.Conflict)


def test_default_message_is_the_doc_sentence() -> None:
    """§1: an error raised without text still carries a human message."""
    exc = errors.NodeUnavailable()
    assert exc.message == errors.NodeUnavailable.__doc__
    assert exc.details == {}
