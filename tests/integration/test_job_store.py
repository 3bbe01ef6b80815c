"""Job submission, idempotency, attempts, the one-active-job rule and progress throttling against
SQLite and PostgreSQL (TPL-4..TPL-7, TPL-32, TPL-33, HA-1)."""
from __future__ import annotations

import threading

import pytest

from tests.support import Clock
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event, select

from coordinator.db.models import Base, Job
from coordinator.jobs import transitions as tr
from coordinator.jobs.requests import sanitize_request
from coordinator.jobs.store import JobStore, job_info
from protocol.errors import (
    InvalidRequest,
    JobNotFound,
    TemplateAttemptInProgress,
    TemplateNotFound,
)

REQ = {"image": "registry.local/app:1", "vcpus": 1, "memory_mib": 512,
       "credentials": {"username": "u", "password": "p"}}


@pytest.fixture
def store(engine, clock: Clock) -> JobStore:
    return JobStore(engine, clock=clock)


def test_migration_matches_models(engine) -> None:
    """HA-1: migration 0003 produces exactly the models' schema, on both dialects."""
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_create_inserts_template_and_job_together(store: JobStore) -> None:
    sub = store.create_template(request_id="r-1", request=REQ, image_ref="registry.local/app:1",
                                requested_alias="web")
    assert sub.created
    job = store.get_job(sub.job_id)
    tpl = store.get_template(job["resource_id"])
    assert tpl["status"] == "PENDING" and tpl["alias"] is None and tpl["requested_alias"] == "web"
    assert job["operation"] == "CREATE" and job["status"] == "PENDING" and job["phase"] == "PULLING"
    assert job["progress"] == 0 and job["attempt_no"] == 1 and job["retry_of_job_id"] is None
    # Credentials never reach a row (IMG-5, TPL-5).
    assert "credentials" not in job["request"] and "credentials" not in tpl["spec"]
    assert "password" not in repr(job) + repr(tpl)


def test_equal_resubmit_returns_the_existing_job(store: JobStore) -> None:
    first = store.create_template(request_id="r-1", request=REQ)
    other_creds = {**REQ, "credentials": {"username": "x", "password": "y"}}
    again = store.create_template(request_id="r-1", request=dict(reversed(list(other_creds.items()))))
    assert not again.created and again.job_id == first.job_id
    # Whatever its status.
    with store.sessions.begin() as s:
        assert tr.transition_job(s, first.job_id, "PENDING", "FAILED", error={"name": "X", "message": "y"})
    assert store.create_template(request_id="r-1", request=REQ).job_id == first.job_id


def test_request_id_reuse_with_other_payload_or_operation(store: JobStore) -> None:
    first = store.create_template(request_id="r-1", request=REQ)
    with pytest.raises(TemplateAttemptInProgress, match="request_id r-1 already used with a different payload"):
        store.create_template(request_id="r-1", request={**REQ, "vcpus": 2})
    tpl = first.job["resource_id"]
    with store.sessions.begin() as s:
        tr.transition_job(s, first.job_id, "PENDING", "FAILED", error={"name": "X", "message": "y"})
    with pytest.raises(TemplateAttemptInProgress, match="request_id r-1 already bound to CREATE"):
        store.submit_job(request_id="r-1", operation="REDO", resource_type="template", resource_id=tpl,
                         request={"template": tpl}, phase="DISTRIBUTING", progress=60)


def test_request_id_is_required(store: JobStore) -> None:
    with pytest.raises(InvalidRequest, match="requestID is required"):
        store.create_template(request_id="", request=REQ)


def test_attempts_chain_and_one_active_job(store: JobStore) -> None:
    first = store.create_template(request_id="r-1", request=REQ)
    tpl = first.job["resource_id"]
    with pytest.raises(TemplateAttemptInProgress, match=rf"template {tpl} is currently PENDING \(job_id={first.job_id}\)"):
        store.submit_job(request_id="r-2", operation="REDO", resource_type="template", resource_id=tpl,
                         request={"template": tpl, "mode": "ALL"}, phase="DISTRIBUTING")
    with store.sessions.begin() as s:
        assert tr.transition_job(s, first.job_id, "PENDING", "RUNNING", owner="c1")
        assert tr.transition_job(s, first.job_id, "RUNNING", "READY")
    redo = store.submit_job(request_id="r-2", operation="REDO", resource_type="template", resource_id=tpl,
                            request={"template": tpl, "mode": "ALL"}, phase="DISTRIBUTING", progress=60,
                            redo_mode="NODES", scope=["n1", "n2"])
    assert redo.created and redo.job["attempt_no"] == 2 and redo.job["retry_of_job_id"] == first.job_id
    assert redo.job["progress"] == 60 and redo.job["scope"] == ["n1", "n2"]
    with pytest.raises(TemplateAttemptInProgress, match="is currently PENDING"):
        store.submit_job(request_id="r-3", operation="DELETE", resource_type="template", resource_id=tpl,
                         request={"template": tpl}, phase="DELETING")
    # A caller-specific refusal (TPL-26) and checks in the same transaction.
    with pytest.raises(TemplateAttemptInProgress, match="deletion is blocked"):
        store.submit_job(request_id="r-3", operation="DELETE", resource_type="template", resource_id=tpl,
                         request={"template": tpl}, phase="DELETING",
                         on_active=lambda j: TemplateAttemptInProgress(
                             "deletion is blocked while a build job is still active"))
    with pytest.raises(TemplateNotFound):
        store.submit_job(request_id="r-4", operation="REDO", resource_type="template", resource_id="tpl-" + "0" * 24,
                         request={}, phase="DISTRIBUTING")
    assert [j["attempt_no"] for j in store.list_jobs(resource_id=tpl)] == [2, 1]
    assert store.latest_job(tpl)["id"] == redo.job_id


