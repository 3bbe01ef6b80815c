"""The local catalog (SPEC CAT-1, CAT-2, CAT-5): what is physically on this host.

SQLite in WAL mode, ``catalog.db`` in the agent state dir. Two tables:

* ``meta(key, value)`` — ``epoch`` (32 random hex, made once when the file is new) and
  ``seq`` (bumped by every committed change, inside the same transaction, so a reader never
  sees entries and seq disagree);
* ``entries(kind, id, body)`` — one row per catalog entry, ``body`` canonical JSON.

Identity is ``{epoch, seq, digest}``; the digest is ``canonical.catalog_digest`` of every
entry but task records ({kind, id, body} sorted by (kind, id)) — the coordinator computes
the same function over its mirror, so equal digests mean equal catalogs. This issue leaves the catalog
empty; later issues fill it through ``apply``/``put``/``delete``.
"""
from __future__ import annotations

import functools
import json
import os
import re
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

from protocol import canonical

FILE_NAME = "catalog.db"
# Task records live in the catalog (WIRE-13) but are the agent's bookkeeping, not state the
# coordinator mirrors: CAT-2 leaves them out of the digest, so they stay out of snapshots too.
TASK_KIND = "task"
_KIND = re.compile(r"[a-z_]{1,32}\Z")
_ID = re.compile(r"[!-~]{1,256}\Z")

