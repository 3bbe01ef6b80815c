"""SQLAlchemy 2 typed models. The annotations are the schema; every change goes through an
Alembic migration in ``migrations/versions`` (HA-1).

Times are unix milliseconds in BIGINT columns: one representation on SQLite and
PostgreSQL, and the same one the wire uses (CONV-3). Node health is never stored (NODE-2):
it is derived from ``last_seen_ms`` and the lease.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, int: BigInteger}


class Node(Base):
    """One host known to the coordinator (NODE-1). Created by its first accepted HELLO."""
    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    address: Mapped[str] = mapped_column(String(64), default="")
    blob_endpoint: Mapped[str] = mapped_column(String(256), default="")
    admin_state: Mapped[str] = mapped_column(String(16), default="ACTIVE")  # NODE-4
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    capabilities: Mapped[dict[str, Any]] = mapped_column(default=dict)
    facts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    facts_digest: Mapped[str] = mapped_column(String(64), default="")
    versions_digest: Mapped[str] = mapped_column(String(64), default="")
    # The persisted catalog mirror's identity (CAT-5): an unchanged node needs no snapshot after a restart.
    catalog_epoch: Mapped[str] = mapped_column(String(64), default="")
    catalog_seq: Mapped[int] = mapped_column(default=0)
    catalog_digest: Mapped[str] = mapped_column(String(64), default="")
    # Flushed in batches (NODE-9), not once per heartbeat.
    last_seen_ms: Mapped[int | None] = mapped_column(default=None)
    storage_total: Mapped[int | None] = mapped_column(default=None)
    storage_used: Mapped[int | None] = mapped_column(default=None)
    storage_free: Mapped[int | None] = mapped_column(default=None)
    storage_at_ms: Mapped[int | None] = mapped_column(default=None)
    mem_free: Mapped[int | None] = mapped_column(default=None)
    sandboxes: Mapped[int] = mapped_column(Integer, default=0)
    created_ms: Mapped[int] = mapped_column(default=0)
    updated_ms: Mapped[int] = mapped_column(default=0)


class NodeVersion(Base):
    """A component version a node reported (NODE-10); rewritten only when the digest changes."""
    __tablename__ = "node_versions"

    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True)
    component: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(256), default="")


class NodeCatalogEntry(Base):
    """One entry of a node's mirrored catalog (CAT-5), keyed by (kind, id)."""
    __tablename__ = "node_catalog_entries"

    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    entry_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    body: Mapped[dict[str, Any]] = mapped_column(default=dict)


class NodeKey(Base):
    """An agent's CURVE public key and its acceptance state (SEC-3, SEC-4).

    ``node_id`` is the id the key claims in its HELLO; accepting binds the two for good
    (NODE-1): one accepted key per node id, enforced by a partial unique index.
    """
    __tablename__ = "node_keys"

    public_key: Mapped[str] = mapped_column(String(40), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(32))
    node_id: Mapped[str] = mapped_column(String(63), default="")
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending | accepted | rejected
    first_seen_ms: Mapped[int] = mapped_column(default=0)
    last_seen_ms: Mapped[int] = mapped_column(default=0)
    decided_ms: Mapped[int | None] = mapped_column(default=None)

    __table_args__ = (
        Index("uq_node_keys_accepted_node", "node_id", unique=True,
              sqlite_where=text("state = 'accepted'"), postgresql_where=text("state = 'accepted'")),
        Index("ix_node_keys_state", "state", "first_seen_ms"),
    )


# ---------------------------------------------------------------------------------------------
# Templates, jobs, artifacts, replicas and placements (issue 5). Status values are the CONV-3
# names; which transitions are allowed lives in ``coordinator.jobs.transitions``, the only
# writer of the status columns.

# JSON that may be SQL NULL (``None`` stored as NULL, not as the JSON literal ``null``).
NullableJSON = JSON(none_as_null=True)


