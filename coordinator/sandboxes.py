"""Sandbox records and their lifecycle on the coordinator side (RT-17 to RT-19, COMPAT-7, TPL-26).

``create``: the source is checked (a template or alias, or a READY snapshot, which pins the
sandbox to the snapshot's node and gives it an ACTIVE runtime ref, SNAP-18),
an explicit node must be placeable (NodeNotEligible), sandbox-capable (SandboxUnsupported) and
writable (SNAP-16), and the node comes from the resolve index (RES-2). The record is written
CREATING before the agent gets CREATE_SANDBOX, under a task id derived from the sandbox id,
so a retried request (same request id) re-sends the same task and gets the agent's recorded
outcome: one sandbox per request id. The reply comes when the agent reports RUNNING (or
EXITED). A ReplicaIncompatible refusal (COMPAT-7) marks that replica STALE, schedules a compat
scan of the node and retries once on another candidate (not when the node was named).
The readiness probe sent is ``started`` (RUNNING once the command is spawned) unless
``--wait-ready`` asks for the template's own probe (RT-9, RT-17).

``destroy`` sends DESTROY_SANDBOX (the agent treats an absent sandbox as destroyed) and then
deletes the record. ``list``/``show`` join records with the nodes' mirrored catalog entries of
kind ``sandbox`` for the live state (CAT-6); ``show --console`` asks the agent for the last
64 KiB of console (CONSOLE_SANDBOX).
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, Callable

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from protocol import ids
from protocol.canonical import digest
from protocol.errors import (InvalidRequest, NodeNotEligible, NodeNotFound, ReplicaIncompatible, SandboxNotFound,
                             SandboxUnsupported, SnapshotNotFound, TCError, TemplateAttemptInProgress,
                             TemplateHasNoReadyReplica, TemplateInUse, TemplateNotFound)

from .db.models import NodeCatalogEntry, Replica, Sandbox, Template
from .resolve.index import ResolveIndex
from .resolve.rank import NodeEntry, candidates
from .storage import check_writable

log = logging.getLogger(__name__)

S, T, R, C = Sandbox.__table__, Template.__table__, Replica.__table__, NodeCatalogEntry.__table__
CONSOLE_TAIL = 64 * 1024            # RT-19: show --console gives the last 64 KiB
CREATE_DEADLINE_S = 300.0           # boot or restore (60 s) plus the probe (120 s), with room
DESTROY_DEADLINE_S = 60.0           # QMP quit, SIGKILL after 10 s (RT-15)
CONSOLE_DEADLINE_S = 30.0


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- records (short transactions, run in worker threads) ------------------------------------

def record(engine: Engine, sandbox_id: str) -> dict[str, Any] | None:
    with engine.connect() as c:
        row = c.execute(select(S).where(S.c.id == sandbox_id)).mappings().first()
        return dict(row) if row else None


def record_by_request(engine: Engine, request_id: str) -> dict[str, Any] | None:
    with engine.connect() as c:
        row = c.execute(select(S).where(S.c.request_id == request_id)).mappings().first()
        return dict(row) if row else None


def insert_record(engine: Engine, values: dict[str, Any]) -> bool:
    """False when the request id is taken (a concurrent retry won): read that one instead."""
    try:
        with engine.begin() as c:
            c.execute(insert(S).values(**values))
        return True
    except IntegrityError:
        return False


def update_record(engine: Engine, sandbox_id: str, **values: Any) -> None:
    values["updated_ms"] = _now_ms()
    with engine.begin() as c:
        c.execute(update(S).where(S.c.id == sandbox_id).values(**values))


def delete_record(engine: Engine, sandbox_id: str) -> None:
    with engine.begin() as c:
        c.execute(delete(S).where(S.c.id == sandbox_id))


def records(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as c:
        return [dict(r) for r in c.execute(select(S).order_by(S.c.created_ms.desc(), S.c.id)).mappings()]


def catalog_sandboxes(engine: Engine, sandbox_id: str | None = None) -> dict[str, tuple[str, dict[str, Any]]]:
    """Sandbox entries of every node's mirrored catalog: sandbox id → (node, body)."""
    stmt = select(C.c.node_id, C.c.entry_id, C.c.body).where(C.c.kind == "sandbox")
    if sandbox_id is not None:
        stmt = stmt.where(C.c.entry_id == sandbox_id)
    with engine.connect() as c:
        return {e: (n, b or {}) for n, e, b in c.execute(stmt.order_by(C.c.node_id))}


