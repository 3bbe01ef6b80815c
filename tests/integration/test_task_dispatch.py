"""Coordinator → agent tasks (WIRE-11 to WIRE-14): an in-process coordinator's TaskDispatcher
against real agent processes; the agents build a real image from a local oci-archive."""
from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from coordinator.config import load_config
from coordinator.health import Health
from coordinator.server import Coordinator
from protocol import ids
from protocol.errors import ImageNotFound, NodeUnavailable
from tests import oci
from tests.layers import Dir, File, layer
from tests.support import Cluster, Proc, async_wait_for

ART = "art-" + "7" * 24


def coordinator_cfg(cluster: Cluster) -> Any:
    argv = cluster.coordinator_argv()
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return load_config(None, [*sets, "task.accept_timeout=1s"])


def in_cluster(tmp_path: Path, db_url: str, body: Callable[[Coordinator, Cluster, Path], Awaitable[None]]) -> None:
    cluster = Cluster(tmp_path, db_url)
    imports = tmp_path / "import"
    imports.mkdir()
    img = oci.image([layer([Dir("etc"), File("etc/hello", b"hi\n")])])
    oci.write_oci_archive(imports / "img.tar", img, tag="v1")

    async def main() -> None:
        coord = Coordinator(coordinator_cfg(cluster), migrate=True)
        await coord.start()
        try:
            await body(coord, cluster, imports)
        finally:
            await coord.stop()
            for p in cluster.agents.values():
                if p.alive():
                    p.kill()

    asyncio.run(main())


def start_agent(cluster: Cluster, imports: Path, node: str) -> Proc:
    return cluster.start_agent(node, [f'image.local_roots=["{imports}"]', "task.progress_interval=0.05"])


async def ready(coord: Coordinator, node: str) -> None:
    reg = coord.registry
    await async_wait_for(lambda: node in reg.nodes and reg.health(reg.nodes[node]) is Health.READY, 30, f"{node} READY")


def test_build_task_progress_result_and_errors(tmp_path: Path) -> None:
    """WIRE-12: accepted, progress, one result; an agent error arrives as its TCError class."""
    async def body(coord: Coordinator, cluster: Cluster, imports: Path) -> None:
        start_agent(cluster, imports, "node-a")
        await ready(coord, "node-a")
        progress: list[dict[str, Any]] = []
        result = await coord.dispatcher.run_task(
            "node-a", "BUILD_ARTIFACT", {"artifact_id": ART, "image": f"oci-archive:{imports}/img.tar:v1",
                                         "writable_size": 0},
            ids.task_id("job-" + "0" * 24, "BUILD", "node-a", 1), on_progress=progress.append)
        assert result["artifact_id"] == ART and len(result["sha256"]) == 64
        assert progress and progress[0]["phase"] == "PULLING"
        with pytest.raises(ImageNotFound):
            await coord.dispatcher.run_task("node-a", "RESOLVE_IMAGE", {"image": f"oci-archive:{imports}/no.tar"},
                                            ids.task_id("job-" + "0" * 24, "RESOLVE", "node-a", 1))
        assert coord.dispatcher.inflight() == []

    in_cluster(tmp_path, f"sqlite:///{tmp_path}/c.db", body)


def test_unaccepted_task_is_resent_then_node_unavailable(tmp_path: Path) -> None:
    """WIRE-14: a stopped (SIGSTOP) agent never accepts: re-sent while READY, then NodeUnavailable."""
    async def body(coord: Coordinator, cluster: Cluster, imports: Path) -> None:
        agent = start_agent(cluster, imports, "node-b")
        await ready(coord, "node-b")
        os.kill(agent.popen.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(NodeUnavailable, match="did not accept"):
                await coord.dispatcher.run_task("node-b", "RESOLVE_IMAGE", {"image": "x"},
                                                ids.task_id("job-" + "1" * 24, "RESOLVE", "node-b", 1))
            # accept_timeout 1 s; stops re-sending once the node stops being READY, at most after 3.
            assert 0.9 < time.monotonic() - t0 < 6
        finally:
            os.kill(agent.popen.pid, signal.SIGCONT)

    in_cluster(tmp_path, f"sqlite:///{tmp_path}/c.db", body)


def test_restarted_agent_gets_the_task_again_and_answers_once(tmp_path: Path) -> None:
    """WIRE-11, WIRE-13, WIRE-14: the agent dies mid-build; its new session gets the task re-sent under
    the same id and the build finishes with one result."""
    async def body(coord: Coordinator, cluster: Cluster, imports: Path) -> None:
        big = oci.image([layer([File(f"z{i}", os.urandom(8 << 20)) for i in range(6)])])
        oci.write_oci_archive(imports / "big.tar", big, tag="v1")
        agent = start_agent(cluster, imports, "node-c")
        await ready(coord, "node-c")
        phases: list[str] = []
        task = asyncio.ensure_future(coord.dispatcher.run_task(
            "node-c", "BUILD_ARTIFACT", {"artifact_id": ART, "image": f"oci-archive:{imports}/big.tar:v1",
                                         "writable_size": 0},
            ids.task_id("job-" + "2" * 24, "BUILD", "node-c", 1), on_progress=lambda p: phases.append(p["phase"])))
        await async_wait_for(lambda: bool(phases), 30, "build progress")
        agent.kill()
        cluster.agents.pop("node-c")
        start_agent(cluster, imports, "node-c")
        result = await asyncio.wait_for(task, 120)
        assert result["artifact_id"] == ART
        assert (tmp_path / "agents" / "node-c" / "store" / "artifacts" / ART / "rootfs.ext4").exists()

    in_cluster(tmp_path, f"sqlite:///{tmp_path}/c.db", body)
