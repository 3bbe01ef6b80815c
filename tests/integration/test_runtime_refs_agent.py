"""A real ``tc-agent`` reports its runtime refs (WIRE-8, WIRE-9, SNAP-19), against a test ROUTER
playing the coordinator. The agent's catalog is seeded with the sandbox entries ROLLBACK_SANDBOX
leaves (``snapshot_id``, ``generation``; tests/integration/test_sandbox_snapshots.py checks that
part in QEMU) — a QEMU round trip here cost ~85 s under TCG for no extra coverage of the report.
The ``none`` driver leaves the entries as they are."""
from __future__ import annotations

from pathlib import Path

from agent.catalog import SANDBOX_KIND, Catalog
from protocol import canonical
from protocol.messages import HeartbeatAck
from tests.fake_coordinator import Coordinator, hello_and_welcome, start_agent
from tests.support import Proc

SNAP = "snap-" + "7" * 24
SBX1, SBX2, SBX3 = ("sbx-" + c * 24 for c in "123")


def test_agent_reports_runtime_refs(tmp_path: Path, coord: Coordinator, agents: list[Proc]) -> None:
    """WIRE-8: heartbeats carry refs_digest; WIRE-9: RUNTIME_REFS goes unasked when the digest
    differs from the last one sent in the session (at once, before the first beat), not again
    while unchanged, and in full whenever the coordinator's ack wants "refs"; SNAP-19: one ref
    {snapshot, sandbox, binding, generation} per sandbox entry naming a snapshot, any state."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    cat = Catalog.open(str(state))
    try:
        cat.put(SANDBOX_KIND, SBX2, {"template_id": "tpl-" + "6" * 24, "state": "RUNNING", "snapshot_id": SNAP,
                                     "generation": 3})
        cat.put(SANDBOX_KIND, SBX1, {"template_id": "tpl-" + "6" * 24, "state": "FAILED", "snapshot_id": SNAP,
                                     "generation": 1})
        cat.put(SANDBOX_KIND, SBX3, {"template_id": "tpl-" + "6" * 24, "state": "RUNNING"})  # from a template
    finally:
        cat.close()
    want = [{"snapshot_id": SNAP, "sandbox_id": SBX1, "binding": "memory_backing", "generation": 1},
            {"snapshot_id": SNAP, "sandbox_id": SBX2, "binding": "memory_backing", "generation": 3}]
    start_agent(agents, tmp_path, [coord.endpoint])
    ident, _ = hello_and_welcome(coord, full=True)
    mark = len(coord.seen)
    _, report, _ = coord.expect("RUNTIME_REFS", 10)
    _, beat, _ = coord.expect("HEARTBEAT", 5)
    assert (report.refs, report.digest) == (want, canonical.digest(want))
    assert beat.refs_digest == report.digest and beat.seq == 1  # the report went before the first beat
    for _ in range(3):
        _, beat, _ = coord.expect("HEARTBEAT", 5)
        assert beat.refs_digest == report.digest
    assert [m.TYPE for _, m in coord.seen[mark:]].count("RUNTIME_REFS") == 1  # unchanged: not resent
    coord.send(ident, HeartbeatAck(parent_id=beat.msg_id, wants=["refs"]))
    _, again, _ = coord.expect("RUNTIME_REFS", 5)
    assert (again.refs, again.digest) == (want, report.digest) and again.msg_id != report.msg_id
