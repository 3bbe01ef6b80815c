"""Artifact transfer between two real agents (WIRE-15 to WIRE-17, DIST-4 to DIST-6, SEC-6, CAT-8).

One hand-driven coordinator ROUTER plays the coordinator for four real ``tc-agent`` processes:

* ``node-a``  a normal source; it builds the artifact everything starts from;
* ``node-b``  the target (``transfer.chunk`` 64 KiB, so even small artifacts take many chunks);
* ``node-c``  a faulty source: it corrupts the first 3 chunks it serves and delays every reply
             (``transfer.test_corrupt_chunks`` / ``test_chunk_delay``, test-only keys);
* ``node-d``  a source that always lies (every chunk corrupted).

Artifacts are built from a local ``oci-archive:`` under ``image.local_roots`` (no registry),
each source building its own copy (its own artifact id), as the builder of a template would.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import zmq

from protocol.messages import Grant, Task, TaskResult, TokenGrant
from tests import oci
from tests.fake_coordinator import Coordinator, start_agent
from tests.layers import Dir, File, layer
from tests.support import Proc, wait_for
from tests.treecmp import sha256_file

ART_A = "art-" + "a1" * 12
ART_C = "art-" + "c1" * 12
ART_D = "art-" + "d1" * 12
NODES = ("node-a", "node-b", "node-c", "node-d")
_ids = itertools.count(1)


def task_id() -> str:
    return f"tsk-{next(_ids):024x}"


@dataclass
class Fleet:
    root: Path
    coord: Coordinator
    image: str
    agents: dict[str, Proc] = field(default_factory=dict)
    idents: dict[str, bytes] = field(default_factory=dict)
    blob: dict[str, str] = field(default_factory=dict)
    built: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, list[str]] = field(default_factory=dict)
    started: list[Proc] = field(default_factory=list)

    def state(self, node: str) -> Path:
        return self.root / f"state-{node}"

    def start(self, node: str) -> None:
        self.agents[node] = start_agent(self.started, self.root, [self.coord.endpoint], *self.extra[node],
                                        node_id=node, state_dir=self.state(node))

    def welcome(self, nodes: tuple[str, ...]) -> None:
        waiting = set(nodes)
        while waiting:
            ident, hello = self.coord.expect_where(
                lambda _i, m: m.TYPE == "HELLO" and m.node_id in waiting, 30, f"HELLO from {sorted(waiting)}")
            self.coord.welcome(ident, hello, interval_ms=500)
            self.idents[hello.node_id] = ident
            self.blob[hello.node_id] = hello.blob_endpoint
            waiting.discard(hello.node_id)

    def send_task(self, node: str, op: str, args: dict[str, Any], tid: str | None = None) -> Task:
        task = Task(msg_id=f"m-{secrets.token_hex(4)}", task_id=tid or task_id(), op=op, args=args, deadline=0)
        self.coord.send(self.idents[node], task)
        return task

    def result(self, task: Task, timeout: float = 60) -> TaskResult:
        for _, seen in self.coord.seen:  # it may have arrived while we waited for another one
            if seen.TYPE == "TASK_RESULT" and seen.task_id == task.task_id and seen.parent_id == task.msg_id:
                return seen
        _, msg = self.coord.expect_where(lambda _i, m: m.TYPE == "TASK_RESULT" and m.task_id == task.task_id
                                         and m.parent_id == task.msg_id,
                                         timeout, f"TASK_RESULT of {task.op} {task.task_id}")
        return msg

    def run(self, node: str, op: str, args: dict[str, Any], timeout: float = 60) -> TaskResult:
        return self.result(self.send_task(node, op, args), timeout)

    def grant(self, source: str, artifact: str, target: str = "node-b", expires_in: float = 3600) -> str:
        token = secrets.token_hex(32)
        msg = Grant(msg_id=f"g-{secrets.token_hex(4)}", artifact_id=artifact, token=token,
                    expires=int((time.time() + expires_in) * 1000), target_node=target, target_key="")
        self.coord.send(self.idents[source], msg)
        self.coord.expect_where(lambda _i, m: m.TYPE == "GRANT_ACK" and m.parent_id == msg.msg_id, 10,
                                "GRANT_ACK")
        return token

    def fetch_args(self, source: str, artifact: str, token: str) -> dict[str, Any]:
        body = self.built[artifact]
        return {"artifact_id": artifact, "files": body["files"], "sha256": body["sha256"], "size": body["size"],
                "source": {"node": source, "endpoint": self.blob[source], "key": ""}, "token": token}

    def artifact_file(self, node: str, artifact: str, name: str = "rootfs.ext4") -> Path:
        return self.state(node) / "store" / "artifacts" / artifact / name

    def catalog_entry(self, node: str, artifact: str) -> dict[str, Any] | None:
        db = sqlite3.connect(f"file:{self.state(node) / 'catalog.db'}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT body FROM entries WHERE kind='artifact' AND id=?", (artifact,)).fetchone()
        finally:
            db.close()
        return json.loads(row[0]) if row else None

    def remove(self, node: str, artifact: str) -> TaskResult:
        res = self.run(node, "REMOVE_ARTIFACT", {"artifact_id": artifact})
        assert res.ok, res.error
        return res


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("transfer")
    img = oci.image([layer([Dir("etc"), File("etc/hello", b"hello\n"), File("data.bin", os.urandom(3 << 20))])])
    oci.write_oci_archive(root / "image.oci.tar", img, tag="v1")
    ctx: zmq.Context[Any] = zmq.Context()
    coord = Coordinator(ctx)
    local = f'image.local_roots=["{root}"]'
    common = [local, "task.progress_interval=0.1", "agent.backoff_max=1s"]
    f = Fleet(root, coord, f"oci-archive:{root / 'image.oci.tar'}:v1", extra={
        "node-a": common,
        "node-b": [*common, "transfer.chunk=64KiB", "transfer.stall_timeout=3s"],
        "node-c": [*common, "transfer.test_corrupt_chunks=3", "transfer.test_chunk_delay=20ms"],
        "node-d": [*common, "transfer.test_corrupt_chunks=1000000"],
    })
    try:
        for node in NODES:
            f.start(node)
        f.welcome(NODES)
        builds = {art: f.send_task(node, "BUILD_ARTIFACT", {"artifact_id": art, "image": f.image,
                                                              "writable_size": 64 << 20})
                  for node, art in (("node-a", ART_A), ("node-c", ART_C), ("node-d", ART_D))}
        for art, task in builds.items():
            res = f.result(task, 120)
            assert res.ok, res.error
            f.built[art] = res.result
        yield f
    finally:
        for p in f.started:
            if p.alive():
                p.kill()
        coord.close()
        ctx.destroy(linger=0)


def test_fetch_copies_a_built_artifact_and_keeps_it_sparse(fleet: Fleet) -> None:
    """DIST-4, DIST-6, WIRE-16, WIRE-17, CAT-8: GRANT to the source, FETCH_ARTIFACT to the target →
    the same bytes, a verified catalog entry, a file as sparse as the source's; a rerun is idempotent."""
    f = fleet
    token = f.grant("node-a", ART_A)
    task = f.send_task("node-b", "FETCH_ARTIFACT", f.fetch_args("node-a", ART_A, token))
    res = f.result(task)
    assert res.ok, res.error
    built = f.built[ART_A]
    assert res.result["sha256"] == built["sha256"] and res.result["fetched_bytes"] == sum(
        x["size"] for x in built["files"])
    progress = [m.progress for _, m in f.coord.seen if m.TYPE == "TASK_PROGRESS" and m.task_id == task.task_id]
    assert progress and {"bytes_done", "bytes_total", "speed", "percent"} <= set(progress[-1])
    src, dst = f.artifact_file("node-a", ART_A), f.artifact_file("node-b", ART_A)
    assert sha256_file(dst) == sha256_file(src) == built["sha256"]
    assert (dst.parent / "config.json").read_bytes() == (src.parent / "config.json").read_bytes()
    entry = f.catalog_entry("node-b", ART_A)
    assert entry is not None and entry["state"] == "verified" and entry["sha256"] == built["sha256"]
    assert entry["files"] == built["files"]
    # Sparse: no more blocks than the source's copy, far fewer than the size.
    assert dst.stat().st_blocks <= src.stat().st_blocks and dst.stat().st_blocks * 512 < built["size"] // 2
    assert not (dst.parent.parent / f"{ART_A}.partial").exists()

    again = f.run("node-b", "FETCH_ARTIFACT", f.fetch_args("node-a", ART_A, token))  # WIRE-14: a rerun
    assert again.ok and again.result["fetched_bytes"] == 0

    # The target now serves it too (fan-out, DIST-3) once it holds a grant for it.
    token_c = f.grant("node-b", ART_A, target="node-c")
    res_c = f.run("node-c", "FETCH_ARTIFACT", {**f.fetch_args("node-b", ART_A, token_c)})
    assert res_c.ok, res_c.error
    assert sha256_file(f.artifact_file("node-c", ART_A)) == built["sha256"]
    f.remove("node-c", ART_A)


