"""Template row transactions against SQLite and PostgreSQL: `alias set` (TPL-18) and the publish
retry on a lock conflict (TPL-17). Real databases, real locks held by a second connection."""
from __future__ import annotations

import threading
from typing import Any, Iterator

import pytest
from sqlalchemy import create_engine, event, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from coordinator.db.engine import is_lock_conflict, make_engine
from coordinator.db.models import Template
from coordinator.jobs.store import JobStore
from coordinator.templates.rows import Rows
from protocol.errors import DuplicateTemplate, TemplateNotFound, TemplateNotReady
from tests.support import Clock

T = Template.__table__


def _template(store: JobStore, engine: Engine, rid: str, status: str, alias: str | None = None) -> tuple[str, str]:
    sub = store.create_template(request_id=rid, request={"image": f"reg.local/{rid}:1"}, image_ref=f"reg.local/{rid}:1")
    tpl = store.get_job(sub.job_id)["resource_id"]
    with engine.begin() as c:
        c.execute(update(T).where(T.c.id == tpl).values(status=status, alias=alias))
    return tpl, sub.job_id


@pytest.fixture
def rows(engine: Engine, clock: Clock) -> Rows:
    return Rows(engine, clock)


@pytest.fixture
def store(engine: Engine, clock: Clock) -> JobStore:
    return JobStore(engine, clock=clock)


def test_alias_set_claims_moves_and_clears(engine: Engine, rows: Rows, store: JobStore) -> None:
    """TPL-18 on both backends."""
    one, _ = _template(store, engine, "r-1", "READY", alias="web")
    two, _ = _template(store, engine, "r-2", "READY")
    pending, _ = _template(store, engine, "r-3", "PENDING")
    deleting, _ = _template(store, engine, "r-4", "DELETING")
    with pytest.raises(DuplicateTemplate, match=f"held by template {one}"):
        rows.set_alias(two, "web", transfer=False)
    assert rows.template(one)["alias"] == "web"
    moved = rows.set_alias(two, "web", transfer=True)
    assert (moved["alias"], moved["released_from"], moved["changed"]) == ("web", one, True)
    assert rows.template(one)["alias"] is None and rows.template(two)["alias"] == "web"
    assert rows.set_alias(two, "web", transfer=False)["changed"] is False  # a retry answers the same
    with pytest.raises(TemplateNotReady, match="PENDING"):
        rows.set_alias(pending, "api", transfer=False)
    assert rows.set_alias(pending, "", transfer=False)["changed"] is False  # clearing nothing: no-op
    with pytest.raises(TemplateNotFound):
        rows.set_alias(deleting, "", transfer=False)
    cleared = rows.set_alias(two, "", transfer=False)
    assert (cleared["alias"], cleared["previous"], cleared["changed"]) == (None, "web", True)
    assert rows.template(two)["alias"] is None


class _Holder:
    """A second connection holding a write lock on the template row until told to let go."""

    def __init__(self, url: str, template_id: str) -> None:
        self.release = threading.Event()
        self.holding = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, template_id), daemon=True)
        self._thread.start()
        assert self.holding.wait(10), "the holder never took its lock"

    def _run(self, url: str, template_id: str) -> None:
        eng = make_engine(url)
        with eng.connect() as c:
            if eng.dialect.name == "sqlite":
                c.exec_driver_sql("BEGIN IMMEDIATE")  # the database write lock
            else:
                c.begin()
                c.execute(text("SELECT id FROM templates WHERE id = :t FOR UPDATE"), {"t": template_id})
            self.holding.set()
            self.release.wait(30)
            c.rollback()
        eng.dispose()

    def join(self) -> None:
        self.release.set()
        self._thread.join(10)


def _impatient_engine(url: str) -> Engine:
    """An engine for the publishing side that gives up on a held lock after 200 ms."""
    if url.startswith("sqlite"):
        eng = create_engine(url, connect_args={"timeout": 0.2, "check_same_thread": False})
    else:
        eng = make_engine(url)

        @event.listens_for(eng, "connect")
        def _timeout(dbapi_conn: Any, _rec: Any) -> None:
            with dbapi_conn.cursor() as cur:
                cur.execute("SET lock_timeout = '200ms'")
            dbapi_conn.commit()
    return eng


@pytest.fixture
def impatient(db_url: str, engine: Engine) -> Iterator[Engine]:
    eng = _impatient_engine(db_url)
    yield eng
    eng.dispose()


def test_a_held_lock_is_a_lock_conflict(db_url: str, engine: Engine, store: JobStore, impatient: Engine) -> None:
    """TPL-17: a lock timeout from each backend is recognised as retryable; other errors are not."""
    tpl, _ = _template(store, engine, "r-1", "PENDING")
    holder = _Holder(db_url, tpl)
    try:
        with pytest.raises(DBAPIError) as exc:
            with impatient.begin() as c:
                c.execute(update(T).where(T.c.id == tpl).values(last_error="x"))
        assert is_lock_conflict(exc.value), exc.value
    finally:
        holder.join()
    with pytest.raises(DBAPIError) as other:
        with impatient.begin() as c:
            c.execute(text("SELECT no_such_column FROM templates"))
    assert not is_lock_conflict(other.value)


def test_publish_retries_once_after_a_lock_conflict(db_url: str, engine: Engine, store: JobStore,
                                                    impatient: Engine, clock: Clock) -> None:
    """TPL-17: the publish transaction meets a held lock, the holder lets go when the first try
    fails, and the retry publishes; a lock that stays is reported after one retry."""
    tpl, job = _template(store, engine, "r-1", "PENDING")
    rows = Rows(impatient, clock)
    failures: list[BaseException] = []
    holder = _Holder(db_url, tpl)

    @event.listens_for(impatient, "handle_error")
    def _on_error(ctx: Any) -> None:
        failures.append(ctx.original_exception)
        holder.release.set()  # let go once the first try has failed
    try:
        assert rows.publish(tpl, job, "READY") == ""
    finally:
        holder.join()
    assert len(failures) == 1 and rows.template(tpl)["status"] == "READY"

    event.remove(impatient, "handle_error", _on_error)
    two, job2 = _template(store, engine, "r-2", "PENDING")
    holder = _Holder(db_url, two)
    try:
        with pytest.raises(DBAPIError):
            rows.publish(two, job2, "READY")
    finally:
        holder.join()
    assert rows.template(two)["status"] == "PENDING"
