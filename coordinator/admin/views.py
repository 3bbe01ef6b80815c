"""Node views for admin commands: derived at read time, never stored (STYLE 7)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..health import placeable
from ..storage import storage_mode, usage_percent

if TYPE_CHECKING:
    from ..health import Judge
    from ..nodes import LiveNode
    from .context import AdminContext


def _ms(t: float | None) -> int | None:
    return int(t * 1000) if t is not None else None


def node_summary(ctx: "AdminContext", n: "LiveNode", now: float, judge: "Judge | None" = None) -> dict[str, Any]:
    reg = ctx.nodes
    health = reg.health(n, now, judge)
    st = ctx.config.storage
    lost_after = reg.t.lost_after(reg.interval())
    fresh = n.storage_at is not None and now - n.storage_at <= lost_after
    mode = storage_mode(health, n.storage, warn=st.warn, reject=st.reject, delete_only=st.delete_only,
                        fresh=fresh)
    return {
        "node_id": n.node_id,
        "address": n.address,
        "health": str(health),
        "admin_state": str(n.admin_state),
        "placeable": placeable(health, n.admin_state, mode),
        "last_seen": _ms(n.last_seen),
        "silent_ms": int((now - n.last_seen) * 1000) if n.last_seen is not None else None,
        "agent_version": n.versions.get("agent", ""),
        "capabilities": dict(sorted(n.capabilities.items())),
        "storage": {"total": (n.storage or {}).get("total"), "used": (n.storage or {}).get("used"),
                    "free": (n.storage or {}).get("free"),
                    "usage": round(usage_percent((n.storage or {}).get("total"), (n.storage or {}).get("used")), 1),
                    "mode": mode},
        "sandboxes": n.sandboxes,
    }


def node_detail(ctx: "AdminContext", n: "LiveNode", now: float) -> dict[str, Any]:
    d = node_summary(ctx, n, now)
    peer = ctx.peers.get(n.node_id.encode())
    d.update({
        "blob_endpoint": n.blob_endpoint,
        "labels": dict(sorted(n.labels.items())),
        "facts": dict(sorted(n.facts.items())),
        "versions": dict(sorted(n.versions.items())),
        "versions_trusted": d["health"] == "READY",  # NODE-11
        "catalog": {"epoch": n.mirror[0], "seq": n.mirror[1], "digest": n.mirror[2],
                    "complete": n.mirror_complete,
                    "reported_seq": n.reported_catalog[0], "reported_digest": n.reported_catalog[1]},
        "session": {"id": (n.session_id or "")[:8], "started": _ms(n.session_started),
                    "heartbeat_seq": n.beat_seq, "interval_ms": int(n.interval_sent * 1000)},
        "mem_free": n.mem_free,
        "created": n.created_ms,
        "bad_messages": {"refused": peer.bad if peer else 0, "dropped": peer.dropped if peer else 0,
                         "ignored": peer.ignored if peer else 0},
        # `node show` fills these from the database and the mirror.
        "replicas": [],
        "orphans": [],
    })
    return d