def locate(engine: Engine, sandbox_id: str) -> tuple[dict[str, Any] | None, str, str]:
    """(record, node, live state) of a sandbox the coordinator or a node's catalog knows; the
    live state is the catalog's when it lists the sandbox (CAT-6). SandboxNotFound otherwise."""
    rec = record(engine, sandbox_id)
    live = catalog_sandboxes(engine, sandbox_id).get(sandbox_id)
    if rec is None and live is None:
        raise SandboxNotFound(f"sandbox {sandbox_id} not found", {"sandbox": sandbox_id})
    v = view(rec, live)
    return rec, str(v["node_id"]), str(v["state"])


def template_row(engine: Engine, template_id: str) -> dict[str, Any] | None:
    with engine.connect() as c:
        row = c.execute(select(T).where(T.c.id == template_id)).mappings().first()
        return dict(row) if row else None


def mark_stale(engine: Engine, template_id: str, node_id: str) -> str | None:
    """COMPAT-7: the replica the node refused to restore turns STALE; returns the old value
    (None when there was no READY replica to mark)."""
    with engine.begin() as c:
        old = c.execute(select(R.c.compat).where(R.c.template_id == template_id, R.c.node_id == node_id,
                                                 R.c.status == "READY")).scalar()
        if old is None or old == "STALE":
            return None
        c.execute(update(R).where(R.c.template_id == template_id, R.c.node_id == node_id)
                  .values(compat="STALE", compat_checked_ms=_now_ms(), updated_ms=_now_ms()))
        return str(old)


def sandboxes_using(engine: Engine, template_id: str) -> list[str]:
    """TPL-26: sandboxes made from the template that still exist (FAILED ones do not count):
    the coordinator's records and the nodes' mirrored catalogs (CAT-6)."""
    with engine.connect() as c:
        found = set(c.execute(select(S.c.id).where(S.c.template_id == template_id, S.c.state != "FAILED")).scalars())
    for sid, (_node, body) in catalog_sandboxes(engine).items():
        if body.get("template_id") == template_id and body.get("state") != "FAILED":
            found.add(sid)
    return sorted(found)


def check_not_in_use(engine: Engine, template_id: str) -> None:
    """TemplateInUse while any sandbox made from the template exists (TPL-26, TPL-28)."""
    used = sandboxes_using(engine, template_id)
    if used:
        shown = ", ".join(used[:5]) + (f" and {len(used) - 5} more" if len(used) > 5 else "")
        raise TemplateInUse(f"template {template_id} is in use by {len(used)} sandbox(es): {shown}; "
                            "destroy them first", {"template_id": template_id, "sandboxes": used})


# --- views ------------------------------------------------------------------------------------

def view(rec: dict[str, Any] | None, live: tuple[str, dict[str, Any]] | None, *, detail: bool = False
         ) -> dict[str, Any]:
    """One sandbox as ``sandbox list/show`` print it: the record, with the state the node's
    catalog reports when it lists the sandbox."""
    body = live[1] if live else {}
    if rec is None:  # on a node, unknown to the coordinator
        out = {"sandbox_id": None, "name": "", "source": {"kind": "template", "id": body.get("template_id")},
               "template_id": body.get("template_id"), "node_id": live[0] if live else None,
               "state": body.get("state", ""), "recorded_state": None, "restore": "memory" if body.get("restored")
               else "cold", "vcpus": None, "memory_mib": None, "created_ms": body.get("started_ms"),
               "exit_code": body.get("exit_code"), "recorded": False, "in_catalog": True, "last_error": ""}
    else:
        out = {"sandbox_id": rec["id"], "name": rec["name"],
               "source": {"kind": rec["source_kind"], "id": rec["source_id"]}, "template_id": rec["template_id"],
               "node_id": rec["node_id"], "state": body.get("state") or rec["state"], "recorded_state": rec["state"],
               "restore": rec["restore"], "vcpus": rec["vcpus"], "memory_mib": rec["memory_mib"],
               "created_ms": rec["created_ms"], "exit_code": body.get("exit_code", rec["exit_code"]),
               "recorded": True, "in_catalog": live is not None, "last_error": rec["last_error"]}
        if detail:
            out["runtime_config"] = rec["runtime_config"]
            out["spec"] = rec["spec"]
            out["request_id"] = rec["request_id"]
    if detail and live:
        out["started_ms"] = body.get("started_ms")
        out["restored"] = body.get("restored")
    return out


