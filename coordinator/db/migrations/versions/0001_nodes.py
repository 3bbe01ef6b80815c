"""nodes, node versions and catalog mirrors

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(63), primary_key=True),
        sa.Column("address", sa.String(64), nullable=False),
        sa.Column("blob_endpoint", sa.String(256), nullable=False),
        sa.Column("admin_state", sa.String(16), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("capabilities", sa.JSON(), nullable=False),
        sa.Column("facts", sa.JSON(), nullable=False),
        sa.Column("facts_digest", sa.String(64), nullable=False),
        sa.Column("versions_digest", sa.String(64), nullable=False),
        sa.Column("catalog_epoch", sa.String(64), nullable=False),
        sa.Column("catalog_seq", sa.BigInteger(), nullable=False),
        sa.Column("catalog_digest", sa.String(64), nullable=False),
        sa.Column("last_seen_ms", sa.BigInteger(), nullable=True),
        sa.Column("storage_total", sa.BigInteger(), nullable=True),
        sa.Column("storage_used", sa.BigInteger(), nullable=True),
        sa.Column("storage_free", sa.BigInteger(), nullable=True),
        sa.Column("storage_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("mem_free", sa.BigInteger(), nullable=True),
        sa.Column("sandboxes", sa.Integer(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "node_versions",
        sa.Column("node_id", sa.String(63), sa.ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("component", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(256), nullable=False),
    )
    op.create_table(
        "node_catalog_entries",
        sa.Column("node_id", sa.String(63), sa.ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("entry_id", sa.String(256), primary_key=True),
        sa.Column("body", sa.JSON(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("node_catalog_entries")
    op.drop_table("node_versions")
    op.drop_table("nodes")
