"""node_keys rows (SEC-3, SEC-4): each function one short transaction, run in a worker thread."""
from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, delete, insert, select, update

from .models import NodeKey


def load_keys(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(NodeKey.__table__))]


def insert_key(engine: Engine, *, public_key: str, fingerprint: str, node_id: str, state: str,
               now_ms: int, evict: list[str] | None = None) -> None:
    """Insert a new key; ``evict`` lists the oldest pending keys to drop first (SEC-3's bound)."""
    with engine.begin() as conn:
        if evict:
            conn.execute(delete(NodeKey).where(NodeKey.public_key.in_(evict), NodeKey.state == "pending"))
        conn.execute(insert(NodeKey).values(public_key=public_key, fingerprint=fingerprint, node_id=node_id,
                                            state=state, first_seen_ms=now_ms, last_seen_ms=now_ms,
                                            decided_ms=now_ms if state != "pending" else None))


def update_key(engine: Engine, public_key: str, **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(update(NodeKey).where(NodeKey.public_key == public_key).values(**values))