def test_wrong_token_or_requester_is_refused(fleet: Fleet) -> None:
    """SEC-6, DIST-5: a token the source never granted, or granted to another node, ends the task
    with TransferTokenInvalid; nothing is registered as verified."""
    f = fleet
    f.remove("node-b", ART_A)
    res = f.run("node-b", "FETCH_ARTIFACT", f.fetch_args("node-a", ART_A, secrets.token_hex(32)))
    assert not res.ok and res.error["name"] == "TransferTokenInvalid"
    token = f.grant("node-a", ART_A, target="node-c")  # granted to another target
    res = f.run("node-b", "FETCH_ARTIFACT", f.fetch_args("node-a", ART_A, token))
    assert not res.ok and res.error["name"] == "TransferTokenInvalid"
    assert token not in f.agents["node-a"].output() and token[:8] in f.agents["node-a"].output()  # SEC-6
    entry = f.catalog_entry("node-b", ART_A)
    assert entry is None or entry["state"] != "verified"


def test_expired_grant_is_renewed_through_token_request(fleet: Fleet) -> None:
    """DIST-5: TransferTokenExpired → the target sends TOKEN_REQUEST; with a new GRANT to the source
    and TOKEN to the target the transfer resumes and finishes."""
    f = fleet
    f.remove("node-b", ART_A)
    old = f.grant("node-a", ART_A, expires_in=-1)
    task = f.send_task("node-b", "FETCH_ARTIFACT", f.fetch_args("node-a", ART_A, old))
    ident, req = f.coord.expect_where(lambda _i, m: m.TYPE == "TOKEN_REQUEST", 30, "TOKEN_REQUEST")
    assert ident == f.idents["node-b"] and req.artifact_id == ART_A and req.source_node == "node-a"
    assert req.task_id == task.task_id
    new = f.grant("node-a", ART_A)
    f.coord.send(ident, TokenGrant(parent_id=req.msg_id, artifact_id=ART_A, token=new,
                                   expires=int((time.time() + 3600) * 1000)))
    res = f.result(task)
    assert res.ok, res.error
    assert sha256_file(f.artifact_file("node-b", ART_A)) == f.built[ART_A]["sha256"]


