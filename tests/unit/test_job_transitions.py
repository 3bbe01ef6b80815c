"""The allowed-transition tables and their one function each (CONV-4, CONV-5, CONV-6, CONV-8, TPL-12).

Every pair of statuses is tried: pairs in the table are applied by compare-and-set, all others
are refused, logged as Internal, and leave the row untouched. In-memory SQLite with the models'
tables (the migration itself is checked against the models in tests/integration/test_job_store.py).
"""
from __future__ import annotations

import itertools
import logging

import pytest
from sqlalchemy import create_engine, insert, select
from sqlalchemy.orm import Session

from coordinator.db.models import Artifact, Base, Job, Template
from coordinator.jobs import transitions as tr

JOB_OK = {("PENDING", "RUNNING"), ("PENDING", "FAILED"), ("RUNNING", "READY"), ("RUNNING", "FAILED")}
TPL_OK = ({(s, t) for s in ("PENDING", "READY", "PARTIALLY_READY", "FAILED")
           for t in ("READY", "PARTIALLY_READY", "FAILED", "DELETING")})
ART_OK = {("BUILDING", "READY"), ("PENDING", "READY"), ("BUILDING", "FAILED"), ("PENDING", "FAILED"),
          ("BUILDING", "ORPHANED"), ("PENDING", "ORPHANED"), ("READY", "CLEANUP_PENDING"),
          ("CLEANUP_PENDING", "READY"), ("READY", "FAILED"), ("FAILED", "BUILDING"), ("ORPHANED", "BUILDING"),
          ("CLEANUP_PENDING", "BUILDING"), ("READY", "BUILDING")}


@pytest.fixture
def session():
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        yield s
    engine.dispose()


def add_job(s: Session, status: str, *, job_id: str = "job-1", progress: int = 0, owner: str | None = None) -> None:
    s.execute(insert(Job).values(
        id=job_id, operation="CREATE", resource_type="template", resource_id="tpl-1", request_id="r1",
        attempt_no=1, status=status, phase="PULLING", progress=progress, step="", step_state={}, scope=[],
        pull_progress={}, request={}, request_digest="", cancel_requested=False, owner=owner,
        created_ms=0, last_progress_ms=0, nodes_expected=0, nodes_ready=0, nodes_failed=0, nodes_pending=0))


def job(s: Session, job_id: str = "job-1") -> Job:
    s.expire_all()
    return s.execute(select(Job).where(Job.id == job_id)).scalar_one()


def test_tables_are_the_spec() -> None:
    assert set(tr.JOB_TRANSITIONS) == JOB_OK
    assert set(tr.TEMPLATE_TRANSITIONS) == TPL_OK
    assert set(tr.ARTIFACT_TRANSITIONS) == ART_OK


@pytest.mark.parametrize("a,b", list(itertools.product(tr.JOB_STATUSES, repeat=2)))
def test_job_pairs(session: Session, caplog: pytest.LogCaptureFixture, a: str, b: str) -> None:
    add_job(session, a, progress=30)
    err = {"name": "Ext4BuildFailed", "message": "mke2fs failed"} if b == "FAILED" else None
    fields = {"error": err} if err else {}
    with caplog.at_level(logging.ERROR, logger="coordinator.jobs.transitions"):
        ok = tr.transition_job(session, "job-1", a, b, now=1234, **fields)
    row = job(session)
    if (a, b) in JOB_OK:
        assert ok and row.status == b and row.last_progress_ms == 1234
        if b in ("READY", "FAILED"):
            assert row.progress == 100 and row.finished_ms == 1234  # CONV-5
        if b == "READY":
            assert row.phase == "READY" and row.error is None
        if b == "FAILED":
            assert row.error == err
        if b == "RUNNING":
            assert row.started_ms == 1234 and row.progress == 30
    else:
        assert not ok and row.status == a and row.progress == 30 and row.last_progress_ms == 0
        assert any("Internal: refused job transition" in r.getMessage() for r in caplog.records)


def test_job_cas_loses_on_a_different_current_status(session: Session) -> None:
    add_job(session, "RUNNING")
    assert not tr.transition_job(session, "job-1", "PENDING", "RUNNING")  # allowed pair, wrong from
    assert job(session).status == "RUNNING"
    assert not tr.transition_job(session, "job-nope", "RUNNING", "READY")


def test_job_owner_fence(session: Session) -> None:
    add_job(session, "RUNNING", owner="a")
    assert not tr.transition_job(session, "job-1", "RUNNING", "READY", expect_owner="b")
    assert tr.transition_job(session, "job-1", "RUNNING", "READY", expect_owner="a")


def test_failed_end_gets_a_non_empty_error(session: Session) -> None:
    add_job(session, "RUNNING", progress=10)
    assert tr.transition_job(session, "job-1", "RUNNING", "FAILED", error={"name": "", "message": ""})
    row = job(session)
    assert row.error == {"name": "Internal", "message": "job failed"} and row.progress == 100


