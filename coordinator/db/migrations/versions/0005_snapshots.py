"""snapshots and runtime refs (SNAP-1 to SNAP-21)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

ACTIVE = sa.text("status = 'ACTIVE'")


def upgrade() -> None:
    op.create_table(
        "snapshots",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("sandbox_id", sa.String(32), nullable=False),
        sa.Column("node_id", sa.String(63), nullable=False),
        sa.Column("template_id", sa.String(32), nullable=True),
        sa.Column("base_artifact_id", sa.String(32), nullable=True),
        sa.Column("host_facts", sa.JSON(), nullable=False),
        sa.Column("pins", sa.JSON(), nullable=False),
        sa.Column("sizes", sa.JSON(), nullable=False),
        sa.Column("pause_ms", sa.BigInteger(), nullable=True),
        sa.Column("runtime_config", sa.JSON(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_snapshots_created", "snapshots", ["created_ms"])
    op.create_index("ix_snapshots_sandbox", "snapshots", ["sandbox_id"])
    op.create_index("ix_snapshots_status", "snapshots", ["status", "updated_ms"])
    op.create_index("ix_snapshots_base_artifact", "snapshots", ["base_artifact_id"])
    op.create_table(
        "runtime_refs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("snapshot_id", sa.String(32), nullable=False),
        sa.Column("sandbox_id", sa.String(32), nullable=False),
        sa.Column("node_id", sa.String(63), nullable=False),
        sa.Column("binding", sa.String(32), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attached_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_ms", sa.BigInteger(), nullable=True),
        sa.Column("released_ms", sa.BigInteger(), nullable=True),
        sa.Column("release_reason", sa.String(64), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
    )
    op.create_index("ix_runtime_refs_snapshot", "runtime_refs", ["snapshot_id", "status"])
    op.create_index("ix_runtime_refs_sandbox", "runtime_refs", ["sandbox_id", "status"])
    op.create_index("ix_runtime_refs_node", "runtime_refs", ["node_id", "status"])
    op.create_index("uq_runtime_refs_active", "runtime_refs", ["sandbox_id", "binding"], unique=True,
                    sqlite_where=ACTIVE, postgresql_where=ACTIVE)


def downgrade() -> None:
    op.drop_table("runtime_refs")
    op.drop_table("snapshots")
