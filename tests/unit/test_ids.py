"""Identifier formats and generators (SPEC CONV-1)."""
from __future__ import annotations

import hashlib
import re
import uuid

import pytest

from protocol import ids

HEX24 = "0123456789abcdef01234567"

VALID = {
    "node": ["a", "0", "node-1", "n" * 63, "a" * 62 + "1", "host-01-rack-7", "1-2"],
    "template": ["tpl-" + HEX24, "tpl-" + "f" * 24],
    "snapshot": ["snap-" + HEX24],
    "sandbox": ["sbx-" + HEX24],
    "job": ["job-" + HEX24],
    "artifact": ["art-" + HEX24],
    "task": ["tsk-" + HEX24],
    "request": ["a", "A", str(uuid.UUID(int=0)), "req.1:2_3-4", "Z" + "x" * 127],
    "alias": ["ubuntu", "python-3-12", "a", "0", "a" * 64, "tp-1", "snapshot", "sbx", "tpl"],
}

INVALID = {
    "node": ["", "-a", "a-", "A", "node_1", "n" * 64, "node.example", "nöde", "a\n", " a", 5, None],
    "template": ["tpl-" + HEX24[:-1], "tpl-" + HEX24 + "0", "TPL-" + HEX24, "tpl-" + HEX24.upper(),
                 "tpl_" + HEX24, "snap-" + HEX24, "tpl-" + "g" * 24, "tpl-" + HEX24 + "\n"],
    "snapshot": ["snap-" + HEX24[:20], "snp-" + HEX24, "tpl-" + HEX24],
    "sandbox": ["sbx-" + "x" * 24, "sbx-", "sandbox-" + HEX24],
    "job": ["job-" + HEX24 + "a", "job" + HEX24, b"job-" + HEX24.encode()],
    "artifact": ["art-" + "A" * 24, "art-" + HEX24[:23]],
    "task": ["tsk-" + HEX24[:-2], "task-" + HEX24],
    "request": ["", "-abc", ".abc", "a b", "a/b", "Z" + "x" * 128, "é", "a\n"],
    "alias": ["", "-a", "Ubuntu", "a_b", "a" * 65, "tpl-foo", "snap-x", "sbx-1", "a.b", "tpl-" + HEX24],
}


@pytest.mark.parametrize("kind,value", [(k, v) for k, vs in VALID.items() for v in vs])
def test_valid_examples(kind: str, value: str) -> None:
    """CONV-1: each documented format accepts well-formed ids."""
    assert ids.valid(kind, value)


@pytest.mark.parametrize("kind,value", [(k, v) for k, vs in INVALID.items() for v in vs])
def test_invalid_examples(kind: str, value: object) -> None:
    """CONV-1: each format refuses malformed ids (wrong prefix, length, case, charset, type)."""
    assert not ids.valid(kind, value)


def test_every_kind_has_examples() -> None:
    """CONV-1: the examples above cover every kind the module knows."""
    assert set(VALID) == set(ids.KINDS) == set(INVALID)


@pytest.mark.parametrize("prefix,kind", [("tpl", "template"), ("snap", "snapshot"), ("sbx", "sandbox"),
                                         ("job", "job")])
def test_new_id_format(prefix: str, kind: str) -> None:
    """CONV-1: coordinator ids are prefix + 24 lowercase hex, random."""
    made = {ids.new_id(prefix) for _ in range(50)}
    assert len(made) == 50
    for value in made:
        assert re.fullmatch(rf"{prefix}-[0-9a-f]{{24}}", value)
        assert ids.valid(kind, value)


def test_task_id_deterministic() -> None:
    """CONV-1 / WIRE-13: tsk- + first 24 hex of sha256(job id, step, node id, try); same inputs, same id."""
    job = "job-" + HEX24
    a = ids.task_id(job, "distribute", "node-1", 0)
    assert a == ids.task_id(job, "distribute", "node-1", 0)
    assert ids.valid("task", a)
    expected = hashlib.sha256("\x00".join((job, "distribute", "node-1", "0")).encode()).hexdigest()[:24]
    assert a == "tsk-" + expected


@pytest.mark.parametrize("other", [
    ("job-" + "1" * 24, "distribute", "node-1", 0),
    ("job-" + HEX24, "build", "node-1", 0),
    ("job-" + HEX24, "distribute", "node-2", 0),
    ("job-" + HEX24, "distribute", "node-1", 1),
    # The separator keeps ("ab", "c") and ("a", "bc") apart.
    ("job-" + HEX24, "distributen", "ode-1", 0),
])
def test_task_id_depends_on_every_input(other: tuple) -> None:
    """CONV-1: a different job, step, node or try gives a different task id."""
    base = ids.task_id("job-" + HEX24, "distribute", "node-1", 0)
    assert ids.task_id(*other) != base


def test_new_request_id_is_a_valid_request_id() -> None:
    """CONV-1: tcctl's generated request id (a UUID4) is a valid request id."""
    rid = ids.new_request_id()
    assert ids.valid("request", rid)
    assert uuid.UUID(rid).version == 4
    assert rid != ids.new_request_id()