def test_progress_never_decreases(session: Session) -> None:
    add_job(session, "RUNNING", progress=40)
    assert tr.update_active_job(session, "job-1", progress=20, phase="UNPACKING")
    assert job(session).progress == 40 and job(session).phase == "UNPACKING"
    assert tr.update_active_job(session, "job-1", progress=60)
    assert job(session).progress == 60
    assert tr.update_active_job(session, "job-1", progress=500)
    assert job(session).progress == 100


def test_terminal_jobs_are_not_updated(session: Session) -> None:
    add_job(session, "READY", progress=100)
    assert not tr.update_active_job(session, "job-1", phase="PULLING", progress=5)
    row = job(session)
    assert row.status == "READY" and row.phase == "PULLING" and row.progress == 100


def test_unknown_columns_are_refused(session: Session) -> None:
    add_job(session, "PENDING")
    with pytest.raises(ValueError):
        tr.transition_job(session, "job-1", "PENDING", "RUNNING", no_such_column=1)


def test_job_values_pure() -> None:
    v = tr.job_values("RUNNING", "READY", {"progress": 50, "phase": "DISTRIBUTING"}, 7)
    assert v["phase"] == "READY" and v["progress"] == 100 and v["error"] is None and v["finished_ms"] == 7
    v = tr.job_values("RUNNING", "FAILED", {}, 7)
    assert v["error"]["name"] == "Internal" and v["error"]["message"] and v["progress"] == 100


# ---- templates ----

def add_template(s: Session, status: str, alias: str | None = "web") -> None:
    s.execute(insert(Template).values(id="tpl-1", alias=alias, status=status, source_kind="image", image_ref="",
                                      manifest_digest="", spec={}, runtime_config={}, last_error="",
                                      created_ms=0, updated_ms=0))


@pytest.mark.parametrize("a,b", list(itertools.product(tr.TEMPLATE_STATUSES, repeat=2)))
def test_template_pairs(session: Session, caplog: pytest.LogCaptureFixture, a: str, b: str) -> None:
    add_template(session, a)
    with caplog.at_level(logging.ERROR, logger="coordinator.jobs.transitions"):
        ok = tr.transition_template(session, "tpl-1", a, b, now=99)
    session.expire_all()
    row = session.execute(select(Template)).scalar_one()
    if (a, b) in TPL_OK:
        assert ok and row.status == b and row.updated_ms == 99
        assert row.alias == (None if b == "DELETING" else "web")  # TPL-27: DELETING releases the alias
    else:
        assert not ok and row.status == a and row.alias == "web" and row.updated_ms == 0
        assert any("Internal: refused template transition" in r.getMessage() for r in caplog.records)


# ---- artifacts ----

def add_artifact(s: Session, status: str, owner: str | None = "job-a", generation: int = 3) -> None:
    s.execute(insert(Artifact).values(id="art-1", kind="rootfs", fingerprint="f" * 64, status=status,
                                      owner_job_id=owner, generation=generation, sha256="", size=0, files=[],
                                      image_config={}, manifest_digest="", created_ms=0, updated_ms=0))


def art(s: Session) -> Artifact:
    s.expire_all()
    return s.execute(select(Artifact)).scalar_one()


@pytest.mark.parametrize("a,b", list(itertools.product(tr.ARTIFACT_STATUSES, repeat=2)))
def test_artifact_pairs(session: Session, caplog: pytest.LogCaptureFixture, a: str, b: str) -> None:
    add_artifact(session, a)
    fields = {"owner_job_id": "job-b"} if b == "BUILDING" else {}
    with caplog.at_level(logging.ERROR, logger="coordinator.jobs.transitions"):
        ok = tr.transition_artifact(session, "art-1", a, b, expect_owner="job-a", expect_generation=3, **fields)
    row = art(session)
    if (a, b) in ART_OK:
        assert ok and row.status == b
        if b == "BUILDING":
            assert row.generation == 4 and row.owner_job_id == "job-b"  # a new claim (TPL-9)
        else:
            assert row.generation == 3
    else:
        assert not ok and row.status == a and row.generation == 3
        assert any("Internal: refused artifact transition" in r.getMessage() for r in caplog.records)


def test_artifact_ready_is_fenced_on_owner_and_generation(session: Session) -> None:
    """TPL-12: a stale claimer (older generation or another owner) loses; the claimer wins."""
    add_artifact(session, "BUILDING", owner="job-b", generation=4)
    assert not tr.transition_artifact(session, "art-1", "BUILDING", "READY")  # no fence: refused
    assert not tr.transition_artifact(session, "art-1", "BUILDING", "READY", expect_owner="job-a",
                                      expect_generation=3)
    assert not tr.transition_artifact(session, "art-1", "BUILDING", "READY", expect_owner="job-b",
                                      expect_generation=3)
    assert art(session).status == "BUILDING"
    assert tr.transition_artifact(session, "art-1", "BUILDING", "READY", expect_owner="job-b",
                                  expect_generation=4, sha256="a" * 64, size=10, gc_deadline_ms=5)
    row = art(session)
    assert row.status == "READY" and row.sha256 == "a" * 64 and row.gc_deadline_ms == 5


def test_artifact_claim_needs_an_owner(session: Session) -> None:
    add_artifact(session, "FAILED")
    assert not tr.transition_artifact(session, "art-1", "FAILED", "BUILDING")
    assert art(session).status == "FAILED"