def test_corrupt_chunks_are_asked_again(fleet: Fleet) -> None:
    """WIRE-16: a chunk whose digest does not match is re-requested; the transfer succeeds."""
    f = fleet
    token = f.grant("node-c", ART_C)
    res = f.run("node-b", "FETCH_ARTIFACT", f.fetch_args("node-c", ART_C, token))
    assert res.ok, res.error
    assert sha256_file(f.artifact_file("node-b", ART_C)) == f.built[ART_C]["sha256"]
    assert "failed its digest: asking again" in f.agents["node-b"].output()
    f.remove("node-b", ART_C)


def test_a_lying_source_ends_in_checksum_mismatch(fleet: Fleet) -> None:
    """WIRE-16, WIRE-17: after 3 bad tries ArtifactChecksumMismatch; no catalog entry, no partial file.
    A whole-file digest that does not match (chunks fine) ends the same way."""
    f = fleet
    token = f.grant("node-d", ART_D)
    res = f.run("node-b", "FETCH_ARTIFACT", f.fetch_args("node-d", ART_D, token))
    assert not res.ok and res.error["name"] == "ArtifactChecksumMismatch", res.error
    assert f.catalog_entry("node-b", ART_D) is None
    store = f.state("node-b") / "store" / "artifacts"
    assert not (store / f"{ART_D}.partial").exists() and not (store / ART_D).exists()

    token = f.grant("node-a", ART_A)
    args = f.fetch_args("node-a", ART_A, token)
    f.remove("node-b", ART_A)
    args["files"] = [{**x, "sha256": "0" * 64} if x["name"] == "config.json" else x for x in args["files"]]
    res = f.run("node-b", "FETCH_ARTIFACT", args)
    assert not res.ok and res.error["name"] == "ArtifactChecksumMismatch"
    assert f.catalog_entry("node-b", ART_A) is None and not (store / f"{ART_A}.partial").exists()


