"""Node rows: the few statements the node registry needs, each one short transaction.

Called from worker threads (``asyncio.to_thread``) so the event loop never waits on the
database. Hot data (``last_seen``, storage) is written in batches with Core ``executemany``
(NODE-9, TOOLS.md §5); low-rate changes use plain statements.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, delete, insert, select, update

from protocol.canonical import catalog_digest

from .models import Node, NodeCatalogEntry, NodeVersion


def load_nodes(engine: Engine) -> list[dict[str, Any]]:
    """Every node row with its versions, for the registry's start-up load."""
    with engine.connect() as conn:
        nodes = [dict(r._mapping) for r in conn.execute(select(Node.__table__))]
        versions: dict[str, dict[str, str]] = {}
        for r in conn.execute(select(NodeVersion.__table__)):
            versions.setdefault(r.node_id, {})[r.component] = r.version
    for n in nodes:
        n["versions"] = versions.get(n["id"], {})
    return nodes


def upsert_hello(engine: Engine, *, node_id: str, now_ms: int, address: str, blob_endpoint: str,
                 labels: dict[str, str], capabilities: dict[str, bool], facts: dict[str, Any] | None,
                 facts_digest: str, versions: dict[str, str] | None, versions_digest: str) -> bool:
    """Create the node on its first HELLO (NODE-1) or refresh it; ``facts``/``versions`` are
    None when their digest is unchanged, so they are not rewritten (NODE-9). Returns True if created."""
    with engine.begin() as conn:
        exists = conn.execute(select(Node.id).where(Node.id == node_id)).first() is not None
        values: dict[str, Any] = dict(address=address, blob_endpoint=blob_endpoint, labels=labels,
                                      capabilities=capabilities, last_seen_ms=now_ms, updated_ms=now_ms)
        if facts is not None:
            values.update(facts=facts, facts_digest=facts_digest)
        if versions is not None:
            values.update(versions_digest=versions_digest)
        if exists:
            conn.execute(update(Node).where(Node.id == node_id).values(**values))
        else:
            values.setdefault("facts", facts or {})
            values.setdefault("facts_digest", facts_digest)
            values.setdefault("versions_digest", versions_digest)
            conn.execute(insert(Node).values(
                id=node_id, admin_state="ACTIVE", catalog_epoch="", catalog_seq=0, catalog_digest="",
                sandboxes=0, created_ms=now_ms, **values))
        if versions is not None:
            _replace_versions(conn, node_id, versions)
    return not exists


def write_versions(engine: Engine, node_id: str, versions: dict[str, str], digest: str, now_ms: int) -> None:
    with engine.begin() as conn:
        conn.execute(update(Node).where(Node.id == node_id).values(versions_digest=digest, updated_ms=now_ms))
        _replace_versions(conn, node_id, versions)


def _replace_versions(conn: Any, node_id: str, versions: dict[str, str]) -> None:
    conn.execute(delete(NodeVersion).where(NodeVersion.node_id == node_id))
    if versions:
        conn.execute(insert(NodeVersion), [{"node_id": node_id, "component": k, "version": v}
                                           for k, v in sorted(versions.items())])


def flush_seen(engine: Engine, rows: list[tuple[Any, ...]]) -> int:
    """One transaction for a batch of heartbeats: the last value per node (NODE-9).

    ``rows``: (last_seen_ms, storage_total, storage_used, storage_free, storage_at_ms, mem_free,
    sandboxes, node_id). Plain DB-API ``executemany`` on tuples: at 10k nodes a second the ORM's
    per-row parameter processing costs several times the statement itself (tests/bench)."""
    if not rows:
        return 0
    mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
    sql = (f"UPDATE nodes SET last_seen_ms={mark}, storage_total={mark}, storage_used={mark}, "
           f"storage_free={mark}, storage_at_ms={mark}, mem_free={mark}, sandboxes={mark} WHERE id={mark}")
    with engine.begin() as conn:
        conn.exec_driver_sql(sql, rows)
    return len(rows)


def set_admin_state(engine: Engine, node_id: str, state: str, now_ms: int) -> bool:
    """Persist the admin state (NODE-4); False if the node does not exist."""
    with engine.begin() as conn:
        res = conn.execute(update(Node).where(Node.id == node_id).values(admin_state=state, updated_ms=now_ms))
        return res.rowcount == 1


def replace_mirror(engine: Engine, node_id: str, epoch: str, seq: int, digest: str,
                   entries: list[dict[str, Any]]) -> None:
    """Swap a node's catalog mirror in one transaction (CAT-5)."""
    with engine.begin() as conn:
        conn.execute(delete(NodeCatalogEntry).where(NodeCatalogEntry.node_id == node_id))
        if entries:
            conn.execute(insert(NodeCatalogEntry), [
                {"node_id": node_id, "kind": e["kind"], "entry_id": e["id"], "body": e.get("body") or {}}
                for e in entries])
        conn.execute(update(Node).where(Node.id == node_id).values(
            catalog_epoch=epoch, catalog_seq=seq, catalog_digest=digest))


def apply_delta(engine: Engine, node_id: str, to_seq: int, upserts: list[dict[str, Any]],
                deletes: list[dict[str, Any]]) -> str:
    """Apply one catalog delta (CAT-4) and return the mirror's digest after it, computed from
    the entries in the same transaction and persisted with ``to_seq`` (never the agent's claimed
    digest: a restart must not take a diverged mirror for an equal one). The caller has checked
    epoch and from_seq."""
    with engine.begin() as conn:
        keys = [(e["kind"], e["id"]) for e in [*deletes, *upserts]]
        for kind, entry_id in dict.fromkeys(keys):
            conn.execute(delete(NodeCatalogEntry).where(
                NodeCatalogEntry.node_id == node_id, NodeCatalogEntry.kind == kind,
                NodeCatalogEntry.entry_id == entry_id))
        latest = {(e["kind"], e["id"]): e for e in upserts}
        if latest:
            conn.execute(insert(NodeCatalogEntry), [
                {"node_id": node_id, "kind": k, "entry_id": i, "body": e.get("body") or {}}
                for (k, i), e in latest.items()])
        digest = catalog_digest(_entries(conn, node_id))
        conn.execute(update(Node).where(Node.id == node_id).values(catalog_seq=to_seq, catalog_digest=digest))
    return digest


def mirror_entries(engine: Engine, node_id: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return _entries(conn, node_id)


def _entries(conn: Any, node_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(select(NodeCatalogEntry.kind, NodeCatalogEntry.entry_id, NodeCatalogEntry.body)
                        .where(NodeCatalogEntry.node_id == node_id)
                        .order_by(NodeCatalogEntry.kind, NodeCatalogEntry.entry_id))
    return [{"kind": k, "id": i, "body": b} for k, i, b in rows]
