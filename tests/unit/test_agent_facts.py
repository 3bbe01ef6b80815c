"""What HELLO reports (SPEC NODE-10, NODE-15, WIRE-6, WIRE-8, CAT-2, CAT-5): facts, versions,
capabilities, storage and the catalog identity, checked against the message validators."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from agent import facts as host
from agent.blobs import advertised
from agent.catalog import TASK_KIND, Catalog
from agent.config import AgentConfig, load_config
from protocol import canonical
from protocol.errors import MalformedMessage
from protocol.messages import CatalogSnapshot, Heartbeat, Hello


def _cfg(tmp_path: Path, *sets: str) -> AgentConfig:
    return load_config(None, [f"agent.state_dir={tmp_path}", "security.curve=false", *sets])


def test_facts_versions_and_capabilities_make_a_valid_hello(tmp_path: Path) -> None:
    """NODE-10, WIRE-6: every fact and version name and value passes Hello's validators."""
    cfg = _cfg(tmp_path, "runtime.driver=none")
    facts = host.collect_facts(cfg)
    versions = host.collect_versions(cfg)
    caps = host.capabilities(cfg)
    catalog = Catalog.open(str(tmp_path))
    hello = Hello(msg_id="m-1", node_id="node-a", address=facts["address"], blob_endpoint="tcp://127.0.0.1:7713",
                  facts=facts, versions=versions, labels={"rack": "r1"}, capabilities=caps,
                  catalog=catalog.identity().to_wire(), reconcile=catalog.reconcile(), boot_ms=1)
    assert set(hello.facts) == {"host_name", "address", "cpu_model", "cpu_flags_hash", "cores", "memory",
                                "accelerator", "store_fs", "reflink", "boot_id"}
    assert set(hello.versions) == {"agent", "guest_image", "host_kernel", "hypervisor"}
    assert set(hello.capabilities) == {"build", "sandbox"}
    catalog.close()


def test_fact_values_have_their_documented_shapes(tmp_path: Path) -> None:
    """NODE-10: types and formats the coordinator relies on."""
    facts = host.collect_facts(_cfg(tmp_path))
    assert re.fullmatch(r"[0-9a-f]{16}", facts["cpu_flags_hash"])
    assert isinstance(facts["cores"], int) and facts["cores"] >= 1
    assert isinstance(facts["memory"], int) and facts["memory"] > 0
    assert facts["accelerator"] in ("kvm", "tcg")
    assert isinstance(facts["reflink"], bool)
    assert facts["store_fs"]  # tmp_path sits on some mounted file system
    assert re.fullmatch(r"[0-9a-f-]{36}", facts["boot_id"])
    assert facts["host_name"]


def test_a_fact_name_outside_a_z_is_refused_by_hello() -> None:
    """WIRE-3: the validators the facts are checked against really bite."""
    with pytest.raises(MalformedMessage):
        Hello(msg_id="m-1", node_id="node-a", address="127.0.0.1", blob_endpoint="tcp://127.0.0.1:1",
              facts={"Host-Name": "x"}, versions={}, labels={}, capabilities={},
              catalog={"epoch": "", "seq": 0, "digest": ""})


def test_configured_address_wins(tmp_path: Path) -> None:
    """NODE-15: agent.address, when set, is the node address."""
    cfg = _cfg(tmp_path, "agent.address=10.9.8.7")
    assert host.node_address(cfg) == "10.9.8.7"
    assert host.collect_facts(cfg)["address"] == "10.9.8.7"


def test_default_address_is_an_ipv4(tmp_path: Path) -> None:
    """NODE-15: without config, the default-route interface's IPv4 (or 127.0.0.1)."""
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", host.node_address(_cfg(tmp_path)))


def test_versions_defaults_and_overrides(tmp_path: Path) -> None:
    """NODE-10, CFG-2: hypervisor "none" with driver none; agent.versions.<name> overrides."""
    plain = host.collect_versions(_cfg(tmp_path, "runtime.driver=none"))
    assert plain["hypervisor"] == "none"
    assert plain["host_kernel"] == os.uname().release
    assert plain["guest_image"] == ""
    assert re.fullmatch(r"\d+\.\d+.*", plain["agent"])
    over = host.collect_versions(_cfg(tmp_path, "agent.versions.guest_image=g-7", "agent.versions.agent=9.9.9",
                                      "agent.versions.hypervisor=8.2.0", "agent.versions.host_kernel=k1"))
    assert over == {"agent": "9.9.9", "guest_image": "g-7", "host_kernel": "k1", "hypervisor": "8.2.0"}


def test_sandbox_capability_needs_the_qemu_driver(tmp_path: Path) -> None:
    """RT-1: driver none never offers sandboxes."""
    assert host.capabilities(_cfg(tmp_path, "runtime.driver=none"))["sandbox"] is False