def test_transfer_resumes_after_the_target_is_killed(fleet: Fleet) -> None:
    """WIRE-14, WIRE-17: SIGKILL the target mid-transfer, restart it, re-send the same task: it
    resumes from the partial file's verified prefix and fetches fewer bytes than the artifact holds."""
    f = fleet
    f.remove("node-b", ART_C)
    token = f.grant("node-c", ART_C)
    task = f.send_task("node-b", "FETCH_ARTIFACT", f.fetch_args("node-c", ART_C, token))
    total = sum(x["size"] for x in f.built[ART_C]["files"])
    record = f.state("node-b") / "store" / "artifacts" / f"{ART_C}.partial" / ".progress.json"

    def recorded() -> int:
        try:
            return int(json.loads(record.read_text())["files"]["rootfs.ext4"]["verified"])
        except (OSError, ValueError, KeyError):
            return 0

    def far_enough() -> bool:
        try:  # keep the session alive: answer heartbeats while waiting
            f.coord.expect_where(lambda _i, m: False, 0.1)
        except AssertionError:
            pass
        return recorded() >= total // 8

    wait_for(far_enough, 60, "an eighth of the artifact verified and recorded", interval=0.0)
    f.agents["node-b"].kill()
    done_before = recorded()
    assert 0 < done_before < total
    f.start("node-b")
    f.welcome(("node-b",))
    resend = Task(msg_id="resend-1", task_id=task.task_id, op=task.op, args=task.args, deadline=0)
    f.coord.send(f.idents["node-b"], resend)
    res = f.result(resend, 120)
    assert res.ok, res.error
    assert res.result["resumed_bytes"] >= done_before
    assert res.result["fetched_bytes"] < total
    assert sha256_file(f.artifact_file("node-b", ART_C)) == f.built[ART_C]["sha256"]


def test_a_silent_source_ends_in_node_unavailable(fleet: Fleet) -> None:
    """DIST-5, WIRE-16: a source that takes the FETCHes but never answers fails the task after
    transfer.stall_timeout (3 s on node-b) with NodeUnavailable naming it."""
    f = fleet
    silent = f.coord.sock.context.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    silent.bind("tcp://127.0.0.1:*")
    try:
        f.remove("node-b", ART_C)
        args = f.fetch_args("node-c", ART_C, secrets.token_hex(32))
        args["source"] = {"node": "node-z", "endpoint": silent.getsockopt_string(zmq.LAST_ENDPOINT), "key": ""}
        t0 = time.monotonic()
        res = f.run("node-b", "FETCH_ARTIFACT", args, timeout=40)
        assert not res.ok and res.error["name"] == "NodeUnavailable", res.error
        assert "node-z" in res.error["message"] and res.error["details"]["node"] == "node-z"
        assert 3 <= time.monotonic() - t0 < 25
        assert silent.poll(0), "the FETCHes did reach the silent source"
    finally:
        silent.close()


