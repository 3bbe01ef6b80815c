"""The resolve rules as pure functions over index entries (RES-2, RES-3, RT-18, COMPAT-5).

``choose`` takes one template's entry and a way to look nodes up, and returns the ranked
candidates or raises the RES-3 error. Nothing here reads a database or a clock, so the rules
are unit-tested with plain values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping

from protocol.errors import TemplateHasNoReadyReplica, TemplateNotFound, TemplateStaleNeedsRedo

MIB = 1 << 20
# RT-18: a candidate keeps this much memory free beyond the sandbox's own, and runs fewer than
# MAX_SANDBOXES sandboxes (the agent's runtime.mem_reserve and runtime.max_sandboxes defaults).
MEM_RESERVE = 256 * MIB
MAX_SANDBOXES = 64
_COMPAT_RANK = {"OK": 0, "UNKNOWN": 1}


@dataclass(frozen=True, slots=True)
class ReplicaEntry:
    """One replica row as resolve needs it. Defaults are the model's, so a partial upsert
    event applied to a fresh entry gives what the row holds."""
    node_id: str
    status: str = "FAILED"
    phase: str = "PENDING"
    compat: str = "UNKNOWN"
    has_memory_snapshot: bool = False
    artifact_id: str | None = None


@dataclass(frozen=True, slots=True)
class TemplateEntry:
    """A template and its replicas by node. Immutable: a change builds a new entry, so an entry
    handed out never changes under its holder (RES-5)."""
    template_id: str
    alias: str | None = None
    status: str = "PENDING"
    memory_mib: int = 512
    replicas: Mapping[str, ReplicaEntry] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """A node at the moment of the decision: placeability (NODE-5) with its reason, the
    `sandbox` capability (RT-2) and capacity (RT-18)."""
    node_id: str
    address: str = ""
    placeable: bool = False
    reason: str = ""                 # why not placeable: "HEALTH/ADMIN/storage MODE"
    sandbox: bool = False
    storage_mode: str = "unknown"
    usage: float = 0.0
    mem_free: int | None = None      # bytes, from the latest heartbeat
    sandboxes: int = 0               # running (heartbeat) plus creates in flight
    health: str = "READY"
    admin_state: str = "ACTIVE"


@dataclass(frozen=True, slots=True)
class Candidate:
    replica: ReplicaEntry
    node: NodeEntry


NodeLookup = Callable[[str], "NodeEntry | None"]


def capacity_refusal(node: NodeEntry, memory_mib: int) -> str:
    """RT-18 in words, or "" when the node has room for one more sandbox of that size."""
    need = memory_mib * MIB + MEM_RESERVE
    if node.mem_free is None:
        return "no free-memory figures from the node yet"
    if node.mem_free < need:
        return (f"not enough free memory (need {need // MIB} MiB with the reserve, "
                f"free {node.mem_free // MIB} MiB)")
    if node.sandboxes >= MAX_SANDBOXES:
        return f"runs {node.sandboxes} sandboxes (limit {MAX_SANDBOXES})"
    return ""


def node_refusal(node: NodeEntry | None, memory_mib: int) -> str:
    """Why a sandbox of ``memory_mib`` cannot start on this node now ("" if it can)."""
    if node is None:
        return "unknown node"
    if not node.placeable:
        return f"not placeable: {node.reason}"
    if not node.sandbox:
        return "no sandbox runtime (driver none)"
    return capacity_refusal(node, memory_mib)


def candidates(tpl: TemplateEntry, nodes: NodeLookup, exclude: Collection[str] = ()
               ) -> tuple[list[Candidate], list[str], list[dict[str, str]]]:
    """(ranked candidates, nodes whose only fault is a STALE replica, reasons by node).

    RES-2: READY replicas on placeable, sandbox-capable nodes with capacity, compat not STALE;
    OK before UNKNOWN, a memory snapshot before a cold boot, fewer running sandboxes, node id."""
    usable: list[Candidate] = []
    stale: list[str] = []
    reasons: list[dict[str, str]] = []
    for node_id in sorted(tpl.replicas):
        r = tpl.replicas[node_id]
        if node_id in exclude:
            reasons.append({"node": node_id, "reason": "refused this replica moments ago (COMPAT-7)"})
            continue
        if r.status != "READY":
            reasons.append({"node": node_id, "reason": f"replica {r.status} (phase {r.phase})"})
            continue
        node = nodes(node_id)
        why = node_refusal(node, tpl.memory_mib)
        if why:
            reasons.append({"node": node_id, "reason": why})
        elif r.compat == "STALE":
            stale.append(node_id)
            reasons.append({"node": node_id, "reason": "replica STALE: needs redo"})
        else:
            assert node is not None
            usable.append(Candidate(r, node))
    usable.sort(key=lambda c: (_COMPAT_RANK.get(c.replica.compat, 1), not c.replica.has_memory_snapshot,
                               c.node.sandboxes, c.node.node_id))
    return usable, stale, reasons


def choose(tpl: TemplateEntry, nodes: NodeLookup, preferred: str | None = None, *, name: str | None = None,
           exclude: Collection[str] = ()) -> Candidate:
    """The best candidate; a preferred node that is a candidate wins, otherwise the preference
    is ignored (RES-2). Without one, the RES-3 error (``name``: how the caller named it)."""
    if tpl.status == "DELETING":
        raise TemplateNotFound(f"template {name or tpl.template_id} not found", {"template": name or tpl.template_id})
    usable, stale, reasons = candidates(tpl, nodes, exclude)
    if not usable:
        if stale:
            raise TemplateStaleNeedsRedo(
                f"template {tpl.template_id} is stale on every usable node holding it ({', '.join(sorted(stale))}); "
                f"run tcctl template redo {tpl.template_id} --failed-only",
                {"template": tpl.template_id, "nodes": sorted(stale)})
        raise TemplateHasNoReadyReplica(f"template {name or tpl.template_id} is not ready on any placeable node",
                                        {"template": tpl.template_id, "nodes": reasons})
    return next((c for c in usable if c.node.node_id == preferred), usable[0])


def answer(tpl: TemplateEntry, c: Candidate) -> dict[str, Any]:
    """RES-1's answer, a fresh dict each time (RES-5)."""
    r = c.replica
    return {"template_id": tpl.template_id, "node": c.node.node_id, "address": c.node.address,
            "replica": {"template_id": tpl.template_id, "node_id": r.node_id, "artifact_id": r.artifact_id,
                        "compat": r.compat, "has_memory_snapshot": r.has_memory_snapshot},
            "restore": "memory" if r.has_memory_snapshot else "cold"}