class Sandboxes:
    """The coordinator's sandbox operations; one per coordinator."""

    def __init__(self, engine: Engine, registry: Any, index: ResolveIndex, tasks: Any, *,
                 publish: Callable[[str, str, dict[str, Any]], Any] | None = None,
                 schedule_scan: Callable[[str], None] | None = None) -> None:
        self.engine = engine
        self.registry = registry
        self.index = index
        self.tasks = tasks
        self.publish = publish
        self.schedule_scan = schedule_scan
        self.snapshots: Any = None  # SnapshotOps: snapshot sources, refs on destroy (SNAP-8, SNAP-19)

    # --- create (RT-17) ---------------------------------------------------------------------

    async def create(self, *, request_id: str, template: str | None = None, snapshot: str | None = None,
                     node: str | None = None, name: str = "", wait_ready: bool = False) -> dict[str, Any]:
        if snapshot and template:
            raise InvalidRequest("give either --template or --snapshot, not both",
                                 {"field": "snapshot", "reason": "conflict"})
        if not template and not snapshot:
            raise InvalidRequest("sandbox create needs --template or --snapshot", {"field": "template",
                                                                                  "reason": "required"})
        source = {"snapshot": snapshot} if snapshot else {"template": template}
        payload = {**source, "node": node, "name": name, "wait_ready": wait_ready}
        want = digest(payload)
        existing = await asyncio.to_thread(record_by_request, self.engine, request_id)
        if existing is None:
            if snapshot:
                existing, mine = await self._new_from_snapshot(request_id, want, snapshot, node, name)
            else:
                existing, mine = await self._new(request_id, want, str(template), node, name, wait_ready)
            if mine:
                return await self._drive(existing, explicit=node is not None or bool(snapshot))
        if existing["request_digest"] != want:
            raise TemplateAttemptInProgress(f"request_id {request_id} already used with a different payload",
                                            {"request_id": request_id, "sandbox_id": existing["id"]})
        if existing["state"] == "CREATING":  # the first caller is waiting, or it went away: same task
            return await self._drive(existing, explicit=node is not None or existing["source_kind"] == "snapshot")
        return view(existing, None)

    async def _new_from_snapshot(self, request_id: str, want: str, snapshot: str, node: str | None,
                                 name: str) -> tuple[dict[str, Any], bool]:
        """A sandbox restored from a READY snapshot on the snapshot's node, the only one holding
        its files (SNAP-8, SNAP-12: a tombstone is SnapshotNotFound)."""
        if self.snapshots is None:
            raise SnapshotNotFound(f"snapshot {snapshot} not found", {"snapshot": snapshot})
        snap = await asyncio.to_thread(self.snapshots.source, snapshot)
        origin = snap["node_id"]
        if node is not None and node != origin:
            raise NodeNotEligible(f"snapshot {snapshot} lives on node {origin}, not {node}",
                                  {"nodes": [{"node": node, "reason": f"snapshot is on {origin}"}]})
        e = self._check_node(origin)
        check_writable(origin, e.usage, e.storage_mode, "sandbox creates")
        sizes = snap["sizes"] or {}
        now = _now_ms()
        rec = {"id": ids.new_id("sbx"), "request_id": request_id, "request_digest": want, "name": name,
               "source_kind": "snapshot", "source_id": snap["id"], "template_id": snap["template_id"],
               "node_id": origin, "runtime_config": snap["runtime_config"] or {},
               "spec": {"artifact_id": snap["base_artifact_id"], "probe": "started", "snapshot_id": snap["id"],
                        "try": 0},
               "vcpus": int(sizes.get("vcpus") or 1), "memory_mib": int(sizes.get("memory_mib") or 512),
               "restore": "snapshot", "state": "CREATING", "exit_code": None, "last_error": "",
               "created_ms": now, "updated_ms": now}
        return await self._record(rec)

    async def _new(self, request_id: str, want: str, template: str, node: str | None, name: str,
                   wait_ready: bool) -> tuple[dict[str, Any], bool]:
        """(record, written by this call); a concurrent retry's record when it won the insert."""
        await self.index.entry(template)  # TemplateNotFound, InvalidRequest: before any node check
        if node is not None:
            self._check_node(node)
        entry, cand = await self.index.pick(template, node)
        if node is not None and cand.node.node_id != node:
            reason = next((r["reason"] for r in self._reasons(entry, node)), "holds no READY replica of it")
            raise TemplateHasNoReadyReplica(
                f"template {template} cannot start a sandbox on node {node}: {reason}",
                {"template": entry.template_id, "nodes": [{"node": node, "reason": reason}]})
        check_writable(cand.node.node_id, cand.node.usage, cand.node.storage_mode, "sandbox creates")
        tpl = await asyncio.to_thread(template_row, self.engine, entry.template_id)
        if tpl is None or tpl["status"] == "DELETING":
            raise TemplateNotFound(f"template {template} not found", {"template": template})
        spec = tpl["spec"] or {}
        now = _now_ms()
        rec = {"id": ids.new_id("sbx"), "request_id": request_id, "request_digest": want, "name": name,
               "source_kind": "template", "source_id": tpl["id"], "template_id": tpl["id"],
               "node_id": cand.node.node_id, "runtime_config": tpl["runtime_config"] or {},
               "spec": {"artifact_id": cand.replica.artifact_id or tpl["artifact_id"],
                        "probe": spec.get("probe", "started") if wait_ready else "started",
                        "template_probe": spec.get("probe", "started"), "wait_ready": wait_ready,
                        "snapshot_mode": spec.get("snapshot_mode", "rootfs"),
                        "compat_policy": spec.get("compat_policy", "STRICT"), "try": 0},
               "vcpus": int(spec.get("vcpus") or 1), "memory_mib": int(spec.get("memory_mib") or 512),
               "restore": "memory" if cand.replica.has_memory_snapshot else "cold", "state": "CREATING",
               "exit_code": None, "last_error": "", "created_ms": now, "updated_ms": now}
        return await self._record(rec)

    async def _record(self, rec: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Write the record before any task (RT-19); a concurrent retry that won the insert
        (same request id) gives its record instead."""
        if await asyncio.to_thread(insert_record, self.engine, rec):
            return rec, True
        other = await asyncio.to_thread(record_by_request, self.engine, rec["request_id"])
        if other is None:
            raise TCError(f"sandbox request {rec['request_id']} could not be recorded",
                          {"request_id": rec["request_id"]})
        return other, False

    def _reasons(self, entry: Any, node: str) -> list[dict[str, str]]:
        _, _, reasons = candidates(entry, self.index.nodes.lookup())
        return [r for r in reasons if r["node"] == node]

    def _check_node(self, node: str) -> NodeEntry:
        """An explicitly named node: known, placeable (storage refusals named as such, SNAP-16),
        with a sandbox runtime (RT-2)."""
        e = self.index.node(node)
        if e is None:
            raise NodeNotFound(f"node {node} is not known", {"node": node})
        if e.health == "READY" and e.admin_state == "ACTIVE":
            check_writable(node, e.usage, e.storage_mode, "sandbox creates")
        if not e.placeable:
            raise NodeNotEligible(f"node {node} is not placeable ({e.reason})",
                                  {"nodes": [{"node": node, "reason": e.reason}]})
        if not e.sandbox:
            raise SandboxUnsupported(f"node {node} has no sandbox runtime (driver none)", {"node": node})
        return e

    def _args(self, rec: dict[str, Any]) -> dict[str, Any]:
        """CREATE_SANDBOX's arguments (the agent contract)."""
        spec = rec["spec"]
        args = {"sandbox_id": rec["id"], "template_id": rec["template_id"], "artifact_id": spec.get("artifact_id"),
                "runtime_config": rec["runtime_config"], "vcpus": rec["vcpus"], "memory_mib": rec["memory_mib"],
                "probe": spec.get("probe", "started"), "restore": rec["restore"]}
        if spec.get("snapshot_id"):
            args["snapshot_id"] = spec["snapshot_id"]
        return args

    async def _drive(self, rec: dict[str, Any], *, explicit: bool) -> dict[str, Any]:
        """Send CREATE_SANDBOX (again: same task id, so the agent answers from its record) and
        record the outcome; COMPAT-7 retries once elsewhere."""
        while True:
            node, try_no = rec["node_id"], int(rec["spec"].get("try", 0))
            task_id = ids.task_id(rec["id"], "CREATE_SANDBOX", node, try_no)
            try:
                with self.index.placing(node):
                    result = await self.tasks.run_task(node, "CREATE_SANDBOX", self._args(rec), task_id,
                                                       deadline_ms=int((time.time() + CREATE_DEADLINE_S) * 1000))
            except ReplicaIncompatible as exc:
                await self._refused(rec, node, exc)
                if explicit or try_no >= 1:
                    await self._failed(rec, exc)
                    raise
                try:
                    entry, cand = await self.index.pick(rec["template_id"], exclude=(node,))
                except TCError:
                    await self._failed(rec, exc)
                    raise
                rec["node_id"] = cand.node.node_id
                rec["restore"] = "memory" if cand.replica.has_memory_snapshot else "cold"
                rec["spec"] = {**rec["spec"], "try": try_no + 1,
                               "artifact_id": cand.replica.artifact_id or rec["spec"].get("artifact_id")}
                log.info("sandbox %s: node %s refused the replica (%s); retrying on %s", rec["id"], node,
                         exc.message, rec["node_id"])
                await asyncio.to_thread(update_record, self.engine, rec["id"], node_id=rec["node_id"],
                                        restore=rec["restore"], spec=rec["spec"])
                continue
            except TCError as exc:
                await self._failed(rec, exc)
                raise
            state = result.get("state") if result.get("state") in ("RUNNING", "EXITED") else "RUNNING"
            restore = rec["restore"] if rec["source_kind"] == "snapshot" else (
                "memory" if result.get("restored") else "cold")
            rec.update(state=state, restore=restore, exit_code=result.get("exit_code"))
            if rec["source_kind"] == "snapshot":  # SNAP-18: the sandbox now holds the snapshot
                await asyncio.to_thread(self._acquire_ref, rec)
            await asyncio.to_thread(update_record, self.engine, rec["id"], state=state, restore=rec["restore"],
                                    exit_code=rec["exit_code"], last_error="")
            out = view(rec, None)
            out.update({k: result.get(k) for k in ("boot_ms", "ready_ms", "restored")})
            out["address"] = getattr(self.registry.nodes.get(node), "address", "")
            return out

    def _acquire_ref(self, rec: dict[str, Any]) -> None:
        from .snapshots import refs
        with self.engine.begin() as c:
            refs.acquire(c, snapshot_id=rec["source_id"], sandbox_id=rec["id"], node_id=rec["node_id"],
                         generation=0, now_ms=_now_ms())

    async def _refused(self, rec: dict[str, Any], node: str, exc: TCError) -> None:
        """COMPAT-7: the replica turns STALE (database, then the index via the event) and the
        node gets a compat scan."""
        old = await asyncio.to_thread(mark_stale, self.engine, rec["template_id"], node)
        if old is not None:
            change = {"template_id": rec["template_id"], "node_id": node, "old": old, "new": "STALE"}
            if self.publish is not None:
                self.publish(f"template.{rec['template_id']}", "compat", change)
            else:
                self.index.replica_changed(rec["template_id"], node, {"compat": "STALE"})
        if self.schedule_scan is not None:
            self.schedule_scan(node)

    async def _failed(self, rec: dict[str, Any], exc: TCError) -> None:
        rec["state"] = "FAILED"
        await asyncio.to_thread(update_record, self.engine, rec["id"], state="FAILED",
                                last_error=f"{exc.name}: {exc.message}"[:4000])

    # --- list / show / destroy (RT-19) --------------------------------------------------------

    async def list(self) -> list[dict[str, Any]]:
        recs = await asyncio.to_thread(records, self.engine)
        live = await asyncio.to_thread(catalog_sandboxes, self.engine)
        out = [view(r, live.pop(r["id"], None)) for r in recs]
        for sid, entry in sorted(live.items()):  # on a node but not recorded here
            out.append({**view(None, entry), "sandbox_id": sid})
        return out

    async def _find(self, sandbox_id: str) -> tuple[dict[str, Any] | None, tuple[str, dict[str, Any]] | None]:
        if not ids.valid("sandbox", sandbox_id):
            raise InvalidRequest(f"sandbox id {sandbox_id!r} is malformed", {"field": "sandbox", "reason": "format"})
        rec = await asyncio.to_thread(record, self.engine, sandbox_id)
        live = (await asyncio.to_thread(catalog_sandboxes, self.engine, sandbox_id)).get(sandbox_id)
        if rec is None and live is None:
            raise SandboxNotFound(f"sandbox {sandbox_id} not found", {"sandbox": sandbox_id})
        return rec, live

    async def show(self, sandbox_id: str, *, console: bool = False) -> dict[str, Any]:
        rec, live = await self._find(sandbox_id)
        out = {**view(rec, live, detail=True), "sandbox_id": sandbox_id}
        if console:
            node = rec["node_id"] if rec else live[0]  # type: ignore[index]
            got = await self.tasks.run_task(node, "CONSOLE_SANDBOX", {"sandbox_id": sandbox_id,
                                                                       "tail_bytes": CONSOLE_TAIL},
                                            "tsk-" + secrets.token_hex(12),
                                            deadline_ms=int((time.time() + CONSOLE_DEADLINE_S) * 1000))
            text = got.get("console", "")
            if isinstance(text, bytes):
                text = text.decode("utf-8", "replace")
            out["console"] = str(text)[-CONSOLE_TAIL:]
        return out

    async def destroy(self, sandbox_id: str) -> dict[str, Any]:
        rec, live = await self._find(sandbox_id)
        node = rec["node_id"] if rec else live[0]  # type: ignore[index]
        if node not in self.registry.nodes:  # removed node (NODE-14): nothing left to ask
            await asyncio.to_thread(delete_record, self.engine, sandbox_id)
            await self._gone(sandbox_id)
            return {"sandbox_id": sandbox_id, "node_id": node, "destroyed": True}
        if rec is not None:
            await asyncio.to_thread(update_record, self.engine, sandbox_id, state="DESTROYING")
        try:
            got = await self.tasks.run_task(node, "DESTROY_SANDBOX", {"sandbox_id": sandbox_id},
                                            "tsk-" + secrets.token_hex(12),
                                            deadline_ms=int((time.time() + DESTROY_DEADLINE_S) * 1000))
        except TCError as exc:
            if rec is not None:
                await asyncio.to_thread(update_record, self.engine, sandbox_id,
                                        last_error=f"destroy: {exc.name}: {exc.message}"[:4000])
            raise
        await asyncio.to_thread(delete_record, self.engine, sandbox_id)
        await self._gone(sandbox_id)
        return {"sandbox_id": sandbox_id, "node_id": node, "destroyed": bool(got.get("destroyed", True))}

    async def _gone(self, sandbox_id: str) -> None:
        """SNAP-19: its ACTIVE refs are released and the tombstone finaliser runs."""
        if self.snapshots is not None:
            await self.snapshots.sandbox_gone(sandbox_id)

