"""templates, jobs, artifacts, replicas and placements

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# TPL-7: at most one active CREATE/REDO/COMMIT/DELETE job per template.
ACTIVE_TEMPLATE_JOB = sa.text("status IN ('PENDING', 'RUNNING') AND operation IN "
                              "('CREATE', 'REDO', 'COMMIT', 'DELETE')")


def upgrade() -> None:
    op.create_table(
        "templates",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("alias", sa.String(64), nullable=True),
        sa.Column("requested_alias", sa.String(64), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("source_kind", sa.String(8), nullable=False),
        sa.Column("image_ref", sa.String(512), nullable=False),
        sa.Column("manifest_digest", sa.String(80), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("runtime_config", sa.JSON(), nullable=False),
        sa.Column("artifact_id", sa.String(32), nullable=True),
        sa.Column("memstate_artifact_id", sa.String(32), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("alias"),
    )
    op.create_index("ix_templates_updated", "templates", ["updated_ms"])
    op.create_index("ix_templates_artifact", "templates", ["artifact_id"])
    op.create_index("ix_templates_memstate_artifact", "templates", ["memstate_artifact_id"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("operation", sa.String(24), nullable=False),
        sa.Column("resource_type", sa.String(16), nullable=False),
        sa.Column("resource_id", sa.String(32), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("attempt_no", sa.Integer(), nullable=False),
        sa.Column("retry_of_job_id", sa.String(32), nullable=True),
        sa.Column("redo_mode", sa.String(16), nullable=True),
        sa.Column("scope", sa.JSON(), nullable=False),
        sa.Column("resume_phase", sa.String(24), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("phase", sa.String(24), nullable=False),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("step", sa.String(32), nullable=False),
        sa.Column("step_state", sa.JSON(), nullable=False),
        sa.Column("error", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("builder_node_id", sa.String(63), nullable=True),
        sa.Column("artifact_id", sa.String(32), nullable=True),
        sa.Column("fingerprint", sa.String(64), nullable=True),
        sa.Column("pull_progress", sa.JSON(), nullable=False),
        sa.Column("nodes_expected", sa.Integer(), nullable=False),
        sa.Column("nodes_ready", sa.Integer(), nullable=False),
        sa.Column("nodes_failed", sa.Integer(), nullable=False),
        sa.Column("nodes_pending", sa.Integer(), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("request_digest", sa.String(64), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("owner", sa.String(64), nullable=True),
        sa.Column("lease_expires_ms", sa.BigInteger(), nullable=True),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("started_ms", sa.BigInteger(), nullable=True),
        sa.Column("last_progress_ms", sa.BigInteger(), nullable=False),
        sa.Column("finished_ms", sa.BigInteger(), nullable=True),
        sa.UniqueConstraint("request_id", "operation", name="uq_jobs_request_operation"),
        sa.UniqueConstraint("resource_id", "attempt_no", name="uq_jobs_resource_attempt"),
    )
    op.create_index("uq_jobs_active_template_op", "jobs", ["resource_id"], unique=True,
                    sqlite_where=ACTIVE_TEMPLATE_JOB, postgresql_where=ACTIVE_TEMPLATE_JOB)
    op.create_index("ix_jobs_status_progress", "jobs", ["status", "last_progress_ms"])
    op.create_index("ix_jobs_created", "jobs", ["created_ms"])
    op.create_index("ix_jobs_artifact", "jobs", ["artifact_id"])

    op.create_table(
        "artifacts",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("owner_job_id", sa.String(32), nullable=True),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("image_config", sa.JSON(), nullable=False),
        sa.Column("manifest_digest", sa.String(80), nullable=False),
        sa.Column("gc_deadline_ms", sa.BigInteger(), nullable=True),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("fingerprint"),
    )
    op.create_index("ix_artifacts_status", "artifacts", ["status", "gc_deadline_ms"])
    op.create_index("ix_artifacts_owner_job", "artifacts", ["owner_job_id"])

    op.create_table(
        "replicas",
        sa.Column("template_id", sa.String(32), sa.ForeignKey("templates.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("node_id", sa.String(63), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("cleanup_required", sa.Boolean(), nullable=False),
        sa.Column("artifact_id", sa.String(32), nullable=True),
        sa.Column("memstate_artifact_id", sa.String(32), nullable=True),
        sa.Column("job_id", sa.String(32), nullable=True),
        sa.Column("pins", sa.JSON(), nullable=False),
        sa.Column("compat", sa.String(16), nullable=False),
        sa.Column("compat_checked_ms", sa.BigInteger(), nullable=True),
        sa.Column("has_memory_snapshot", sa.Boolean(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("last_error_phase", sa.String(16), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_replicas_node", "replicas", ["node_id", "status"])
    op.create_index("ix_replicas_artifact", "replicas", ["artifact_id"])
    op.create_index("ix_replicas_memstate_artifact", "replicas", ["memstate_artifact_id"])

    op.create_table(
        "placements",
        sa.Column("artifact_id", sa.String(32), sa.ForeignKey("artifacts.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("node_id", sa.String(63), primary_key=True),
        sa.Column("verified", sa.Boolean(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_placements_node", "placements", ["node_id"])


def downgrade() -> None:
    op.drop_index("ix_placements_node", "placements")
    op.drop_table("placements")
    op.drop_index("ix_replicas_memstate_artifact", "replicas")
    op.drop_index("ix_replicas_artifact", "replicas")
    op.drop_index("ix_replicas_node", "replicas")
    op.drop_table("replicas")
    op.drop_index("ix_artifacts_owner_job", "artifacts")
    op.drop_index("ix_artifacts_status", "artifacts")
    op.drop_table("artifacts")
    op.drop_index("ix_jobs_artifact", "jobs")
    op.drop_index("ix_jobs_created", "jobs")
    op.drop_index("ix_jobs_status_progress", "jobs")
    op.drop_index("uq_jobs_active_template_op", "jobs")
    op.drop_table("jobs")
    op.drop_index("ix_templates_memstate_artifact", "templates")
    op.drop_index("ix_templates_artifact", "templates")
    op.drop_index("ix_templates_updated", "templates")
    op.drop_table("templates")
