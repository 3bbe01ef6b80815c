"""The storage gate's pure parts (SNAP-15, SNAP-16) and `storage status --refresh` against a
fake task port (SNAP-22); the end-to-end gate is in tests/integration/test_storage_gate.py."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent import storage as agent_storage
from agent.config import load_config
from coordinator.config import StorageConfig
from coordinator.events import EventBus
from coordinator.health import Health, Thresholds
from coordinator.nodes import LiveNode, NodeRegistry
from coordinator.storage import StorageProbe, blocked, check_writable, storage_mode, usage_percent
from coordinator.templates.placement import Candidate, storage_refusal
from protocol.errors import NodeStorageBlocked, NodeUnavailable
from tests.support import Clock

KW = dict(warn=70, reject=85, delete_only=95)


def st(used: int, total: int = 1000) -> dict[str, int]:
    return {"total": total, "used": used, "free": max(0, total - used)}


def test_usage_is_used_over_total_clamped() -> None:
    """SNAP-15: used × 100 / total; 0 if total is 0; used clamped to total."""
    assert usage_percent(1000, 250) == 25.0
    assert usage_percent(0, 5) == 0.0 and usage_percent(None, None) == 0.0
    assert usage_percent(100, 150) == 100.0


@pytest.mark.parametrize("used,mode", [(699, "healthy"), (700, "warn"), (849, "warn"), (850, "reject"),
                                       (949, "reject"), (950, "delete_only"), (1000, "delete_only")])
def test_mode_boundaries(used: int, mode: str) -> None:
    """SNAP-15: healthy < 70 ≤ warn < 85 ≤ reject < 95 ≤ delete_only."""
    assert storage_mode(Health.READY, st(used), **KW) == mode


def test_unknown_without_fresh_figures_or_when_not_ready() -> None:
    """SNAP-15: unknown when the node is not READY or sent no figures within its lease."""
    assert storage_mode(Health.READY, st(10), fresh=False, **KW) == "unknown"
    assert storage_mode(Health.WARMING, st(10), **KW) == "unknown"
    assert storage_mode(Health.READY, None, **KW) == "unknown"


def test_refusal_wording_and_details() -> None:
    """SNAP-16: NodeStorageBlocked {node, usage, mode}, the two message shapes."""
    err = blocked("node-b", 87.349, "reject")
    assert err.message == "snapshot operations are blocked on node node-b (usage=87.3%)"
    assert err.details == {"node": "node-b", "usage": 87.3, "mode": "reject"}
    assert blocked("node-b", 0.0, "unknown", "builds").message == "storage state of node node-b is unknown"
    check_writable("n", 75.0, "warn")  # warn still writes
    with pytest.raises(NodeStorageBlocked) as ei:
        check_writable("n", 96.0, "delete_only", "incoming transfers")
    assert ei.value.message == "incoming transfers are blocked on node n (usage=96%)"


def test_job_gate_over_candidates() -> None:
    """SNAP-16 in template jobs: reject and delete_only refuse; healthy and warn pass; unknown is
    left to the node-health rules (TPL-11, NODE-12)."""
    def cand(mode: str, usage: float = 90.0) -> Candidate:
        return Candidate("node-b", mode in ("healthy", "warn"), storage_mode=mode, usage=usage)
    assert storage_refusal(cand("healthy"), "builds") is None
    assert storage_refusal(cand("warn"), "builds") is None
    assert storage_refusal(cand("unknown"), "builds") is None
    assert storage_refusal(None, "builds") is None
    err = storage_refusal(cand("reject", 90.04), "builds")
    assert isinstance(err, NodeStorageBlocked)
    assert (err.message, err.details) == ("builds are blocked on node node-b (usage=90%)",
                                          {"node": "node-b", "usage": 90.0, "mode": "reject"})


def test_agent_gate_reads_the_real_store(tmp_path) -> None:
    """SNAP-16 on the agent: its own thresholds against psutil figures of its state dir."""
    assert agent_storage.mode(84.9, 85, 95) == "healthy"
    assert agent_storage.mode(85, 85, 95) == "reject" and agent_storage.mode(95, 85, 95) == "delete_only"
    cfg = load_config(None, [f"agent.state_dir={tmp_path}", "agent.node_id=node-x"])
    agent_storage.check_writable(cfg, "builds")  # the test disk is not 85 % full
    tight = load_config(None, [f"agent.state_dir={tmp_path}", "agent.node_id=node-x",
                               "storage.reject=0.001%", "storage.delete_only=100%"])
    with pytest.raises(NodeStorageBlocked) as ei:
        agent_storage.check_writable(tight, "incoming transfers")
    assert ei.value.message.startswith("incoming transfers are blocked on node node-x (usage=")
    assert ei.value.details["mode"] == "reject" and ei.value.details["node"] == "node-x"


# --- storage status --refresh (SNAP-22) ------------------------------------------------------

class FakeTasks:
    """A task port: per node, figures to answer, an error to raise, or no answer at all."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.sent: list[tuple[str, str, str]] = []

    async def run_task(self, node_id: str, op: str, args: dict[str, Any], task_id: str,
                       on_progress: Any = None, **_: Any) -> dict[str, Any]:
        self.sent.append((node_id, op, task_id))
        a = self.answers[node_id]
        if a == "hang":
            await asyncio.sleep(3600)
        if isinstance(a, Exception):
            raise a
        return a


