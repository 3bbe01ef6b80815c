"""BUILD_ARTIFACT and RESOLVE_IMAGE through a real ``tc-agent`` process (WIRE-12, WIRE-13,
WIRE-15, IMG-4, IMG-11, IMG-22, IMG-23): a test ROUTER plays the coordinator and a real
registry behind the bearer-token front serves the image."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from protocol.messages import HeartbeatAck, Task
from tests import oci
from tests.fake_coordinator import Coordinator, hello_and_welcome, start_agent
from tests.layers import Dir, File, layer
from tests.registry import Registry
from tests.support import Proc

PASSWORD = "agent-task-Secr3t-never-logged"
ART = "art-" + "e" * 24


def test_build_task_over_the_wire_with_bearer_auth(tmp_path: Path, coord: Coordinator, agents: list[Proc],
                                                   registry_factory: Callable[..., Registry]) -> None:
    reg = registry_factory("bearer", users={"builder": PASSWORD})
    img = oci.image([layer([Dir("etc"), File("etc/hello", b"hello\n")]), layer([File("etc/two", b"2\n")])])
    reg.push("team/app", "1", img, auth=("builder", PASSWORD))
    agent = start_agent(agents, tmp_path, [coord.endpoint], f'image.insecure_registries=["{reg.host}"]',
                        "task.progress_interval=0.05")
    ident, hello = hello_and_welcome(coord)
    assert hello.capabilities["build"] is True  # IMG-22: the preflight passed on this host
    creds = {"username": "builder", "password": PASSWORD}
    image = f"{reg.host}/team/app:1"

    coord.send(ident, Task(msg_id="r-1", task_id="tsk-" + "1" * 24, op="RESOLVE_IMAGE",
                           args={"image": image, "credentials": creds}, deadline=0))
    _, resolved, _ = coord.expect("TASK_RESULT", 30)
    assert resolved.ok, resolved.error
    assert resolved.result["manifest_digest"] == img.manifest_digest
    assert [l["digest"] for l in resolved.result["layers"]] == [b.digest for b in img.layers]

    build = Task(msg_id="b-1", task_id="tsk-" + "2" * 24, op="BUILD_ARTIFACT",
                 args={"artifact_id": ART, "image": image, "credentials": creds, "writable_size": 0,
                       "manifest_digest": img.manifest_digest}, deadline=0)
    coord.send(ident, build)
    _, accepted, _ = coord.expect("TASK_ACCEPTED", 5)
    assert accepted.parent_id == "b-1"
    _, result, _ = coord.expect("TASK_RESULT", 60)
    assert result.ok, result.error
    progress = [m for _, m in coord.seen if m.TYPE == "TASK_PROGRESS" and m.task_id == build.task_id]
    assert progress and {"phase", "bytes_done", "bytes_total", "layers_done", "layers_total", "speed",
                         "percent"} <= set(progress[-1].progress)
    phases = [p.progress["phase"] for p in progress]
    assert phases[0] == "PULLING" and set(phases) <= {"PULLING", "UNPACKING", "BUILDING_EXT4", "GENERATING_JSON"}
    body = result.result
    assert body["artifact_id"] == ART and body["manifest_digest"] == img.manifest_digest
    rootfs = tmp_path / "state" / "store" / "artifacts" / ART / "rootfs.ext4"
    assert rootfs.stat().st_size == body["size"]

    # WIRE-13: the same id again is answered from the record, not built again.
    coord.send(ident, Task(msg_id="b-2", task_id=build.task_id, op=build.op, args=build.args, deadline=0))
    _, again, _ = coord.expect("TASK_RESULT", 10)
    assert again.parent_id == "b-2" and again.result == body

    # CAT-1/CAT-2: the artifact and its layers are catalog entries; task records are not mirrored.
    _, beat, _ = coord.expect("HEARTBEAT", 5)
    assert beat.catalog_seq > 0
    coord.send(ident, HeartbeatAck(parent_id=beat.msg_id, wants=["catalog"]))
    _, page, _ = coord.expect("CATALOG_SNAPSHOT", 5)
    kinds: dict[str, list[Any]] = {}
    for e in page.entries:
        kinds.setdefault(e["kind"], []).append(e["id"])
    assert kinds.get("artifact") == [ART] and sorted(kinds.get("layer", [])) == sorted(b.digest for b in img.layers)
    assert "task" not in kinds

    assert agent.stop() == 0
    seen_text = repr([m for _, m in coord.seen if m.TYPE != "TASK"])
    state_files = [f.read_bytes().decode("latin-1") for f in (tmp_path / "state").glob("catalog.db*")]
    for text in (agent.output(), seen_text, reg.log_text(), *state_files):
        assert PASSWORD not in text  # IMG-4
