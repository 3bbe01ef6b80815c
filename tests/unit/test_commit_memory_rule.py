"""DIST-8's rule for a commit's memstate (coordinator/templates/commit_job.memory_refusal): a pure
function of the origin's pins and facts and the target's current versions and facts."""
from __future__ import annotations

from coordinator.templates.commit_job import memory_refusal

PINS = {"guest_image": "6.1+abc", "agent": "1.0", "hypervisor": "qemu 7.2", "host_kernel": "6.1.0"}
FACTS = {"accelerator": "tcg", "cpu_flags_hash": "0123456789abcdef"}


def test_equal_versions_and_facts_get_the_memory() -> None:
    """DIST-8, COMPAT-1: equal pins under STRICT (host kernel included) and equal accelerator
    and CPU flags hash → eligible (None); facts the node reports besides those do not matter."""
    assert memory_refusal(PINS, FACTS, dict(PINS), {**FACTS, "cores": 8}, node_ready=True) is None


def test_any_difference_or_unknown_refuses() -> None:
    """DIST-8: each pinned version (the host kernel too, as a memory snapshot compares it,
    COMPAT-2), an empty value on either side (COMPAT-3 UNKNOWN), a node that is not READY, or a
    different or missing accelerator or CPU flags hash → a reason, and the target stays
    rootfs-only."""
    for key in PINS:
        assert memory_refusal(PINS, FACTS, {**PINS, key: "other"}, FACTS, node_ready=True) == "versions STALE"
        assert memory_refusal(PINS, FACTS, {**PINS, key: ""}, FACTS, node_ready=True) == "versions UNKNOWN"
        assert memory_refusal({**PINS, key: ""}, FACTS, PINS, FACTS, node_ready=True) == "versions UNKNOWN"
    assert memory_refusal(PINS, FACTS, PINS, FACTS, node_ready=False) == "versions UNKNOWN"
    assert "accelerator" in (memory_refusal(PINS, FACTS, PINS, {**FACTS, "accelerator": "kvm"},
                                            node_ready=True) or "")
    assert "cpu_flags_hash" in (memory_refusal(PINS, FACTS, PINS, {"accelerator": "tcg"}, node_ready=True) or "")
    assert "cpu_flags_hash" in (memory_refusal(PINS, {"accelerator": "tcg", "cpu_flags_hash": ""}, PINS,
                                               {"accelerator": "tcg", "cpu_flags_hash": ""}, node_ready=True) or "")
    assert memory_refusal(None, None, PINS, FACTS, node_ready=True) == "versions UNKNOWN"