def test_verify_and_remove(fleet: Fleet) -> None:
    """WIRE-15, CAT-8: VERIFY_ARTIFACT ok, then ArtifactChecksumMismatch once a byte changed (the
    entry is marked corrupt and no longer served); REMOVE_ARTIFACT twice succeeds both times."""
    f = fleet
    token = f.grant("node-a", ART_A)
    res = f.run("node-b", "FETCH_ARTIFACT", f.fetch_args("node-a", ART_A, token))
    assert res.ok, res.error
    ok = f.run("node-b", "VERIFY_ARTIFACT", {"artifact_id": ART_A})
    assert ok.ok and ok.result["ok"] is True and ok.result["sha256"] == f.built[ART_A]["sha256"]
    path = f.artifact_file("node-b", ART_A)
    with open(path, "r+b") as fh:
        fh.seek(1024)
        byte = fh.read(1)
        fh.seek(1024)
        fh.write(bytes([byte[0] ^ 0xFF]))
    bad = f.run("node-b", "VERIFY_ARTIFACT", {"artifact_id": ART_A})
    assert not bad.ok and bad.error["name"] == "ArtifactChecksumMismatch"
    assert f.catalog_entry("node-b", ART_A)["state"] == "corrupt"
    first = f.remove("node-b", ART_A)
    assert first.result["removed"] is True and not path.parent.exists()
    assert f.catalog_entry("node-b", ART_A) is None
    second = f.remove("node-b", ART_A)
    assert second.result["removed"] is False
    missing = f.run("node-b", "VERIFY_ARTIFACT", {"artifact_id": ART_A})
    assert not missing.ok and missing.error["name"] == "ArtifactNotFound"


def test_blob_endpoint_with_curve_serves_the_granted_key_only(tmp_path: Path) -> None:
    """SEC-1, SEC-6, WIRE-16: with CURVE the blob ROUTER learns the requester's proven key (ZAP) and
    serves a FETCH only when it is the grant's target key; the same token from another key, even
    under the target's node id as identity, gets TransferTokenInvalid. Real sockets, in-process."""
    import asyncio

    import zmq.asyncio

    from agent.blobs import BlobServer
    from agent.catalog import Catalog
    from agent.config import load_config
    from agent.grants import Grant as GrantEntry, GrantTable
    from protocol import keys as curve_keys
    from protocol.envelope import parse
    from protocol.message import decode_message
    from protocol.messages import Fetch

    art = "art-" + "e5" * 12
    data = b'{"cmd":["/bin/sh"]}'
    state = tmp_path / "state"
    (state / "store" / "artifacts" / art).mkdir(parents=True)
    (state / "store" / "artifacts" / art / "config.json").write_bytes(data)
    catalog = Catalog.open(str(state))
    catalog.put("artifact", art, {"state": "verified", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                  "files": [{"name": "config.json", "size": len(data),
                                             "sha256": hashlib.sha256(data).hexdigest()}]})
    cfg = load_config(None, [f"agent.state_dir={state}", "agent.blob_endpoint=tcp://127.0.0.1:*"])
    server_pair = curve_keys.load_or_create(tmp_path / "keys", "source")
    target = curve_keys.load_or_create(tmp_path / "keys", "target")
    intruder = curve_keys.load_or_create(tmp_path / "keys", "intruder")
    token = secrets.token_hex(32)
    grants = GrantTable()
    grants.add(GrantEntry(art, token, int((time.time() + 60) * 1000), "node-b", target.public))

    async def scenario() -> list[Any]:
        zctx = zmq.asyncio.Context()
        server = BlobServer(zctx, cfg, server_pair, catalog=catalog, grants=grants)
        endpoint = server.bind()
        serving = asyncio.create_task(server.serve())
        answers = []
        try:
            for pair in (target, intruder):
                sock = zctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.IDENTITY, b"node-b/1")
                sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret.encode())
                sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public.encode())
                sock.setsockopt(zmq.CURVE_SERVERKEY, server_pair.public.encode())
                sock.connect(endpoint)
                await sock.send_multipart(Fetch(msg_id="f1", artifact_id=art, file="config.json", offset=0,
                                                length=1 << 20, token=token).to_frames())
                assert await sock.poll(10_000), "no answer from the CURVE blob endpoint"
                answers.append(decode_message(parse(await sock.recv_multipart(), router=False)))
                sock.close()
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            server.close(0)
            zctx.term()
        return answers

    try:
        chunk, refused = asyncio.run(scenario())
    finally:
        catalog.close()
    assert chunk.TYPE == "CHUNK" and chunk.data == data and chunk.eof is True
    assert chunk.sha256 == hashlib.sha256(data).hexdigest()
    assert refused.TYPE == "ERROR" and refused.name == "TransferTokenInvalid"