class Template(Base):
    """An immutable recipe plus the rootfs built from it (TPL-4); only the alias changes later.

    ``alias`` is the claimed alias, NULL while unclaimed; a plain unique column is enough for
    "unique among non-DELETING templates" because entering DELETING releases it (TPL-27).
    ``requested_alias`` is what the create asked for, claimed at publish (TPL-16). ``spec`` is
    the sanitised request: it never holds registry credentials (IMG-5, TPL-5).
    """
    __tablename__ = "templates"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    alias: Mapped[str | None] = mapped_column(String(64), unique=True, default=None)
    requested_alias: Mapped[str | None] = mapped_column(String(64), default=None)
    status: Mapped[str] = mapped_column(String(16), default="PENDING")  # CONV-6
    source_kind: Mapped[str] = mapped_column(String(8), default="image")  # image | commit
    image_ref: Mapped[str] = mapped_column(String(512), default="")
    manifest_digest: Mapped[str] = mapped_column(String(80), default="")
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    runtime_config: Mapped[dict[str, Any]] = mapped_column(default=dict)  # TPL-30
    # GC-1 counts references through these explicit columns, never by searching text.
    artifact_id: Mapped[str | None] = mapped_column(String(32), default=None)  # rootfs
    memstate_artifact_id: Mapped[str | None] = mapped_column(String(32), default=None)  # commit, memory mode
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_ms: Mapped[int] = mapped_column(default=0)
    updated_ms: Mapped[int] = mapped_column(default=0)

    __table_args__ = (
        Index("ix_templates_updated", "updated_ms"),  # TPL-29: newest-updated first
        Index("ix_templates_artifact", "artifact_id"),
        Index("ix_templates_memstate_artifact", "memstate_artifact_id"),
    )


class Job(Base):
    """A persisted, resumable coordinator operation: the write-ahead log (TPL-7, TPL-31, TPL-33).

    ``step`` is the next step to run (empty: not started); ``step_state`` is the job type's
    per-step scratch (task ids, chosen builder, counts) written with the step that made it.
    ``owner`` and ``lease_expires_ms`` say which coordinator runs it, so a takeover resumes only
    jobs whose owner is gone. ``request`` is the sanitised request and ``request_digest`` its
    canonical digest (TPL-5).
    """
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    operation: Mapped[str] = mapped_column(String(24))
    resource_type: Mapped[str] = mapped_column(String(16))  # template | snapshot
    resource_id: Mapped[str] = mapped_column(String(32))
    request_id: Mapped[str] = mapped_column(String(128))
    attempt_no: Mapped[int] = mapped_column(Integer, default=1)  # TPL-6
    retry_of_job_id: Mapped[str | None] = mapped_column(String(32), default=None)
    redo_mode: Mapped[str | None] = mapped_column(String(16), default=None)
    scope: Mapped[list[Any]] = mapped_column(JSON, default=list)  # REDO node scope
    resume_phase: Mapped[str | None] = mapped_column(String(24), default=None)
    status: Mapped[str] = mapped_column(String(16), default="PENDING")  # CONV-4
    phase: Mapped[str] = mapped_column(String(24), default="")
    progress: Mapped[int] = mapped_column(Integer, default=0)  # 0..100, never decreases (CONV-5)
    step: Mapped[str] = mapped_column(String(32), default="")
    step_state: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON, default=None)  # {name, message}
    builder_node_id: Mapped[str | None] = mapped_column(String(63), default=None)
    artifact_id: Mapped[str | None] = mapped_column(String(32), default=None)
    fingerprint: Mapped[str | None] = mapped_column(String(64), default=None)
    pull_progress: Mapped[dict[str, Any]] = mapped_column(default=dict)  # bytes, layers, speed
    nodes_expected: Mapped[int] = mapped_column(Integer, default=0)
    nodes_ready: Mapped[int] = mapped_column(Integer, default=0)
    nodes_failed: Mapped[int] = mapped_column(Integer, default=0)
    nodes_pending: Mapped[int] = mapped_column(Integer, default=0)
    request: Mapped[dict[str, Any]] = mapped_column(default=dict)
    request_digest: Mapped[str] = mapped_column(String(64), default="")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)  # TPL-32
    owner: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_expires_ms: Mapped[int | None] = mapped_column(default=None)
    created_ms: Mapped[int] = mapped_column(default=0)
    started_ms: Mapped[int | None] = mapped_column(default=None)
    last_progress_ms: Mapped[int] = mapped_column(default=0)  # GC-8 measures "no progress" from here
    finished_ms: Mapped[int | None] = mapped_column(default=None)

    __table_args__ = (
        UniqueConstraint("request_id", "operation", name="uq_jobs_request_operation"),  # TPL-5
        UniqueConstraint("resource_id", "attempt_no", name="uq_jobs_resource_attempt"),  # TPL-6
        # TPL-7 in the schema: at most one active CREATE/REDO/COMMIT/DELETE job per template.
        Index("uq_jobs_active_template_op", "resource_id", unique=True,
              sqlite_where=text("status IN ('PENDING', 'RUNNING') AND operation IN "
                                "('CREATE', 'REDO', 'COMMIT', 'DELETE')"),
              postgresql_where=text("status IN ('PENDING', 'RUNNING') AND operation IN "
                                    "('CREATE', 'REDO', 'COMMIT', 'DELETE')")),
        Index("ix_jobs_status_progress", "status", "last_progress_ms"),  # runner claims, GC-8
        Index("ix_jobs_created", "created_ms"),  # job list, newest first
        Index("ix_jobs_artifact", "artifact_id"),  # GC-1 references
    )


