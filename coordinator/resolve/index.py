"""The resolve index (RES-1, RES-4, RES-5): templates and their replicas in memory.

* **Templates** (per template: status, alias, sandbox memory, replicas by node with status,
  phase, compat and memory flag) are built from the database once at start, before resolve
  is served, then kept current by the event stream: ``template.<id>`` events ``replica``
  (a replica row written, ``Rows.replica`` and the presence checks), ``compat`` (scans,
  adopt-baseline), ``status``/``alias`` (``Rows.publish``); ``node.<id>`` ``removed`` drops that
  node's replicas (NODE-14). Any other ``template.<id>`` event reloads that template. A name
  the index does not know is loaded once — concurrent callers await the same load — and a
  backstop rebuild every ``resolve.backstop_interval`` (60 s) repairs whatever an event missed.
* **Nodes**: health, admin state, capabilities, storage mode and capacity already live in
  memory, in the node registry (health derived from ``last_seen``; storage, free memory and
  the running-sandbox count from the latest heartbeat). Heartbeats publish no events (NODE-9:
  the hot path stays cheap), so a copy kept by events would lag; the index reads the registry
  at decision time instead (``RegistryNodes``), plus the sandbox creates it has in flight.

Every mutation runs on the event loop thread; loads run in worker threads and are applied on
the loop. Entries are immutable and answers are fresh dicts, so nothing handed out changes
under its holder (RES-5). A warm index answers without a database query.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from types import MappingProxyType
from typing import Any, Collection, Iterator, Mapping

from sqlalchemy import select
from sqlalchemy.engine import Engine

from protocol import ids
from protocol.errors import InvalidRequest, SnapshotNotFound, TemplateNotFound
from protocol.messages import Event

from ..db.models import Replica, Template
from ..health import placeable
from ..storage import Limits, node_mode
from .rank import Candidate, NodeEntry, NodeLookup, ReplicaEntry, TemplateEntry, answer, choose

log = logging.getLogger(__name__)

R, T = Replica.__table__, Template.__table__
_REPLICA_FIELDS = tuple(f.name for f in dataclasses.fields(ReplicaEntry) if f.name != "node_id")
_TEMPLATE_COLS = (T.c.id, T.c.alias, T.c.status, T.c.spec)
_REPLICA_COLS = (R.c.template_id, R.c.node_id, R.c.status, R.c.phase, R.c.compat, R.c.has_memory_snapshot,
                 R.c.artifact_id)


def _entry(row: Mapping[str, Any], replicas: dict[str, ReplicaEntry]) -> TemplateEntry:
    spec = row["spec"] or {}
    return TemplateEntry(row["id"], row["alias"], row["status"], int(spec.get("memory_mib") or 512),
                         MappingProxyType(replicas))


def _replica(row: Mapping[str, Any]) -> ReplicaEntry:
    return ReplicaEntry(row["node_id"], row["status"], row["phase"], row["compat"],
                        bool(row["has_memory_snapshot"]), row["artifact_id"])


def load_all(engine: Engine) -> dict[str, TemplateEntry]:
    """Every template with its replicas: two queries, whatever the size (the backstop)."""
    with engine.connect() as c:
        reps: dict[str, dict[str, ReplicaEntry]] = {}
        for row in c.execute(select(*_REPLICA_COLS)).mappings():
            reps.setdefault(row["template_id"], {})[row["node_id"]] = _replica(row)
        return {row["id"]: _entry(row, reps.get(row["id"], {})) for row in c.execute(select(*_TEMPLATE_COLS)).mappings()}


def load_one(engine: Engine, name: str) -> TemplateEntry | None:
    """One template by id, or by alias among non-DELETING templates (CONV-2)."""
    stmt = select(*_TEMPLATE_COLS)
    stmt = stmt.where(T.c.id == name) if name.startswith("tpl-") else stmt.where(T.c.alias == name,
                                                                                   T.c.status != "DELETING")
    with engine.connect() as c:
        row = c.execute(stmt).mappings().first()
        if row is None:
            return None
        reps = {r["node_id"]: _replica(r) for r in c.execute(select(*_REPLICA_COLS)
                                                              .where(R.c.template_id == row["id"])).mappings()}
        return _entry(row, reps)


class RegistryNodes:
    """Node facts for resolve, read from the node registry at decision time (see the module
    docstring), with the creates in flight counted as running sandboxes (RT-18)."""

    def __init__(self, registry: Any, limits: Limits) -> None:
        self.registry = registry
        self.limits = limits
        self.inflight: dict[str, int] = {}

    def lookup(self) -> NodeLookup:
        reg = self.registry
        judge = reg.judge()  # one instant for the whole decision

        def node(node_id: str) -> NodeEntry | None:
            n = reg.nodes.get(node_id)
            if n is None:
                return None
            health, mode, usage = node_mode(reg, n, self.limits, judge.now, judge)
            ok = placeable(health, n.admin_state, mode)
            return NodeEntry(node_id, n.address, ok, "" if ok else f"{health}/{n.admin_state}/storage {mode}",
                             bool((n.capabilities or {}).get("sandbox")), mode, usage, n.mem_free,
                             int(n.sandboxes or 0) + self.inflight.get(node_id, 0), str(health),
                             str(n.admin_state))
        return node


class ResolveIndex:
    def __init__(self, engine: Engine, nodes: RegistryNodes, *, backstop: float = 60.0) -> None:
        self.engine = engine
        self.nodes = nodes
        self.backstop = backstop
        self._templates: dict[str, TemplateEntry] = {}
        self._aliases: dict[str, str] = {}
        self._loading: dict[str, asyncio.Future[TemplateEntry | None]] = {}
        # Change counter and the count at each template's last change: a load or rebuild that
        # read the database before a change must not overwrite what the change brought.
        self._seq = 0
        self._touched: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self.ready = False
        self.loads = 0       # miss loads done (tests check a warm index does none)
        self.rebuilds = 0

    # --- start-up and backstop (RES-4) -----------------------------------------------------

    async def start(self) -> None:
        """The full build, before resolve is served (GC-13); then the backstop loop."""
        await self.rebuild()
        self.ready = True
        self._task = asyncio.ensure_future(self._backstop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _backstop(self) -> None:
        while True:
            await asyncio.sleep(self.backstop)
            try:
                await self.rebuild()
            except Exception:  # noqa: BLE001 — a flaky database skips one rebuild, not the loop
                log.exception("resolve index rebuild failed")

    async def rebuild(self) -> None:
        start = self._seq
        fresh = await asyncio.to_thread(load_all, self.engine)
        kept = {tid: e for tid, e in self._templates.items() if self._touched.get(tid, 0) > start}
        fresh.update(kept)
        for tid in list(fresh):
            if tid not in kept and self._touched.get(tid, 0) > start:  # changed meanwhile, then gone
                del fresh[tid]
        self._templates = fresh
        self._aliases = {e.alias: tid for tid, e in fresh.items() if e.alias and e.status != "DELETING"}
        self._touched = {tid: s for tid, s in self._touched.items() if s > start}
        self.rebuilds += 1

    # --- events ------------------------------------------------------------------------------

    def on_event(self, ev: Event) -> None:
        """EventBus listener: apply the change in memory; never blocks."""
        data = ev.data or {}
        if ev.topic.startswith("template."):
            tid = ev.topic[len("template."):]
            if ev.kind == "replica":
                node = data.get("node") or data.get("node_id")
                if isinstance(node, str):
                    self.replica_changed(tid, node, {k: data[k] for k in _REPLICA_FIELDS if k in data})
            elif ev.kind == "compat":
                node = data.get("node_id") or data.get("node")
                if isinstance(node, str) and isinstance(data.get("new"), str):
                    self.replica_changed(tid, node, {"compat": data["new"]})
            elif ev.kind in ("status", "alias"):
                values = {k: data[k] for k in ("status", "alias") if k in data}
                self.template_changed(tid, **values)
            elif ev.kind == "deleted":
                self.template_dropped(tid)
            elif tid in self._templates:
                asyncio.ensure_future(self._reload(tid))
        elif ev.topic.startswith("node.") and ev.kind == "removed":
            self.node_removed(ev.topic[len("node."):])

    def _touch(self, tid: str) -> None:
        self._seq += 1
        self._touched[tid] = self._seq

    def _put(self, e: TemplateEntry) -> None:
        old = self._templates.get(e.template_id)
        if old is not None and old.alias and self._aliases.get(old.alias) == e.template_id:
            del self._aliases[old.alias]
        self._templates[e.template_id] = e
        if e.alias and e.status != "DELETING":
            self._aliases[e.alias] = e.template_id
        self._touch(e.template_id)

    def replica_changed(self, tid: str, node_id: str, values: Mapping[str, Any]) -> None:
        """A replica row was written (an upsert: fields not given keep their value, or the
        model's default for a new row). Templates not in the index are left to a miss load."""
        e = self._templates.get(tid)
        if e is None:
            return
        cur = e.replicas.get(node_id) or ReplicaEntry(node_id)
        new = dataclasses.replace(cur, **{k: (bool(v) if k == "has_memory_snapshot" else v)
                                          for k, v in values.items()})
        self._put(dataclasses.replace(e, replicas=MappingProxyType({**e.replicas, node_id: new})))

    def template_changed(self, tid: str, **values: Any) -> None:
        e = self._templates.get(tid)
        if e is None:
            return
        if values.get("alias"):  # an alias moves: its old holder no longer has it
            holder = self._aliases.get(values["alias"])
            if holder and holder != tid and holder in self._templates:
                self._put(dataclasses.replace(self._templates[holder], alias=None))
        self._put(dataclasses.replace(e, **values))

    def template_dropped(self, tid: str) -> None:
        e = self._templates.pop(tid, None)
        if e is not None and e.alias and self._aliases.get(e.alias) == tid:
            del self._aliases[e.alias]
        self._touch(tid)

    def node_removed(self, node_id: str) -> None:
        for tid, e in list(self._templates.items()):
            if node_id in e.replicas:
                self._put(dataclasses.replace(e, replicas=MappingProxyType(
                    {n: r for n, r in e.replicas.items() if n != node_id})))

    async def _reload(self, tid: str) -> None:
        try:
            await self._load(tid)
        except Exception:  # noqa: BLE001 — the backstop repairs it
            log.exception("resolve index: reloading %s failed", tid)

    # --- lookups -----------------------------------------------------------------------------

    @staticmethod
    def check_name(name: str) -> None:
        """CONV-2 for a resolve target: snapshot ids (issue 8: no snapshot exists yet) and
        malformed template ids are refused here."""
        if name.startswith("snap-"):
            if not ids.valid("snapshot", name):
                raise InvalidRequest(f"snapshot id {name!r} is malformed", {"field": "template", "reason": "format"})
            raise SnapshotNotFound(f"snapshot {name} not found", {"snapshot": name})
        if name.startswith("tpl-") and not ids.valid("template", name):
            raise InvalidRequest(f"template id {name!r} is malformed", {"field": "template", "reason": "format"})

    def cached(self, name: str) -> TemplateEntry | None:
        tid = name if name.startswith("tpl-") else self._aliases.get(name)
        return self._templates.get(tid) if tid else None

    async def _load(self, name: str) -> TemplateEntry | None:
        """Load one name from the database; concurrent callers share one load (RES-4)."""
        fut = self._loading.get(name)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._loading[name] = fut
        try:
            start = self._seq
            self.loads += 1
            e = await asyncio.to_thread(load_one, self.engine, name)
            if e is not None:
                if self._touched.get(e.template_id, 0) > start and e.template_id in self._templates:
                    e = self._templates[e.template_id]  # changed while we read: the change is newer
                else:
                    self._put(e)
            elif name.startswith("tpl-") and name in self._templates:
                self.template_dropped(name)
            fut.set_result(e)
            return e
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            del self._loading[name]

    async def entry(self, name: str) -> TemplateEntry:
        """The template named (id or alias), loaded on a miss; TemplateNotFound if none."""
        self.check_name(name)
        e = self.cached(name)
        if e is None:
            e = await self._load(name)
        if e is None or e.status == "DELETING":
            raise TemplateNotFound(f"template {name} not found", {"template": name})
        return self.copy(e)

    @staticmethod
    def copy(e: TemplateEntry) -> TemplateEntry:
        """RES-5: a copy for the caller (entries are immutable; the replica map is copied too)."""
        return dataclasses.replace(e, replicas=dict(e.replicas))

    # --- decisions ---------------------------------------------------------------------------

    async def pick(self, name: str, preferred: str | None = None,
                   exclude: Collection[str] = ()) -> tuple[TemplateEntry, Candidate]:
        e = await self.entry(name)
        return e, choose(e, self.nodes.lookup(), preferred, name=name, exclude=exclude)

    async def resolve(self, name: str, preferred: str | None = None) -> dict[str, Any]:
        """RES-1: ``{template_id, node, address, replica, restore}`` or the RES-3 error."""
        e, c = await self.pick(name, preferred)
        return answer(e, c)

    def node(self, node_id: str) -> NodeEntry | None:
        return self.nodes.lookup()(node_id)

    @contextlib.contextmanager
    def placing(self, node_id: str) -> Iterator[None]:
        """Count a create in flight on the node until its heartbeat can know it (RT-18)."""
        self.nodes.inflight[node_id] = self.nodes.inflight.get(node_id, 0) + 1
        try:
            yield
        finally:
            left = self.nodes.inflight[node_id] - 1
            if left:
                self.nodes.inflight[node_id] = left
            else:
                del self.nodes.inflight[node_id]
