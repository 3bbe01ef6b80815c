"""Wire message schemas (SPEC WIRE-3, WIRE-4, WIRE-6, WIRE-8, WIRE-12, WIRE-19)."""
from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Callable

import msgpack
import pytest

from protocol import errors
from protocol.envelope import Envelope, parse
from protocol.errors import MalformedMessage
from protocol.message import REGISTRY, Message, body_msg_id, decode_message
from protocol.messages import (Admin, CatalogDelta, CatalogSnapshot, Chunk, Error, Event, Fetch, Grant, GrantAck,
                               Heartbeat, HeartbeatAck, Hello, Progress, Result, Revoke, RuntimeRefs, Task,
                               TaskAccepted, TaskCancel, TaskProgress, TaskResult, TokenGrant, TokenRequest,
                               Versions, Welcome)

H = "0123456789abcdef" * 4          # a sha256 hex digest
SID = "5f2b9c0e4a1d47e8b3c6d9f0a1b2c3d4"
TASK_ID = "tsk-" + "ab" * 12
MID = str(uuid.UUID("12345678-1234-4678-9234-567812345678"))


def _samples() -> dict[str, Message]:
    """One valid, fully populated instance per message type."""
    entry = {"kind": "artifact", "id": "art-" + "1" * 24, "body": {"size": 123, "sha256": H}}
    return {m.TYPE: m for m in [
        Hello(msg_id=MID, node_id="node-1", address="10.0.0.5", blob_endpoint="tcp://10.0.0.5:7713",
              facts={"cpu_model": "EPYC", "cores": 64, "reflink": True, "mem": 2**40, "load": 0.5},
              versions={"agent": "0.1.0", "guest_image": "gi-3", "hypervisor": "qemu-8.2"},
              labels={"rack": "r1", "zone": "eu-1"}, capabilities={"kvm": True, "reflink": False},
              catalog={"epoch": "abcd", "seq": 41, "digest": H},
              reconcile={"missing": [entry], "orphans": ["/var/lib/x/y"]}, boot_ms=1_700_000_000_000),
        Welcome(parent_id=MID, session_id=SID, heartbeat_interval=2000, lease_ttl=15000,
                want_full_catalog=True),
        Heartbeat(msg_id=MID, session_id=SID, seq=9, catalog_seq=41, catalog_digest=H, versions_digest=H,
                  refs_digest="", storage={"total": 10**12, "used": 4 * 10**11, "free": 6 * 10**11},
                  mem_free=2**34, sandboxes=3),
        HeartbeatAck(parent_id=MID, interval=1000, wants=["catalog", "refs"]),
        Versions(msg_id=MID, session_id=SID, versions={"agent": "0.1.0"}, digest=H),
        RuntimeRefs(msg_id=MID, session_id=SID, refs=[{"sandbox": "sbx-" + "2" * 24, "snapshot": "snap-" + "3" * 24}],
                    digest=H),
        CatalogSnapshot(msg_id=MID, session_id=SID, epoch="abcd", seq=41, page=0, last=True,
                        entries=[entry], digest=H),
        CatalogDelta(msg_id=MID, session_id=SID, epoch="abcd", from_seq=40, to_seq=41, upserts=[entry],
                     deletes=[{"kind": "replica", "id": "tpl-" + "4" * 24}], digest=H),
        Task(msg_id=MID, task_id=TASK_ID, op="FETCH_ARTIFACT",
             args={"artifact_id": "art-" + "1" * 24, "sources": ["node-2"], "blob": b"\x00\x01"},
             deadline=1_700_000_600_000),
        TaskAccepted(parent_id=MID, task_id=TASK_ID),
        TaskProgress(parent_id=MID, task_id=TASK_ID, progress={"bytes": 1024, "of": 4096}),
        TaskResult(parent_id=MID, task_id=TASK_ID, ok=False, result={"partial": True},
                   error={"code": 5011, "name": "ArtifactChecksumMismatch", "message": "bad chunk",
                          "details": {"offset": 0}}),
        TaskCancel(msg_id=MID, task_id=TASK_ID),
        Admin(msg_id=MID, command="template create", args={"image": "ubuntu:24.04", "nodes": ["a", "b"]}),
        Result(parent_id=MID, result={"template_id": "tpl-" + "5" * 24, "job_id": "job-" + "6" * 24}),
        Progress(parent_id=MID, message="distributing 2/3", data={"phase": "DISTRIBUTING", "progress": 70}),
        Error(code=4002, name="NodeNotEligible", message="node b is cordoned",
              details={"nodes": [{"node": "b", "reason": "CORDONED"}]}, parent_id=MID),
        Event(seq=12, topic="job.job-" + "6" * 24, ts=1_700_000_000_123, kind="progress",
              data={"progress": 70}, epoch="e1"),
        # artifact transfer (WIRE-16, DIST-4, DIST-5)
        Grant(msg_id=MID, artifact_id="art-" + "1" * 24, token=H, expires=1_700_003_600_000,
              target_node="node-2", target_key="rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"),
        GrantAck(parent_id=MID),
        Revoke(msg_id=MID, artifact_id="art-" + "1" * 24, target_node="node-2"),
        Fetch(msg_id=MID, artifact_id="art-" + "1" * 24, file="rootfs.ext4", offset=1 << 20, length=1 << 20,
              token=H),
        Chunk(parent_id=MID, artifact_id="art-" + "1" * 24, file="rootfs.ext4", offset=1 << 20, length=4,
              data=b"\x00\x01\x02\x03", sha256=H, eof=True, zero=False),
        TokenRequest(msg_id=MID, artifact_id="art-" + "1" * 24, source_node="node-1", task_id=TASK_ID),
        TokenGrant(parent_id=MID, artifact_id="art-" + "1" * 24, token=H, expires=1_700_003_600_000),
    ]}