class Artifact(Base):
    """Files agents hold and copy to each other: ``rootfs`` or ``memstate`` (CONV-8, IMG-19).

    The id is derived from the unique ``fingerprint``; a build claims the row by setting
    BUILDING, ``owner_job_id`` and ``generation`` + 1, and only the (status, owner, generation)
    it claimed may flip it READY (TPL-9, TPL-12).
    """
    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # rootfs | memstate
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="BUILDING")
    owner_job_id: Mapped[str | None] = mapped_column(String(32), default=None)
    generation: Mapped[int] = mapped_column(default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    size: Mapped[int] = mapped_column(default=0)
    files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    image_config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    manifest_digest: Mapped[str] = mapped_column(String(80), default="")
    gc_deadline_ms: Mapped[int | None] = mapped_column(default=None)  # GC-2
    created_ms: Mapped[int] = mapped_column(default=0)
    updated_ms: Mapped[int] = mapped_column(default=0)

    __table_args__ = (
        Index("ix_artifacts_status", "status", "gc_deadline_ms"),  # GC-6 candidates
        Index("ix_artifacts_owner_job", "owner_job_id"),  # GC-7, GC-8
    )


class Replica(Base):
    """A template made usable on one node (DIST-2, DIST-7).

    CONV-9: status stays FAILED, with ``cleanup_required``, while the phase is PENDING,
    DISTRIBUTING, DISTRIBUTED or SNAPSHOTTING; READY only with phase READY. ``node_id`` has no
    foreign key on purpose: a replica on a removed node is what TemplateCleanupLocatorMissing
    reports (TPL-26).
    """
    __tablename__ = "replicas"

    template_id: Mapped[str] = mapped_column(ForeignKey("templates.id", ondelete="CASCADE"), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="FAILED")
    phase: Mapped[str] = mapped_column(String(16), default="PENDING")
    cleanup_required: Mapped[bool] = mapped_column(Boolean, default=True)
    artifact_id: Mapped[str | None] = mapped_column(String(32), default=None)
    memstate_artifact_id: Mapped[str | None] = mapped_column(String(32), default=None)
    job_id: Mapped[str | None] = mapped_column(String(32), default=None)
    pins: Mapped[dict[str, Any]] = mapped_column(default=dict)  # versions pinned at READY (DIST-7)
    compat: Mapped[str] = mapped_column(String(16), default="UNKNOWN")  # OK | STALE | UNKNOWN
    compat_checked_ms: Mapped[int | None] = mapped_column(default=None)
    has_memory_snapshot: Mapped[bool] = mapped_column(Boolean, default=False)
    last_error: Mapped[str] = mapped_column(Text, default="")
    last_error_phase: Mapped[str] = mapped_column(String(16), default="")
    updated_ms: Mapped[int] = mapped_column(default=0)

    __table_args__ = (
        Index("ix_replicas_node", "node_id", "status"),
        Index("ix_replicas_artifact", "artifact_id"),
        Index("ix_replicas_memstate_artifact", "memstate_artifact_id"),
    )


class Placement(Base):
    """A node holding a verified copy of an artifact (DIST-6); removed only by GC-3..GC-5."""
    __tablename__ = "placements"

    artifact_id: Mapped[str] = mapped_column(ForeignKey("artifacts.id", ondelete="CASCADE"), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    verified: Mapped[bool] = mapped_column(Boolean, default=False)
    created_ms: Mapped[int] = mapped_column(default=0)

    __table_args__ = (Index("ix_placements_node", "node_id"),)


class Sandbox(Base):
    """The coordinator's record of a sandbox it created (RT-17, RT-19): written CREATING before
    the agent gets the task, its state updated from the answer, deleted on destroy. The live
    state comes from the node's mirrored catalog (CAT-6); snapshot and commit read the original
    spec from here. ``request_id`` is unique: a retried create returns the same sandbox."""
    __tablename__ = "sandboxes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), unique=True)
    request_digest: Mapped[str] = mapped_column(String(64), default="")  # TPL-5-style payload check
    name: Mapped[str] = mapped_column(String(128), default="")
    source_kind: Mapped[str] = mapped_column(String(16), default="template")  # template | snapshot
    source_id: Mapped[str] = mapped_column(String(32))
    # No foreign key: template delete is refused while records exist (TPL-26), never cascaded.
    template_id: Mapped[str | None] = mapped_column(String(32), default=None)
    node_id: Mapped[str] = mapped_column(String(63))
    runtime_config: Mapped[dict[str, Any]] = mapped_column(default=dict)  # a copy of the template's (TPL-30)
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)  # probe, snapshot mode, artifact, compat policy
    vcpus: Mapped[int] = mapped_column(Integer, default=1)
    memory_mib: Mapped[int] = mapped_column(Integer, default=512)
    restore: Mapped[str] = mapped_column(String(8), default="cold")  # memory | cold
    state: Mapped[str] = mapped_column(String(16), default="CREATING")  # last known (CONV-3)
    exit_code: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_ms: Mapped[int] = mapped_column(default=0)
    updated_ms: Mapped[int] = mapped_column(default=0)

    __table_args__ = (
        Index("ix_sandboxes_template", "template_id"),  # TemplateInUse (TPL-26)
        Index("ix_sandboxes_node", "node_id"),
    )


# ---------------------------------------------------------------------------------------------
# Snapshots of running sandboxes and the runtime references to them (issue 8, SPEC §10).

class Snapshot(Base):
    """A snapshot of a running sandbox, living on its origin node (SNAP-1 to SNAP-14).

    Statuses: CREATING → READY | FAILED; DELETING while a delete job removes it; DELETED is a
    tombstone kept while runtime refs are ACTIVE (SNAP-12), hidden from list/show and refused
    as a source. ``base_artifact_id`` is the artifact its disk descends from: GC-1 counts it as
    a reference in every status, DELETED included."""
    __tablename__ = "snapshots"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), default="")  # display name, a label only
    status: Mapped[str] = mapped_column(String(16), default="CREATING")
    sandbox_id: Mapped[str] = mapped_column(String(32))  # the origin sandbox
    node_id: Mapped[str] = mapped_column(String(63))  # the origin node: rollback stays there (SNAP-9)
    template_id: Mapped[str | None] = mapped_column(String(32), default=None)
    base_artifact_id: Mapped[str | None] = mapped_column(String(32), default=None)
    host_facts: Mapped[dict[str, Any]] = mapped_column(default=dict)  # frozen at create (SNAP-3)
    pins: Mapped[dict[str, Any]] = mapped_column(default=dict)  # versions at READY (SNAP-4)
    sizes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    pause_ms: Mapped[int | None] = mapped_column(default=None)
    runtime_config: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the origin sandbox's (TPL-23)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_ms: Mapped[int] = mapped_column(default=0)
    updated_ms: Mapped[int] = mapped_column(default=0)

    __table_args__ = (
        Index("ix_snapshots_created", "created_ms"),  # SNAP-17: newest first
        Index("ix_snapshots_sandbox", "sandbox_id"),
        Index("ix_snapshots_status", "status", "updated_ms"),  # GC-9, SNAP-14
        Index("ix_snapshots_base_artifact", "base_artifact_id"),  # GC-1
    )


