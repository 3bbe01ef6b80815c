"""The storage gate (SNAP-15, SNAP-16) and the figures behind `storage status` (SNAP-22).

The mode is a pure function of the latest figures a node sent (heartbeat or PROBE_STORAGE);
the gate turns a mode that is not writable into NodeStorageBlocked ``{node, usage, mode}``.
``StorageProbe`` asks READY nodes for fresh figures on ``storage status --refresh`` and feeds
them to the node registry, so a refresh also moves the gate at once.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from protocol.errors import MalformedMessage, TCError
from protocol.storage import WRITABLE, blocked, level, usage_percent

from .health import Health

if TYPE_CHECKING:
    from .health import Judge
    from .nodes import LiveNode, NodeRegistry
    from .tasks import TaskDispatcher

log = logging.getLogger(__name__)

PROBE_OP = "PROBE_STORAGE"


class Limits(Protocol):
    """``StorageConfig`` or the job services' ``StorageLimits``: the three thresholds, in %."""
    warn: float
    reject: float
    delete_only: float


def storage_mode(health: Health, storage: dict[str, int] | None, *, warn: float, reject: float,
                 delete_only: float, fresh: bool = True) -> str:
    """healthy < warn ≤ warn < reject ≤ reject < delete_only ≤ delete_only; unknown when the
    node is not READY or sent no figures within its lease."""
    if health is not Health.READY or storage is None or not fresh:
        return "unknown"
    return level(usage_percent(storage.get("total"), storage.get("used")), warn=warn, reject=reject,
                 delete_only=delete_only)


def node_mode(registry: "NodeRegistry", n: "LiveNode", limits: Limits, now: float,
              judge: "Judge | None" = None) -> tuple[Health, str, float]:
    """(health, mode, usage %) of one node now; figures older than the lease count as none."""
    health = registry.health(n, now, judge)
    fresh = n.storage_at is not None and now - n.storage_at <= registry.t.lost_after(registry.interval())
    st = n.storage or {}
    mode = storage_mode(health, n.storage, warn=limits.warn, reject=limits.reject,
                        delete_only=limits.delete_only, fresh=fresh)
    return health, mode, usage_percent(st.get("total"), st.get("used"))


def check_writable(node: str, usage: float, mode: str, action: str = "snapshot operations") -> None:
    """Raise NodeStorageBlocked unless ``mode`` allows writes (SNAP-16)."""
    if mode not in WRITABLE:
        raise blocked(node, usage, mode, action)


# --- storage status (SNAP-22) -------------------------------------------------------------

@dataclass
class StorageProbe:
    """Fresh figures on demand and the last refresh error per node (memory only: an error is
    a statement about the latest refresh, not state worth a database row)."""
    registry: "NodeRegistry"
    tasks: "TaskDispatcher | None"
    limits: Limits
    timeout: float = 5.0
    errors: dict[str, str] = field(default_factory=dict)

    async def refresh(self) -> dict[str, str]:
        """PROBE_STORAGE to every READY node at once, each bounded by ``timeout``; returns the
        errors of this refresh by node (those nodes read unknown in its answer)."""
        reg = self.registry
        now = reg.clock()
        judge = reg.judge(now)
        ready = sorted(node_id for node_id, n in reg.nodes.items() if reg.health(n, now, judge) is Health.READY)
        outcomes = await asyncio.gather(*(self._probe(node_id) for node_id in ready))
        failed = {node_id: err for node_id, err in zip(ready, outcomes) if err}
        for node_id in ready:
            if node_id in failed:
                self.errors[node_id] = failed[node_id]
            else:
                self.errors.pop(node_id, None)
        return failed

    async def _probe(self, node_id: str) -> str:
        """"" on success (the registry then holds the fresh figures), else the error text."""
        if self.tasks is None:
            return "task dispatch is not available on this coordinator"
        task_id = "tsk-" + secrets.token_hex(12)  # a new probe each time, never a recorded answer
        try:
            result = await asyncio.wait_for(self.tasks.run_task(node_id, PROBE_OP, {}, task_id), self.timeout)
            figures = _figures(result)
        except asyncio.TimeoutError:
            return f"no answer to {PROBE_OP} within {self.timeout:g}s"
        except TCError as exc:
            return f"{exc.name}: {exc.message}"
        n = self.registry.touch(node_id)  # the answer is traffic from the node (WIRE-9)
        if n is None:
            return "node removed during the refresh"
        n.storage, n.storage_at = figures, n.last_seen
        return ""

    def rows(self, failed: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """One row per node, sorted by node id; a node whose refresh just failed reads unknown."""
        reg = self.registry
        judge = reg.judge()
        out = []
        for node_id in sorted(reg.nodes):
            n = reg.nodes[node_id]
            health, mode, usage = node_mode(reg, n, self.limits, judge.now, judge)
            if failed and node_id in failed:
                mode = "unknown"
            st = n.storage or {}
            out.append({"node_id": node_id, "address": n.address, "health": str(health),
                        "usage": round(usage, 1), "mode": mode,
                        "total": st.get("total"), "used": st.get("used"), "free": st.get("free"),
                        "last_error": self.errors.get(node_id, ""),
                        "last_update": int(n.storage_at * 1000) if n.storage_at else None})
        return out


def _figures(result: dict[str, Any]) -> dict[str, int]:
    """The probe's ``{total, used, free}``, checked: an agent's answer is input like any other."""
    st = result.get("storage") if isinstance(result, dict) else None
    if not isinstance(st, dict):
        raise MalformedMessage("PROBE_STORAGE answered without storage figures", {"field": "storage"})
    out = {}
    for key in ("total", "used", "free"):
        v = st.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise MalformedMessage(f"PROBE_STORAGE answered a bad storage.{key}", {"field": f"storage.{key}"})
        out[key] = v
    return out
