"""tcctl against real coordinator and agent processes: drain, remove, JSON shapes, exit codes,
completion (NODE-4, NODE-6, NODE-14, CLI-1..CLI-5, WIRE-19).

Node removal runs on SQLite and PostgreSQL (the ``cluster`` fixture); the other tests read
no backend-specific state and run on SQLite (``sqlite_cluster``: the suite's time budget; the
stores they touch are tested on both backends elsewhere). Every wait polls with a
deadline. ``drain --wait`` timing out needs a node whose sandboxes never stop, which the
``none`` runtime cannot produce yet: that path is covered in-process in
tests/unit/test_cli_parser.py.
"""
from __future__ import annotations

import re
import signal
import subprocess
from typing import Any

from sqlalchemy import text

from coordinator.admin import commands as _commands  # noqa: F401 — registers every command
from coordinator.admin.command import REGISTRY
from tests.support import PY, REPO, Cluster, wait_for

EMPTY = {"sandboxes": 0, "replicas": [], "snapshots": []}
SUMMARY_KEYS = {"node_id", "address", "health", "admin_state", "placeable", "last_seen", "silent_ms",
                "agent_version", "capabilities", "storage", "sandboxes"}
SNAKE = re.compile(r"[a-z][a-z0-9_]*\Z")


def tcctl_raw(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "coordinator.cli.main", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def ready(c: Cluster, node: str) -> bool:
    return c.health().get(node) == "READY"


def assert_error_shape(doc: Any, name: str | None = None) -> dict[str, Any]:
    """CLI-1: {error: {code, name, message, details}} and nothing else."""
    assert isinstance(doc, dict) and set(doc) == {"error"}, doc
    err = doc["error"]
    assert set(err) == {"code", "name", "message", "details"}, err
    assert isinstance(err["code"], int) and err["message"] and isinstance(err["details"], dict)
    if name:
        assert err["name"] == name, err
    return err


def snake_keys(doc: Any, path: str = "") -> list[str]:
    """Keys that are not spec-style field names (lower snake case); dict-valued maps of user
    data (labels, facts, versions, capabilities) are skipped."""
    bad: list[str] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if not SNAKE.match(k):
                bad.append(f"{path}.{k}")
            if k not in ("labels", "facts", "versions", "capabilities", "details"):
                bad += snake_keys(v, f"{path}.{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            bad += snake_keys(v, f"{path}[{i}]")
    return bad


def test_drain_idempotent_lists_remaining_wait_and_uncordon(sqlite_cluster: Cluster) -> None:
    """NODE-4, NODE-6, CLI-2, CLI-3: drain sets DRAINING (persisted, idempotent, not placeable),
    returns what remains; --wait returns at once with no sandbox; uncordon → ACTIVE."""
    cluster = sqlite_cluster
    cluster.start_coordinator()
    cluster.start_agent("n1")
    wait_for(lambda: ready(cluster, "n1"), 30, "n1 READY")
    for _ in range(2):  # idempotent
        rc, doc = cluster.tcctl("node", "drain", "n1")
        assert rc == 0, doc
        assert doc["node"]["admin_state"] == "DRAINING" and doc["node"]["placeable"] is False
        assert doc["remaining"] == EMPTY and doc["request_id"] and "timed_out" not in doc
    assert cluster.nodes()["n1"]["health"] == "READY"  # admin state is independent of health
    rc, doc = cluster.tcctl("node", "list", "--admin", "DRAINING")
    assert rc == 0 and [n["node_id"] for n in doc["nodes"]] == ["n1"]

    rc, doc = cluster.tcctl("node", "drain", "n1", "--wait", "--wait-timeout", "20s", "--request-id", "d-1")
    assert rc == 0, doc
    assert doc["timed_out"] is False and doc["remaining"] == EMPTY and doc["request_id"] == "d-1"
    assert "follow_up" not in doc

    # Human output: the state, what remains, exit 0; the generated request id goes to stderr.
    r = tcctl_raw("node", "drain", "n1", "--wait", "--endpoint", cluster.admin)
    assert r.returncode == 0, r.stderr
    assert "node n1: DRAINING" in r.stdout and "remaining: 0 sandbox(es)" in r.stdout
    assert "request id:" in r.stderr and not r.stdout.lstrip().startswith("{")

    cluster.coordinator.stop()
    cluster.start_coordinator(migrate=False)
    wait_for(lambda: ready(cluster, "n1"), 30, "n1 READY after a coordinator restart")
    assert cluster.nodes()["n1"]["admin_state"] == "DRAINING"  # persisted
    rc, doc = cluster.tcctl("node", "uncordon", "n1")
    assert rc == 0 and doc["node"]["admin_state"] == "ACTIVE"
    wait_for(lambda: cluster.nodes()["n1"]["placeable"], 10, "n1 placeable again")


def node_rows(db_url: str, node_id: str) -> dict[str, int]:
    from coordinator.db.engine import make_engine
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return {t: conn.execute(text(f"SELECT count(*) FROM {t} WHERE {col} = :n"), {"n": node_id}).scalar_one()
                    for t, col in (("nodes", "id"), ("node_versions", "node_id"),
                                   ("node_catalog_entries", "node_id"), ("node_keys", "node_id"))}
    finally:
        engine.dispose()


def add_keys(db_url: str, keys: list[tuple[str, str, str]]) -> None:
    """Key rows as CURVE acceptance leaves them (SEC-4); with CURVE off nothing else writes them."""
    from coordinator.db.engine import make_engine
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            for public, node, state in keys:
                conn.execute(text("INSERT INTO node_keys (public_key, fingerprint, node_id, state, first_seen_ms, "
                                  "last_seen_ms) VALUES (:k, :f, :n, :s, 1, 1)"),
                             {"k": public, "f": "SHA256:" + public[:16], "n": node, "s": state})
    finally:
        engine.dispose()


def test_remove_only_lost_nodes_and_a_returning_agent_is_a_new_node(cluster: Cluster) -> None:
    """NODE-14: refused for a READY node (NodeNotEligible, exit 1); a LOST node is removed with
    its rows, leaves node list, and its agent restarted joins again as a new node."""
    cluster.grace = "0s"
    cluster.start_coordinator()
    for n in ("n1", "n2"):
        cluster.start_agent(n)
    wait_for(lambda: ready(cluster, "n1") and ready(cluster, "n2"), 30, "n1 and n2 READY")
    created_before = cluster.tcctl("node", "show", "n1")[1]["node"]["created"]

    rc, doc = cluster.tcctl("node", "remove", "n1")
    assert rc == 1
    err = assert_error_shape(doc, "NodeNotEligible")
    assert err["code"] == 4002 and err["details"]["nodes"] == [{"node": "n1", "reason": "health READY"}]
    assert "n1" in cluster.nodes()

    cluster.agents["n1"].kill(signal.SIGKILL)
    wait_for(lambda: cluster.health()["n1"] == "LOST", 20, "n1 LOST")
    assert node_rows(cluster.db_url, "n1")["node_versions"] > 0  # something to cascade
    add_keys(cluster.db_url, [("K" * 40, "n1", "accepted"), ("P" * 40, "n9", "pending")])
    rc, doc = cluster.tcctl("node", "remove", "n1", "--request-id", "rm-1")
    assert rc == 0, doc
    assert doc == {"removed": "n1", "request_id": "rm-1"}
    assert set(cluster.nodes()) == {"n2"}
    assert node_rows(cluster.db_url, "n1") == {"nodes": 0, "node_versions": 0, "node_catalog_entries": 0,
                                               "node_keys": 0}
    assert node_rows(cluster.db_url, "n9")["node_keys"] == 1  # another id's pending key stays
    rc, doc = cluster.tcctl("node", "remove", "n1")
    assert rc == 1 and assert_error_shape(doc, "NodeNotFound")
    rc, doc = cluster.tcctl("node", "show", "n1")
    assert rc == 1 and assert_error_shape(doc, "NodeNotFound")
    assert cluster.health()["n2"] == "READY"

    cluster.start_agent("n1")
    wait_for(lambda: ready(cluster, "n1"), 30, "n1 READY again as a new node")
    rc, doc = cluster.tcctl("node", "show", "n1")
    assert rc == 0 and doc["node"]["created"] > created_before
    assert doc["node"]["admin_state"] == "ACTIVE"


EXPECTED_KEYS: dict[str, set[str]] = {
    "node list": {"nodes", "heartbeats", "bad_messages"},
    "node show": {"node"},
    "node cordon": {"node", "request_id"},
    "node uncordon": {"node", "request_id"},
    "node drain": {"node", "remaining", "request_id"},
}


def test_every_command_json_is_one_document_with_spec_names(sqlite_cluster: Cluster) -> None:
    """CLI-1, CLI-2, CLI-5: every registered command's --json output is one JSON document, the
    result or {error:{code,name,message,details}}, with spec (snake_case) field names."""
    cluster = sqlite_cluster
    cluster.start_coordinator()
    cluster.start_agent("n1")
    wait_for(lambda: ready(cluster, "n1"), 30, "n1 READY")
    seen = []
    for name in sorted(REGISTRY):
        if name.startswith("test "):  # commands defined by unit tests in the same process
            continue
        argv = name.split(" ")
        for a in REGISTRY[name].all_args():
            if a.positional and a.required:
                argv.append({"JOB": "job-" + "0" * 24, "ART": "art-" + "0" * 24}.get(a.metavar or "", "n1"))
            elif a.required and a.cli:
                argv += [a.option, "127.0.0.1:9/nothing/here:1"]
        rc, doc = cluster.tcctl(*argv)
        assert isinstance(doc, dict), (name, doc)  # tcctl returns raw text when stdout is not JSON
        if "error" in doc:
            assert rc == 1, (name, doc)
            assert_error_shape(doc)
        else:
            assert rc == 0, (name, doc)
            if name in EXPECTED_KEYS:
                assert set(doc) == EXPECTED_KEYS[name], (name, sorted(doc))
            if REGISTRY[name].mutating:
                assert doc["request_id"], name
        assert not snake_keys(doc), (name, snake_keys(doc))
        seen.append(name)
    assert {"node list", "node show", "node drain", "node remove", "node cordon", "node uncordon"} <= set(seen)
    _, doc = cluster.tcctl("node", "list")
    assert SUMMARY_KEYS <= set(doc["nodes"][0])
    _, doc = cluster.tcctl("node", "drain", "n1")
    assert set(doc["remaining"]) == {"sandboxes", "replicas", "snapshots"}

    # Bash completion asks the coordinator for node ids (tcctl stands in as a shell function).
    script = tcctl_raw("completion", "bash").stdout
    out = subprocess.run(["bash", "-c", script + f"""
tcctl() {{ {PY} -m coordinator.cli.main "$@"; }}
COMP_WORDS=(tcctl node show "" --endpoint {cluster.admin}); COMP_CWORD=3; _tcctl; echo "${{COMPREPLY[@]}}"
"""], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.split() == ["n1"], out


def test_exit_codes(sqlite_cluster: Cluster) -> None:
    """CLI-1: 0 ok, 1 coordinator error, 2 usage (invalid id, unknown option), 4 unreachable —
    each with one JSON document under --json."""
    cluster = sqlite_cluster
    cluster.start_coordinator()
    rc, doc = cluster.tcctl("node", "list")
    assert rc == 0 and doc["nodes"] == []
    rc, doc = cluster.tcctl("node", "show", "nope")
    assert rc == 1 and assert_error_shape(doc, "NodeNotFound")["code"] == 4001
    rc, doc = cluster.tcctl("node", "show", "BAD ID")
    assert rc == 2 and assert_error_shape(doc, "InvalidRequest")["details"]["field"] == "node"
    rc, doc = cluster.tcctl("node", "list", "--no-such-option")
    assert rc == 2 and "--no-such-option" in assert_error_shape(doc, "InvalidRequest")["message"]
    rc, doc = cluster.tcctl("node", "drain", "n1", "--wait-timeout", "soon")
    assert rc == 2 and assert_error_shape(doc)["details"]["field"] == "wait_timeout"
    r = tcctl_raw("node", "list", "--no-such-option")
    assert r.returncode == 2 and r.stdout == "" and "usage:" in r.stderr
    r = tcctl_raw("--version")
    assert r.returncode == 0 and r.stdout.startswith("tcctl ")

    cluster.coordinator.stop()
    rc, doc = cluster.tcctl("node", "list", timeout=1)
    assert rc == 4
    err = assert_error_shape(doc)
    assert err["details"]["attempts"] and err["details"]["command"] == "node list"
    r = tcctl_raw("node", "list", "--endpoint", cluster.admin, "--timeout", "1")
    assert r.returncode == 4 and "unreachable" in r.stderr and r.stdout == ""


def test_completion_bash_is_valid_and_covers_the_registry() -> None:
    """CLI-5, STYLE 2: `tcctl completion bash` is valid bash naming every group and verb, and
    completes groups, verbs, options and choices."""
    r = tcctl_raw("completion", "bash")
    assert r.returncode == 0 and r.stderr == ""
    script = r.stdout
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    for name in REGISTRY:
        if name.startswith("test "):
            continue
        group, *words = name.split(" ")
        assert re.search(rf"_tcctl_groups=.*\b{group}\b", script), name
        if not words:  # a one-word command (resolve)
            continue
        verb, *sub = words
        assert re.search(rf"_tcctl_verbs_{group}=.*\b{verb}\b", script), name
        if sub:
            assert re.search(rf"_tcctl_verbs_{group}__{verb}=.*\b{sub[0]}\b", script), name
    assert "source <(tcctl completion bash)" in script
    assert "source <(tcctl completion bash)" in tcctl_raw("completion", "bash", "--help").stdout

    def complete(*words: str) -> list[str]:
        ws = " ".join(f"'{w}'" for w in words)
        out = subprocess.run(["bash", "-c", script + f"""
COMP_WORDS=({ws}); COMP_CWORD={len(words) - 1}; _tcctl; echo "${{COMPREPLY[@]}}"
"""], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert "node" in complete("tcctl", "") and "completion" in complete("tcctl", "")
    assert complete("tcctl", "node", "dr") == ["drain"]
    assert complete("tcctl", "node", "drain", "n1", "--wa") == ["--wait", "--wait-timeout"]
    assert complete("tcctl", "node", "list", "--health", "") == ["WARMING", "READY", "SUSPECT", "LOST"]
    assert complete("tcctl", "node", "list", "--json", "--admin", "D") == ["DRAINING"]
    assert complete("tcctl", "template", "al") == ["alias"]
    assert complete("tcctl", "template", "alias", "") == ["set", "--help"]
    assert complete("tcctl", "template", "alias", "set", "tpl-x", "demo", "--tr") == ["--transfer"]
    assert complete("tcctl", "resolve", "tpl-x", "--no") == ["--node"]  # a one-word command