def test_versions_cache_recomputes_only_when_due_or_invalidated(tmp_path: Path) -> None:
    """WIRE-8: beats read a cache; SIGHUP (invalidate) forces a recompute."""
    cache = host.VersionsCache(_cfg(tmp_path, "runtime.driver=none"), max_age=3600)
    assert cache.due()
    cache.refresh()
    assert not cache.due()
    cache.invalidate()
    assert cache.due()


def test_storage_and_memory_fit_a_heartbeat(tmp_path: Path) -> None:
    """WIRE-8: storage {total, used, free} and mem_free validate, and a beat stays < 1 KiB."""
    beat = Heartbeat(msg_id="0123456789ab-99999", session_id="f" * 64, seq=2**40, catalog_seq=2**40,
                     catalog_digest="a" * 64, versions_digest="b" * 64, refs_digest="c" * 64,
                     storage=host.storage(str(tmp_path)), mem_free=host.mem_free(), sandboxes=64)
    assert len(beat.encode()) < 1024


# --- the catalog identity HELLO and heartbeats carry -------------------------------------

def test_new_catalog_is_empty_with_a_random_epoch(tmp_path: Path) -> None:
    """CAT-2: a fresh catalog gets a new random epoch; seq 0; digest of no entries."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = Catalog.open(str(tmp_path / "a")), Catalog.open(str(tmp_path / "b"))
    ia, ib = a.identity(), b.identity()
    assert re.fullmatch(r"[0-9a-f]{32}", ia.epoch) and ia.epoch != ib.epoch
    assert ia.seq == 0 and ia.digest == canonical.digest([])
    a.close()
    b.close()


def test_every_committed_change_bumps_seq_and_the_digest_follows(tmp_path: Path) -> None:
    """CAT-2: seq grows with each change, survives a reopen, and the digest covers (kind, id)-sorted entries."""
    cat = Catalog.open(str(tmp_path))
    epoch = cat.identity().epoch
    assert cat.put("artifact", "art-2", {"size": 2}) == 1
    assert cat.put("artifact", "art-1", {"size": 1}) == 2
    assert cat.put("artifact", "art-1", {"size": 1}) == 2  # no change, no bump
    assert cat.apply(upserts=[{"kind": "replica", "id": "tpl-x", "body": {}}], deletes=[("artifact", "art-2")]) == 3
    assert cat.delete("artifact", "missing") == 3
    expected = [{"kind": "artifact", "id": "art-1", "body": {"size": 1}},
                {"kind": "replica", "id": "tpl-x", "body": {}}]
    ident = cat.identity()
    assert (ident.seq, ident.digest) == (3, canonical.digest(expected))
    cat.put(TASK_KIND, "tsk-1", {"status": "done"})  # task records: counted in seq, not in the digest
    assert cat.identity().digest == canonical.digest(expected) and cat.identity().seq == 4
    cat.close()
    again = Catalog.open(str(tmp_path))
    assert again.identity().epoch == epoch and again.identity().seq == 4
    again.close()


def test_snapshot_pages_are_bounded_and_valid_messages(tmp_path: Path) -> None:
    """CAT-5: pages of ≤ page_size, all from one (epoch, seq); an empty catalog is one empty page."""
    cat = Catalog.open(str(tmp_path))
    empty = list(cat.snapshot().pages(1000))
    assert empty == [[]]
    cat.apply(upserts=[{"kind": "layer", "id": f"sha256:{i:064x}", "body": {"n": i}} for i in range(25)])
    snap = cat.snapshot()
    pages = list(snap.pages(10))
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [e for p in pages for e in p] == snap.entries
    for n, page in enumerate(pages):
        CatalogSnapshot(msg_id=f"m-{n}", session_id="a" * 16, epoch=snap.identity.epoch, seq=snap.identity.seq,
                        page=n, last=n == len(pages) - 1, entries=page, digest=snap.identity.digest)
    with pytest.raises(ValueError):
        cat.put("Bad Kind", "x", {})
    cat.close()


@pytest.mark.parametrize("bound,address,want", [
    ("tcp://127.0.0.1:40001", "10.0.0.5", "tcp://127.0.0.1:40001"),
    ("tcp://0.0.0.0:7713", "10.0.0.5", "tcp://10.0.0.5:7713"),
    ("tcp://[::]:7713", "fd00::5", "tcp://[fd00::5]:7713"),
    ("ipc:///run/tc/blob.sock", "10.0.0.5", "ipc:///run/tc/blob.sock"),
])
def test_hello_advertises_a_dialable_blob_endpoint(bound: str, address: str, want: str) -> None:
    """WIRE-6, NODE-15: a wildcard bind is advertised under the node address, so peers can dial it."""
    assert advertised(bound, address) == want
