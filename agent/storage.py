"""The agent's side of the storage gate (SNAP-15, SNAP-16, SNAP-22).

* PROBE_STORAGE: fresh ``{total, used, free}`` of the agent store for ``storage status
  --refresh`` — the same psutil figures a heartbeat carries (``facts.storage``).
* ``check_writable``: builds and incoming transfers refuse with NodeStorageBlocked once the
  store's usage reaches ``storage.reject`` (``delete_only`` above that). Defence in depth:
  the coordinator refuses first from its heartbeat figures, but those can be a beat old and
  a store fills up between beats. Modes and wording come from protocol/storage.py, as the
  coordinator's do.
"""
from __future__ import annotations

from typing import Any

from protocol.storage import blocked, level, usage_percent

from . import facts as host
from .config import AgentConfig
from .tasks import TaskContext

PROBE_OP = "PROBE_STORAGE"


def mode(usage: float, reject: float, delete_only: float) -> str:
    """The agent only tells writable ("healthy"; warn is the coordinator's business) from
    reject and delete_only."""
    return level(usage, warn=reject, reject=reject, delete_only=delete_only)


def check_writable(cfg: AgentConfig, action: str) -> None:
    """Raise NodeStorageBlocked ``{node, usage, mode}`` when the store may not take ``action``
    ("builds", "incoming transfers")."""
    figures = host.storage(cfg.agent.state_dir)
    usage = usage_percent(figures.get("total"), figures.get("used"))
    m = mode(usage, float(cfg.storage.reject), float(cfg.storage.delete_only))
    if m != "healthy":
        raise blocked(cfg.node_id, usage, m, action)


class StorageProbe:
    """The PROBE_STORAGE task handler (read-only, so it runs whatever the store's usage)."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg

    def handlers(self) -> dict[str, Any]:
        return {PROBE_OP: self.probe_task}

    def probe_task(self, ctx: TaskContext) -> dict[str, Any]:
        return {"storage": host.storage(self.cfg.agent.state_dir)}