SAMPLES = _samples()
TYPES = sorted(SAMPLES)


def _fields(cls: type[Message]) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))  # type: ignore[arg-type]


def _required(cls: type[Message]) -> list[str]:
    return [f.name for f in _fields(cls) if f.metadata["req"]]


def _wire(msg_type: str, body: dict[str, Any]) -> Message:
    return decode_message(Envelope(None, msg_type, msgpack.packb(body, use_bin_type=True)))


def test_every_registered_type_has_a_sample() -> None:
    """WIRE-3: the round-trip tests below cover every class in the registry."""
    assert set(REGISTRY) == set(SAMPLES)
    for name, cls in REGISTRY.items():
        assert cls.TYPE == name
        assert type(SAMPLES[name]) is cls


@pytest.mark.parametrize("msg_type", TYPES)
def test_round_trip(msg_type: str) -> None:
    """WIRE-3: encode → frames → parse → decode gives an equal instance of the same class."""
    msg = SAMPLES[msg_type]
    env = parse(msg.to_frames(identity=b"peer"), router=True)
    assert env.msg_type == msg_type
    back = decode_message(env)
    assert type(back) is type(msg)
    assert back == msg
    assert back.to_body() == msg.to_body()


@pytest.mark.parametrize("msg_type", TYPES)
def test_unknown_fields_are_ignored(msg_type: str) -> None:
    """WIRE-3: a newer peer may add fields; they are ignored, not rejected."""
    msg = SAMPLES[msg_type]
    body = {**msg.to_body(), "zz_future_field": {"x": [1, 2]}, "another": b"\x00"}
    back = _wire(msg_type, body)
    assert back == msg
    assert "zz_future_field" not in back.to_body()


def test_unknown_nested_struct_fields_are_dropped() -> None:
    """WIRE-3: unknown keys inside a fixed struct (catalog, storage) are dropped too."""
    body = SAMPLES["HEARTBEAT"].to_body()
    body["storage"] = {**body["storage"], "inodes": 5}
    back = _wire("HEARTBEAT", body)
    assert back.storage == {"total": 10**12, "used": 4 * 10**11, "free": 6 * 10**11}


@pytest.mark.parametrize("msg_type,field", [(t, f) for t in TYPES for f in _required(REGISTRY[t])])
def test_missing_required_field(msg_type: str, field: str) -> None:
    """WIRE-3: a missing required field gets MalformedMessage with details.field naming it."""
    body = SAMPLES[msg_type].to_body()
    del body[field]
    with pytest.raises(MalformedMessage) as ei:
        _wire(msg_type, body)
    assert ei.value.details["field"] == field
    assert ei.value.details["reason"] == "required"


@pytest.mark.parametrize("msg_type,field", [(t, f) for t in TYPES for f in _required(REGISTRY[t])])
def test_null_required_field(msg_type: str, field: str) -> None:
    """WIRE-3: an explicit nil for a required field is the same as missing."""
    body = SAMPLES[msg_type].to_body()
    body[field] = None
    with pytest.raises(MalformedMessage) as ei:
        _wire(msg_type, body)
    assert ei.value.details["field"] == field


def _wrong_type(value: Any) -> list[Any]:
    """Values of a different wire type than ``value``."""
    if isinstance(value, bool):
        return ["true", 1, [True]]
    if isinstance(value, int):
        return ["7", 7.5, True, [7], b"\x07"]
    if isinstance(value, str):
        return [7, b"x", ["x"], {"x": 1}]
    if isinstance(value, dict):
        return ["x", 7, [value]]
    if isinstance(value, list):
        return ["x", 7, {"0": 1}]
    if isinstance(value, bytes):
        return ["x", 7, [value]]
    raise AssertionError(f"no wrong-type values for {value!r}")


