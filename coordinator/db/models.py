"""SQLAlchemy 2 typed models. The annotations are the schema; every change goes through an
Alembic migration in ``migrations/versions`` (HA-1).

Times are unix milliseconds in BIGINT columns: one representation on SQLite and
PostgreSQL, and the same one the wire uses (CONV-3). Node health is never stored (NODE-2):
it is derived from ``last_seen_ms`` and the lease.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, text
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
