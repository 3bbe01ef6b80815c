"""Engine set-up for SQLite (WAL, busy timeout 5 s) and PostgreSQL, and the schema gate (HA-1).

A schema that is not at the Alembic head stops the coordinator with
TemplateStoreNotInitialized unless it runs with ``--migrate``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from protocol.errors import TemplateStoreNotInitialized

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(u, connect_args={"timeout": 5.0, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _rec) -> None:  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=5000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
        return engine
    if u.get_backend_name() == "postgresql" and u.get_driver_name() in ("psycopg2", ""):
        u = u.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver we ship
    return create_engine(u, pool_size=5, max_overflow=10, pool_pre_ping=True)


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(_alembic_config()).get_current_head() or ""


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine) -> None:
    cfg = _alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def ensure_schema(engine: Engine, *, migrate_now: bool) -> str:
    """Check (or, with ``migrate_now``, bring) the schema to head; return the revision."""
    safe = engine.url.render_as_string(hide_password=True)
    try:
        if migrate_now:
            migrate(engine)
        current = current_revision(engine)
    except SQLAlchemyError as exc:
        raise TemplateStoreNotInitialized(
            f"database {safe} is unreachable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
            {"url": safe}) from None
    head = head_revision()
    if current != head:
        raise TemplateStoreNotInitialized(
            f"database {safe} schema is at {current or 'nothing'}, head is {head}; "
            "run tc-coordinator --migrate", {"url": safe, "current": current, "head": head})
    return head


# SQLSTATEs that mean "another transaction was in the way; running it again may succeed":
# deadlock_detected, lock_not_available, serialization_failure (PostgreSQL).
_RETRYABLE_SQLSTATES = frozenset({"40P01", "55P03", "40001"})


def is_lock_conflict(exc: BaseException) -> bool:
    """Whether a DBAPI error is a deadlock or lock timeout (TPL-17): PostgreSQL by SQLSTATE,
    SQLite by its "database is locked" busy error."""
    from sqlalchemy.exc import DBAPIError
    if not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state in _RETRYABLE_SQLSTATES:
        return True
    return "database is locked" in str(orig) or "database table is locked" in str(orig)