_TYPED = [(t, f.name) for t in TYPES for f in _fields(REGISTRY[t])
          # RESULT.result is deliberately any value (the command's result)
          if getattr(SAMPLES[t], f.name) is not None and (t, f.name) != ("RESULT", "result")]


@pytest.mark.parametrize("msg_type,field", _TYPED)
def test_wrong_type(msg_type: str, field: str) -> None:
    """WIRE-3: a field of the wrong type gets MalformedMessage with details.field inside that field."""
    for bad in _wrong_type(getattr(SAMPLES[msg_type], field)):
        body = {**SAMPLES[msg_type].to_body(), field: bad}
        with pytest.raises(MalformedMessage) as ei:
            _wire(msg_type, body)
        got = ei.value.details["field"]
        assert got == field or got.startswith(field + ".") or got.startswith(field + "["), (bad, got)


@pytest.mark.parametrize("body_patch,field", [
    ({"catalog": {"epoch": "abcd", "digest": H}}, "catalog.seq"),
    ({"catalog": {"epoch": "abcd", "seq": -1, "digest": H}}, "catalog.seq"),
    ({"labels": {"rack": 5}}, "labels.rack"),
    ({"labels": {"bad key!": "x"}}, "labels.<key>"),
    ({"node_id": "Node_1"}, "node_id"),
    ({"blob_endpoint": "http://x"}, "blob_endpoint"),
    ({"reconcile": {"missing": [{"kind": "artifact"}]}}, "reconcile.missing[0].id"),
])
def test_nested_field_paths(body_patch: dict, field: str) -> None:
    """WIRE-3: details.field is the dotted path of the offending value."""
    body = {**SAMPLES["HELLO"].to_body(), **body_patch}
    with pytest.raises(MalformedMessage) as ei:
        _wire("HELLO", body)
    assert ei.value.details["field"] == field


def test_bool_is_not_an_integer() -> None:
    """WIRE-3: True is not a seq number, even though Python's bool is an int."""
    body = {**SAMPLES["HEARTBEAT"].to_body(), "seq": True}
    with pytest.raises(MalformedMessage) as ei:
        _wire("HEARTBEAT", body)
    assert ei.value.details["field"] == "seq"


def test_enum_values_are_checked() -> None:
    """WIRE-8: HEARTBEAT_ACK.wants only names catalog, versions or refs."""
    with pytest.raises(MalformedMessage) as ei:
        _wire("HEARTBEAT_ACK", {"parent_id": MID, "wants": ["catalog", "everything"]})
    assert ei.value.details["field"] == "wants[1]"


def test_validated_on_construction_before_encode() -> None:
    """WIRE-3: an invalid instance cannot be built, so nothing invalid is ever encoded."""
    with pytest.raises(MalformedMessage) as ei:
        TaskAccepted(parent_id=MID, task_id="tsk-short")
    assert ei.value.details["field"] == "task_id"
    with pytest.raises(MalformedMessage) as ei:
        TaskCancel(msg_id=MID, task_id=None)  # type: ignore[arg-type]
    assert ei.value.details["field"] == "task_id"


# --- WIRE-4: msg_id and parent_id ----------------------------------------------------------

@pytest.mark.parametrize("msg_id,ok", [
    ("m", True), ("x" * 64, True), ("x" * 65, False), ("", False), ("has space", False),
    ("ünïcode", False), ("tab\t", False),
])
def test_msg_id_format(msg_id: str, ok: bool) -> None:
    """WIRE-4: msg_id is at most 64 printable characters."""
    body = {**SAMPLES["TASK_CANCEL"].to_body(), "msg_id": msg_id}
    if ok:
        assert _wire("TASK_CANCEL", body).msg_id == msg_id
    else:
        with pytest.raises(MalformedMessage) as ei:
            _wire("TASK_CANCEL", body)
        assert ei.value.details["field"] == "msg_id"


@pytest.mark.parametrize("msg_type", TYPES)
def test_requests_carry_msg_id_and_replies_parent_id(msg_type: str) -> None:
    """WIRE-4: requests carry msg_id; replies, progress, results carry the parent_id they answer."""
    names = {f.name for f in _fields(REGISTRY[msg_type])}
    required = set(_required(REGISTRY[msg_type]))
    if msg_type == "EVENT":
        assert not names & {"msg_id", "parent_id"}  # PUB has no requester
    elif msg_type == "ERROR":
        assert "parent_id" in names  # optional: an error may answer an undecodable message
    elif msg_type in {"WELCOME", "HEARTBEAT_ACK", "TASK_ACCEPTED", "TASK_PROGRESS", "TASK_RESULT",
                      "RESULT", "PROGRESS", "GRANT_ACK", "CHUNK", "TOKEN"}:
        assert "parent_id" in required and "msg_id" not in names
    else:
        assert "msg_id" in required and "parent_id" not in names


