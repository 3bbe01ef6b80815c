"""The local catalog (SPEC CAT-1, CAT-2, CAT-5): what is physically on this host.

SQLite in WAL mode, ``catalog.db`` in the agent state dir. Two tables:

* ``meta(key, value)`` — ``epoch`` (32 random hex, made once when the file is new) and
  ``seq`` (bumped by every committed change, inside the same transaction, so a reader never
  sees entries and seq disagree);
* ``entries(kind, id, body)`` — one row per catalog entry, ``body`` canonical JSON.

Identity is ``{epoch, seq, digest}``; the digest is ``canonical.catalog_digest`` of every
entry but task records ({kind, id, body} sorted by (kind, id)) — the coordinator computes
the same function over its mirror, so equal digests mean equal catalogs.

CAT-4 (the zguide "Clone" pattern, STYLE 9): every committed change is also appended to an
in-memory **journal** ``(seq, upserts, deletes)``. :class:`CatalogFeed` turns it into
CATALOG_DELTA bodies for the live session: the changes after the feed's cursor, merged, with
the digest at ``to_seq``. Task records bump seq but carry no entries (they are not mirrored),
so a delta still moves the mirror's seq along with ours and heartbeats match it. The journal
is bounded; changes it no longer holds (overflow, or made by an earlier process) are *lost*:
the feed then sends nothing and the coordinator, seeing heartbeats that disagree with its
mirror, asks for a snapshot (CAT-5), which restarts the feed at the snapshot's seq.
"""
from __future__ import annotations

import collections
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
# The other entry kinds (CAT-1), named once for every module that writes or reads them.
ARTIFACT_KIND, LAYER_KIND, REPLICA_KIND, ORPHAN_KIND = "artifact", "layer", "replica", "orphan"
SANDBOX_KIND = "sandbox"  # agent/runtime/sandboxes.py (RT-15, CAT-1)
SNAPSHOT_KIND = "snapshot"  # agent/runtime/snapshots.py (RT-12 to RT-14, CAT-1)
_KIND = re.compile(r"[a-z_]{1,32}\Z")
_ID = re.compile(r"[!-~]{1,256}\Z")

# Journal bounds: one merged delta always fits CatalogDelta (≤ 10,000 upserts/deletes) and a
# frame well under 16 MiB. Past them the oldest changes are dropped and the coordinator gets a
# snapshot instead, which is what a long disconnection needs anyway.
JOURNAL_MAX_CHANGES = 10_000
JOURNAL_MAX_ENTRIES = 1_000
JOURNAL_MAX_BYTES = 4 << 20

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


@dataclass(frozen=True, slots=True)
class Change:
    """One committed change as the journal keeps it: mirrored entries only (no task records)."""
    seq: int
    upserts: list[Entry]
    deletes: list[tuple[str, str]]
    size: int  # bytes of canonical JSON bodies, for the journal bound


