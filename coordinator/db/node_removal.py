"""Removing a node for good (NODE-14): its row, what cascades from it, and its keys.

One transaction, so a crash never leaves a node without its key row or a key bound to a
node that no longer exists. Called from a worker thread (``asyncio.to_thread``).
"""
from __future__ import annotations

from sqlalchemy import Engine, delete, select

from ..snapshots.refs import release_node
from .models import Node, NodeCatalogEntry, NodeKey, NodeVersion


def remove_node(engine: Engine, node_id: str) -> list[str] | None:
    """Delete the node row, its versions and catalog mirror, and every key row naming it.

    Returns the ids of the snapshots whose ACTIVE runtime refs it released (sorted, maybe
    empty) — the caller runs the tombstone finaliser for them (SNAP-14) — or None if there was
    no such node row (nothing is deleted then). A node that comes
    back later is a new node: with CURVE its key is pending again and needs a new accept.
    Its ACTIVE runtime refs are released ("node removed") in the same transaction.
    """
    with engine.begin() as conn:
        # Checked first: a pending key naming an id that never became a node is not ours to drop.
        if conn.execute(select(Node.id).where(Node.id == node_id)).first() is None:
            return None
        # The foreign keys cascade, but SQLite enforces them only with PRAGMA foreign_keys=ON;
        # deleting the children explicitly keeps both backends identical.
        conn.execute(delete(NodeVersion).where(NodeVersion.node_id == node_id))
        # NODE-14: its ACTIVE runtime refs are RELEASED ("node removed"), kept as history.
        released = release_node(conn, node_id)
        conn.execute(delete(NodeCatalogEntry).where(NodeCatalogEntry.node_id == node_id))
        conn.execute(delete(NodeKey).where(NodeKey.node_id == node_id))
        conn.execute(delete(Node).where(Node.id == node_id))
    return released