class RuntimeRef(Base):
    """A running sandbox's use of a snapshot (SNAP-18 to SNAP-21): ACTIVE while the sandbox
    runs from it, RELEASED with a reason. A DELETED snapshot's files stay on its node until
    no ACTIVE ref remains (SNAP-12, SNAP-14)."""
    __tablename__ = "runtime_refs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    snapshot_id: Mapped[str] = mapped_column(String(32))
    sandbox_id: Mapped[str] = mapped_column(String(32))
    node_id: Mapped[str] = mapped_column(String(63))
    binding: Mapped[str] = mapped_column(String(32), default="memory_backing")
    generation: Mapped[int] = mapped_column(default=0)
    status: Mapped[str] = mapped_column(String(16), default="ACTIVE")  # ACTIVE | RELEASED
    attached_ms: Mapped[int] = mapped_column(default=0)
    last_seen_ms: Mapped[int | None] = mapped_column(default=None)
    released_ms: Mapped[int | None] = mapped_column(default=None)
    release_reason: Mapped[str] = mapped_column(String(64), default="")
    last_error: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (
        Index("ix_runtime_refs_snapshot", "snapshot_id", "status"),
        Index("ix_runtime_refs_sandbox", "sandbox_id", "status"),
        Index("ix_runtime_refs_node", "node_id", "status"),
        # One ACTIVE ref per (sandbox, binding): acquire releases the old one in its transaction.
        Index("uq_runtime_refs_active", "sandbox_id", "binding", unique=True,
              sqlite_where=text("status = 'ACTIVE'"), postgresql_where=text("status = 'ACTIVE'")),
    )