@dataclass(frozen=True, slots=True)
class Delta:
    """The merged changes ``from_seq`` → ``to_seq`` and the digest at ``to_seq`` (CAT-4)."""
    epoch: str
    from_seq: int
    to_seq: int
    upserts: list[Entry]
    deletes: list[Entry]  # {"kind", "id"}: the wire's ENTRY shape
    digest: str

    @property
    def empty(self) -> bool:
        return self.to_seq == self.from_seq


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
        # CAT-4 journal: complete for every change after ``_journal_from`` (the seq at open: what an
        # earlier process changed is unknown to this one).
        self._journal: collections.deque[Change] = collections.deque()
        self._journal_from = self._meta()[1]
        self._journal_entries = 0
        self._journal_bytes = 0
        self._watchers: list[Callable[[], None]] = []

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
        done_ups: list[tuple[str, str, str]] = []
        done_dels: list[tuple[str, str]] = []
        with _txn(self._conn):
            for (kind, id_), body in ups:
                cur = self._conn.execute(
                    "INSERT INTO entries VALUES (?, ?, ?) ON CONFLICT(kind, id) DO UPDATE "
                    "SET body=excluded.body WHERE body IS NOT excluded.body", (kind, id_, body))
                if cur.rowcount:
                    done_ups.append((kind, id_, body))
            for kind, id_ in dels:
                if self._conn.execute("DELETE FROM entries WHERE kind=? AND id=?", (kind, id_)).rowcount:
                    done_dels.append((kind, id_))
            _, seq = self._meta()
            if done_ups or done_dels:
                seq += 1
                self._conn.execute("UPDATE meta SET value=? WHERE key='seq'", (str(seq),))
        if done_ups or done_dels:
            self._journal_add(seq, done_ups, done_dels)
        return seq

    def put(self, kind: str, id_: str, body: dict[str, Any]) -> int:
        return self.apply(upserts=[{"kind": kind, "id": id_, "body": body}])

    def delete(self, kind: str, id_: str) -> int:
        return self.apply(deletes=[(kind, id_)])

    # --- startup reconcile (CAT-3) --------------------------------------------------

    def reconcile(self, state_dir: str | None = None) -> dict[str, list[Any]]:
        """Check entries against the store before HELLO (HELLO.reconcile); see :mod:`agent.reconcile`.
        ``state_dir`` defaults to the catalog's own directory, which is the agent state dir."""
        from .reconcile import startup_reconcile  # reconcile imports this module
        return startup_reconcile(self, state_dir or os.path.dirname(self.path)).to_wire()

    # --- change journal (CAT-4) -----------------------------------------------------

    def watch(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every committed change, from the committing thread."""
        self._watchers.append(callback)

    @_locked
    def changes_since(self, seq: int) -> Delta | None:
        """The changes after ``seq``, merged (last write per (kind, id) wins), with the digest
        now; an empty delta when nothing changed; None when the journal no longer holds them."""
        epoch, now = self._meta()
        if seq == now:
            return Delta(epoch, seq, seq, [], [], "")
        if seq < self._journal_from or seq > now:
            return None
        merged: dict[tuple[str, str], Entry | None] = {}
        for change in self._journal:
            if change.seq <= seq:
                continue
            for e in change.upserts:
                merged[(e["kind"], e["id"])] = e
            for key in change.deletes:
                merged[key] = None
        ups = [e for e in merged.values() if e is not None]
        dels = [{"kind": k, "id": i} for (k, i), e in merged.items() if e is None]
        return Delta(epoch, seq, now, ups, dels, self.identity().digest)

    @_locked
    def forget(self, seq: int) -> None:
        """Drop journaled changes up to ``seq``: the coordinator has them (sent or snapshotted)."""
        while self._journal and self._journal[0].seq <= seq:
            self._journal_pop()
        self._journal_from = max(self._journal_from, min(seq, self._meta()[1]))

    def _journal_add(self, seq: int, ups: list[tuple[str, str, str]], dels: list[tuple[str, str]]) -> None:
        mirrored = [{"kind": k, "id": i, "body": json.loads(b)} for k, i, b in ups if k != TASK_KIND]
        gone = [(k, i) for k, i in dels if k != TASK_KIND]
        size = sum(len(b) for k, _, b in ups if k != TASK_KIND)
        self._journal.append(Change(seq, mirrored, gone, size))
        self._journal_entries += len(mirrored) + len(gone)
        self._journal_bytes += size
        while self._journal and (len(self._journal) > JOURNAL_MAX_CHANGES
                                 or self._journal_entries > JOURNAL_MAX_ENTRIES
                                 or self._journal_bytes > JOURNAL_MAX_BYTES):
            self._journal_from = self._journal_pop().seq  # lost: a snapshot will follow
        for callback in self._watchers:
            callback()

    def _journal_pop(self) -> Change:
        change = self._journal.popleft()
        self._journal_entries -= len(change.upserts) + len(change.deletes)
        self._journal_bytes -= change.size
        return change

    # --- internals ----------------------------------------------------------------

    def _meta(self) -> tuple[str, int]:
        rows = dict(self._conn.execute("SELECT key, value FROM meta WHERE key IN ('epoch', 'seq')"))
        return rows["epoch"], int(rows["seq"])

    def _mirrored(self) -> list[Entry]:
        rows = self._conn.execute("SELECT kind, id, body FROM entries WHERE kind != ? ORDER BY kind, id",
                                  (TASK_KIND,))
        return [_row(r) for r in rows]


class CatalogFeed:
    """The publisher side of CAT-4/CAT-5 for one session: which seq the coordinator's mirror
    is at, as far as this agent knows (the cursor), and the next delta after it.

    ``start(seq)`` when a session begins at the HELLO's seq (the coordinator's mirror matched
    it) or after a snapshot at ``seq``; ``pending()`` gives the delta to send (None: nothing,
    or lost — see :attr:`lost`); ``sent(delta)`` once it is out. Not thread-safe: the session's
    event loop owns it; the catalog it reads is."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.cursor: int | None = None
        self.lost = False  # the journal no longer holds changes after the cursor

    def start(self, seq: int) -> None:
        self.cursor = seq
        self.lost = False
        self.catalog.forget(seq)

    def snapshot(self) -> Snapshot:
        """A snapshot for the coordinator; deltas continue from its seq."""
        snap = self.catalog.snapshot()
        self.start(snap.identity.seq)
        return snap

    def stop(self) -> None:
        self.cursor = None

    def pending(self) -> Delta | None:
        if self.cursor is None:
            return None
        delta = self.catalog.changes_since(self.cursor)
        if delta is None:
            self.lost = True
            return None
        return None if delta.empty else delta

    def sent(self, delta: Delta) -> None:
        if self.cursor == delta.from_seq:
            self.cursor = delta.to_seq
            self.catalog.forget(delta.to_seq)


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