def test_body_msg_id_best_effort() -> None:
    """WIRE-4: an error answering a schema-broken request still finds its msg_id."""
    assert body_msg_id(Envelope(None, "TASK", msgpack.packb({"msg_id": "m-9", "task_id": 5}))) == "m-9"
    assert body_msg_id(Envelope(None, "TASK", msgpack.packb({"msg_id": "x" * 65}))) is None
    assert body_msg_id(Envelope(None, "TASK", b"\xc1")) is None


# --- immutability -------------------------------------------------------------------

@pytest.mark.parametrize("msg_type", TYPES)
def test_instances_are_frozen(msg_type: str) -> None:
    """WIRE-3 / STYLE 3: one frozen class per message type."""
    msg = SAMPLES[msg_type]
    first = _fields(type(msg))[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(msg, first, getattr(msg, first))
    # A new attribute is refused too. On CPython 3.11 a frozen *slots* dataclass raises
    # TypeError here instead of FrozenInstanceError (a CPython quirk); either way it is refused.
    with pytest.raises((dataclasses.FrozenInstanceError, TypeError)):
        setattr(msg, "new_attribute", 1)
    assert not hasattr(msg, "new_attribute")


# --- WIRE-8: heartbeat size ---------------------------------------------------------

def test_heartbeat_under_1kib_realistic() -> None:
    """WIRE-8: a heartbeat with realistic values encodes to < 1 KiB."""
    hb = Heartbeat(msg_id=str(uuid.uuid4()), session_id=SID, seq=1_234_567, catalog_seq=98_765,
                   catalog_digest=H, versions_digest=H, refs_digest=H,
                   storage={"total": 4 * 2**40, "used": 3 * 2**40, "free": 2**40},
                   mem_free=200 * 2**30, sandboxes=64)
    assert len(hb.encode()) < 1024
    assert sum(len(f) for f in hb.to_frames(identity=b"node-1")) < 1024


def test_heartbeat_under_1kib_worst_case() -> None:
    """WIRE-8: even every field at its schema maximum stays under 1 KiB."""
    big = 2**63 - 1
    hb = Heartbeat(msg_id="m" * 64, session_id="f" * 64, seq=big, catalog_seq=big, catalog_digest=H,
                   versions_digest=H, refs_digest=H, storage={"total": big, "used": big, "free": big},
                   mem_free=big, sandboxes=1_000_000)
    assert len(hb.encode()) < 1024


# --- Error.of -------------------------------------------------------------------------

@pytest.mark.parametrize("exc", [
    errors.NodeNotEligible("node b is cordoned", {"nodes": [{"node": "b", "reason": "CORDONED"}]}),
    errors.Timeout("wait timed out", {"job_id": "job-" + "6" * 24}),
    errors.InvalidRequest("bad alias", {"field": "alias", "reason": "format"}),
    errors.Internal(),
], ids=lambda e: e.name)
def test_error_of_exception(exc: errors.TCError) -> None:
    """WIRE-4 / §1: ERROR carries {code, name, message, details} from the one table."""
    msg = Error.of(exc, parent_id=MID)
    assert (msg.code, msg.name, msg.message, msg.details) == (exc.code, exc.name, exc.message, exc.details)
    assert msg.parent_id == MID
    back = decode_message(parse(msg.to_frames(), router=False))
    assert back == msg
    again = errors.from_wire(back.to_body())
    assert type(again) is type(exc)
    assert again.details == exc.details


def test_error_of_without_parent() -> None:
    """WIRE-4: an error answering an undecodable message may have no parent_id."""
    msg = Error.of(errors.MalformedMessage("undecodable body", {"field": "body", "reason": "decode"}))
    assert msg.parent_id is None
    assert "parent_id" not in msg.to_body()
    assert msg.details == {"field": "body", "reason": "decode"}


def test_error_of_long_message_is_truncated() -> None:
    """WIRE-4: a huge exception text still produces a valid ERROR (message capped at 4096)."""
    msg = Error.of(errors.RuntimeFailed("x" * 10_000))
    assert msg.message == "x" * 4096
    assert decode_message(parse(msg.to_frames(), router=False)) == msg


@pytest.mark.parametrize("make", [
    lambda: Progress(parent_id=MID),
    lambda: HeartbeatAck(parent_id=MID),
    lambda: TaskResult(parent_id=MID, task_id=TASK_ID, ok=True),
], ids=["progress", "heartbeat_ack", "task_result"])
def test_optional_fields_absent(make: Callable[[], Message]) -> None:
    """WIRE-3: optional fields left out are not sent and decode back as absent."""
    msg = make()
    body = msg.to_body()
    assert all(v is not None for v in body.values())
    assert decode_message(parse(msg.to_frames(), router=False)) == msg
