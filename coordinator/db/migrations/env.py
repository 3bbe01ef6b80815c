"""Alembic environment: always run against a connection handed in by coordinator.db.engine."""
from alembic import context

from coordinator.db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover — migrations run only through coordinator.db.engine
    raise RuntimeError("run migrations with `tc-coordinator --migrate`, not the alembic CLI")

# render_as_batch: SQLite needs table rebuilds for most ALTERs; PostgreSQL ignores it.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