def test_concurrent_submits_yield_one_active_job(store: JobStore) -> None:
    """TPL-6/TPL-7 races: the unique keys decide, the losers re-read and get a clear answer."""
    first = store.create_template(request_id="r-0", request=REQ)
    tpl = first.job["resource_id"]
    with store.sessions.begin() as s:
        tr.transition_job(s, first.job_id, "PENDING", "FAILED", error={"name": "X", "message": "y"})
    results: list[object] = []
    barrier = threading.Barrier(6)

    def submit(i: int) -> None:
        barrier.wait()
        try:
            results.append(store.submit_job(request_id=f"redo-{i}", operation="REDO", resource_type="template",
                                            resource_id=tpl, request={"template": tpl}, phase="DISTRIBUTING"))
        except TemplateAttemptInProgress as exc:
            results.append(exc)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    created = [r for r in results if not isinstance(r, Exception)]
    assert len(results) == 6 and len(created) == 1
    assert all("is currently PENDING" in str(r) for r in results if isinstance(r, Exception))
    assert created[0].job["attempt_no"] == 2


def test_concurrent_equal_submits_return_one_job(store: JobStore) -> None:
    out: list[str] = []
    barrier = threading.Barrier(4)

    def submit() -> None:
        barrier.wait()
        out.append(store.create_template(request_id="same", request=REQ).job_id)

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(out) == 4 and len(set(out)) == 1
    with store.engine.connect() as conn:
        assert len(conn.execute(select(Job.id).where(Job.request_id == "same")).all()) == 1


def test_get_list_and_info(store: JobStore, clock: Clock) -> None:
    a = store.create_template(request_id="a", request=REQ)
    clock.t += 1
    b = store.create_template(request_id="b", request=REQ)
    assert [j["id"] for j in store.list_jobs()] == [b.job_id, a.job_id]
    assert [j["id"] for j in store.list_jobs(status="PENDING", limit=1)] == [b.job_id]
    assert store.list_jobs(status=["RUNNING", "READY"]) == []
    with pytest.raises(JobNotFound):
        store.get_job("job-" + "0" * 24)
    with pytest.raises(InvalidRequest):
        store.get_job("nope")
    info = job_info(store.get_job(a.job_id))
    for key in ("job_id", "operation", "resource_type", "resource_id", "request_id", "attempt_no",
                "retry_of_job_id", "redo_mode", "scope", "resume_phase", "status", "phase", "progress", "step",
                "error", "builder_node_id", "artifact_id", "fingerprint", "pull_progress", "nodes", "created_ms",
                "started_ms", "last_progress_ms", "finished_ms"):
        assert key in info
    assert info["nodes"] == {"expected": 0, "ready": 0, "failed": 0, "pending": 0}


def test_cancel(store: JobStore) -> None:
    sub = store.create_template(request_id="a", request=REQ)
    assert store.request_cancel(sub.job_id)["cancel_requested"] is True
    with store.sessions.begin() as s:
        tr.transition_job(s, sub.job_id, "PENDING", "FAILED", error={"name": "JobCancelled", "message": "x"})
    other = store.create_template(request_id="b", request=REQ)
    with store.sessions.begin() as s:
        tr.transition_job(s, other.job_id, "PENDING", "RUNNING", owner="c")
        tr.transition_job(s, other.job_id, "RUNNING", "READY")
    before = store.get_job(other.job_id)
    assert store.request_cancel(other.job_id) == before  # terminal: unchanged (TPL-32)


def test_progress_is_throttled_but_phase_changes_are_not(store: JobStore, clock: Clock) -> None:
    sub = store.create_template(request_id="a", request=REQ)
    assert store.claim(sub.job_id, "c1", 30_000)
    writes: list[str] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def count(conn, cursor, statement, params, context, executemany):
        if statement.lstrip().upper().startswith("UPDATE JOBS"):
            writes.append(statement)

    assert store.report_progress(sub.job_id, phase="PULLING", progress=5, owner="c1")
    for p in range(6, 15):
        assert not store.report_progress(sub.job_id, progress=p, owner="c1",
                                         pull_progress={"bytes": p * 100, "layers": 1})
    assert len(writes) == 1 and store.get_job(sub.job_id)["progress"] == 5
    assert store.report_progress(sub.job_id, phase="UNPACKING", progress=20, owner="c1")  # at once
    assert len(writes) == 2
    row = store.get_job(sub.job_id)
    assert row["phase"] == "UNPACKING" and row["progress"] == 20 and row["pull_progress"]["bytes"] == 1400
    assert not store.report_progress(sub.job_id, progress=21, owner="c1")
    clock.t += 1.0
    assert store.report_progress(sub.job_id, progress=22, owner="c1")
    assert store.get_job(sub.job_id)["progress"] == 22
    # Buffered values ride with the step write.
    assert not store.report_progress(sub.job_id, progress=30, owner="c1")
    assert store.save_step(sub.job_id, "c1", step="BUILD")
    assert store.get_job(sub.job_id)["progress"] == 30
    # Another owner's writes are fenced off.
    clock.t += 5
    assert not store.report_progress(sub.job_id, progress=40, owner="other")
    assert not store.save_step(sub.job_id, "other", step="X")


def test_sanitize_request() -> None:
    clean = sanitize_request({"request_id": "r", "image": "x", "env": {}, "ports": [80, 443], "auth": "t",
                              "probe": {"http": {"path": "/", "token": "s"}}, "alias": None, "size": 1.0})
    assert clean == {"image": "x", "ports": [80, 443], "probe": {"http": {"path": "/"}}, "size": 1}
    with pytest.raises(InvalidRequest):
        sanitize_request({"x": 1.5})
