"""Per-peer bad-message accounting (SEC-8), with an injected clock."""
from protocol.peers import PeerTable


def test_cooldown_after_max_bad_then_recovers() -> None:
    now = [0.0]
    t = PeerTable(max_bad=100, cooldown=60, clock=lambda: now[0])
    for _ in range(100):
        t.record(b"p", dropped=False)
    assert not t.ignored(b"p")
    t.record(b"p", dropped=True)
    assert t.ignored(b"p")
    now[0] = 59.0
    assert t.ignored(b"p")
    now[0] = 61.5
    assert not t.ignored(b"p")
    assert t.totals() == {"refused": 100, "dropped": 1, "ignored": 2}


def test_table_is_bounded() -> None:
    t = PeerTable(max_peers=10)
    for i in range(50):
        t.record(str(i).encode(), dropped=True)
    assert t.get(b"0") is None and t.get(b"49") is not None
    assert t.totals()["dropped"] == 50