def registry(clock: Clock) -> NodeRegistry:
    reg = NodeRegistry(None, Thresholds(interval=2.0, failover_grace=0), EventBus(None), clock=clock)  # type: ignore[arg-type]
    for node_id in ("n3", "n1", "n2", "n4"):
        reg.nodes[node_id] = LiveNode(node_id, address=f"10.0.0.{node_id[1]}", session_id="s", mirror_complete=True,
                                      last_seen=clock(), storage=st(100), storage_at=clock())
    reg.nodes["n4"].session_id = None  # not in session: not asked, reads unknown
    return reg


def test_refresh_asks_ready_nodes_and_feeds_the_gate() -> None:
    """SNAP-22: READY nodes get PROBE_STORAGE; fresh figures replace the heartbeat's (and move
    the mode); a failure or a timeout reads unknown with its error; rows sorted by node id; a
    later successful refresh clears the error."""
    clock = Clock()
    reg = registry(clock)
    tasks = FakeTasks({"n1": {"storage": st(900)}, "n2": NodeUnavailable("node n2 did not accept", {}),
                       "n3": "hang"})
    probe = StorageProbe(reg, tasks, StorageConfig(), timeout=0.2)  # type: ignore[arg-type]
    clock.t += 1.0
    failed = asyncio.run(probe.refresh())
    assert sorted(n for n, op, _ in tasks.sent if op == "PROBE_STORAGE") == ["n1", "n2", "n3"]
    assert len({tid for _, _, tid in tasks.sent}) == 3 and all(tid.startswith("tsk-") for _, _, tid in tasks.sent)
    assert set(failed) == {"n2", "n3"}
    rows = {r["node_id"]: r for r in probe.rows(failed)}
    assert list(rows) == ["n1", "n2", "n3", "n4"]
    assert (rows["n1"]["mode"], rows["n1"]["usage"], rows["n1"]["last_error"]) == ("reject", 90.0, "")
    assert rows["n1"]["last_update"] == int(clock() * 1000)
    assert reg.nodes["n1"].storage == st(900)
    assert rows["n2"]["mode"] == "unknown" and rows["n2"]["last_error"] == "NodeUnavailable: node n2 did not accept"
    assert rows["n3"]["mode"] == "unknown" and "within 0.2s" in rows["n3"]["last_error"]
    assert rows["n4"]["mode"] == "unknown" and rows["n4"]["last_error"] == ""
    # Without a refresh the figures stand as they are, the last errors stay.
    plain = {r["node_id"]: r for r in probe.rows()}
    assert plain["n2"]["mode"] == "healthy" and plain["n2"]["last_error"]
    tasks.answers.update(n2={"storage": st(100)}, n3={"storage": {"total": 5, "used": -1, "free": 0}})
    failed = asyncio.run(probe.refresh())
    assert set(failed) == {"n3"} and "storage.used" in failed["n3"]  # an agent's answer is checked
    assert probe.rows()[1]["last_error"] == ""
