"""agent CURVE keys and their acceptance state

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "node_keys",
        sa.Column("public_key", sa.String(40), primary_key=True),
        sa.Column("fingerprint", sa.String(32), nullable=False),
        sa.Column("node_id", sa.String(63), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("first_seen_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_ms", sa.BigInteger(), nullable=False),
        sa.Column("decided_ms", sa.BigInteger(), nullable=True),
    )
    # NODE-1, SEC-4: at most one accepted key per node id.
    op.create_index("uq_node_keys_accepted_node", "node_keys", ["node_id"], unique=True,
                    sqlite_where=sa.text("state = 'accepted'"), postgresql_where=sa.text("state = 'accepted'"))
    op.create_index("ix_node_keys_state", "node_keys", ["state", "first_seen_ms"])


def downgrade() -> None:
    op.drop_index("ix_node_keys_state", "node_keys")
    op.drop_index("uq_node_keys_accepted_node", "node_keys")
    op.drop_table("node_keys")