T = TypeVar("T")
Entry = dict[str, Any]  # {"kind": str, "id": str, "body": dict}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    kind TEXT NOT NULL, id TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (kind, id)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class Identity:
    epoch: str
    seq: int
    digest: str

    def to_wire(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seq": self.seq, "digest": self.digest}


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A consistent copy of the mirrored entries at ``identity`` (CAT-5 pages are cut from it)."""
    identity: Identity
    entries: list[Entry]

    def pages(self, page_size: int) -> Iterator[list[Entry]]:
        """Pages of at most ``page_size`` entries; an empty catalog is one empty page."""
        if page_size < 1:
            raise ValueError("page_size must be positive")
        if not self.entries:
            yield []
            return
        for i in range(0, len(self.entries), page_size):
            yield self.entries[i:i + page_size]


def _locked(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def wrapper(self: "Catalog", *args: Any, **kwargs: Any) -> T:
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


class Catalog:
    """One SQLite connection shared by the event loop and the build/fetch worker threads;
    every public method holds ``_lock`` so a change and its seq bump never interleave."""

    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        self._lock = threading.RLock()
        self._conn = conn
        self.path = path
        self._identity: Identity | None = None  # digest cache, valid while (epoch, seq) match

    @classmethod
    def open(cls, state_dir: str) -> "Catalog":
        path = os.path.join(state_dir, FILE_NAME)
        # isolation_level=None: we issue BEGIN ourselves, so a change and its seq bump are
        # visibly one transaction rather than relying on the module's implicit transactions.
        conn = sqlite3.connect(path, isolation_level=None, timeout=5.0, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the catalog is the host's source of truth (DESIGN §4); changes are rare.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        with _txn(conn):
            if conn.execute("SELECT value FROM meta WHERE key='epoch'").fetchone() is None:
                conn.execute("INSERT INTO meta VALUES ('epoch', ?), ('seq', '0')", (secrets.token_hex(16),))
        return cls(conn, path)

    @_locked
    def close(self) -> None:
        self._conn.close()

    # --- reading ------------------------------------------------------------------

    @_locked
    def identity(self) -> Identity:
        """Cheap enough for every heartbeat: the digest is recomputed only when seq moved."""
        epoch, seq = self._meta()
        cached = self._identity
        if cached is not None and cached.epoch == epoch and cached.seq == seq:
            return cached
        return self.snapshot().identity

    @_locked
    def snapshot(self) -> Snapshot:
        """Identity and the mirrored entries, read in one transaction."""
        with _txn(self._conn, "BEGIN"):
            epoch, seq = self._meta()
            entries = self._mirrored()
        self._identity = Identity(epoch, seq, canonical.catalog_digest(entries))
        return Snapshot(self._identity, entries)

    @_locked
    def entries(self, kind: str | None = None) -> list[Entry]:
        """Every entry (task records included), or those of one kind, sorted by (kind, id)."""
        if kind is None:
            rows = self._conn.execute("SELECT kind, id, body FROM entries ORDER BY kind, id")
        else:
            rows = self._conn.execute("SELECT kind, id, body FROM entries WHERE kind=? ORDER BY id", (kind,))
        return [_row(r) for r in rows]

    @_locked
    def get(self, kind: str, id_: str) -> Entry | None:
        row = self._conn.execute("SELECT kind, id, body FROM entries WHERE kind=? AND id=?",
                                 (kind, id_)).fetchone()
        return _row(row) if row else None

    # --- changing (CAT-2) -----------------------------------------------------------

    @_locked
    def apply(self, upserts: Iterable[Entry] = (), deletes: Iterable[tuple[str, str]] = ()) -> int:
        """Commit upserts and deletes as one change; returns the new seq (unchanged if nothing changed)."""
        ups = [(_check(e["kind"], e["id"]), canonical.canonical_json(e.get("body") or {}).decode())
               for e in upserts]
        dels = [_check(k, i) for k, i in deletes]
        with _txn(self._conn):
            changed = 0
            for (kind, id_), body in ups:
                cur = self._conn.execute(
                    "INSERT INTO entries VALUES (?, ?, ?) ON CONFLICT(kind, id) DO UPDATE "
                    "SET body=excluded.body WHERE body IS NOT excluded.body", (kind, id_, body))
                changed += cur.rowcount
            for kind, id_ in dels:
                changed += self._conn.execute("DELETE FROM entries WHERE kind=? AND id=?", (kind, id_)).rowcount
            _, seq = self._meta()
            if changed:
                seq += 1
                self._conn.execute("UPDATE meta SET value=? WHERE key='seq'", (str(seq),))
        return seq

    def put(self, kind: str, id_: str, body: dict[str, Any]) -> int:
        return self.apply(upserts=[{"kind": kind, "id": id_, "body": body}])

    def delete(self, kind: str, id_: str) -> int:
        return self.apply(deletes=[(kind, id_)])

    # --- startup reconcile (CAT-3) --------------------------------------------------

    def reconcile(self) -> dict[str, list[Any]]:
        """Check entries against the disk before HELLO. Nothing is stored on disk yet, so
        nothing can be missing or orphaned; later issues walk the store here."""
        return {"missing": [], "orphans": []}

    # --- internals ----------------------------------------------------------------

    def _meta(self) -> tuple[str, int]:
        rows = dict(self._conn.execute("SELECT key, value FROM meta WHERE key IN ('epoch', 'seq')"))
        return rows["epoch"], int(rows["seq"])

    def _mirrored(self) -> list[Entry]:
        rows = self._conn.execute("SELECT kind, id, body FROM entries WHERE kind != ? ORDER BY kind, id",
                                  (TASK_KIND,))
        return [_row(r) for r in rows]


class _txn:
    """``with _txn(conn):`` — BEGIN IMMEDIATE (writers) or BEGIN (readers), COMMIT or ROLLBACK."""

    def __init__(self, conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> None:
        self._conn, self._begin = conn, begin

    def __enter__(self) -> None:
        self._conn.execute(self._begin)

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self._conn.execute("ROLLBACK" if exc_type else "COMMIT")


def _row(r: tuple[str, str, str]) -> Entry:
    return {"kind": r[0], "id": r[1], "body": json.loads(r[2])}


def _check(kind: Any, id_: Any) -> tuple[str, str]:
    # The same formats protocol.messages.ENTRY accepts, so every entry can travel.
    if not isinstance(kind, str) or not _KIND.match(kind):
        raise ValueError(f"catalog kind {kind!r} must match [a-z_]{{1,32}}")
    if not isinstance(id_, str) or not _ID.match(id_):
        raise ValueError(f"catalog id {id_!r} must be 1-256 printable ASCII characters")
    return kind, id_
