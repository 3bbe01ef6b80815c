"""Who may talk to the admin endpoint (SEC-2, SEC-5, CLI-1).

* ipc: a user outside the service group gets tcctl's "permission denied" message at once,
  not a timeout. The client runs as ``nobody`` in a forked child (the interpreter is already
  loaded, so only the socket's permissions are in play — exactly what is under test).
* tcp: CURVE with ``admin.allowed_keys``; a client key not listed is refused.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pwd
import subprocess
import time

import pytest

from coordinator.cli.client import AdminClient, Unreachable
from tests.support import PY, REPO, Cluster, free_port, wait_for


def _as_nobody(admin: str, conn) -> None:  # noqa: ANN001
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
    started = time.monotonic()
    try:
        AdminClient([admin], timeout=5).request("node list", {})
        conn.send(("answered", 0.0))
    except Unreachable as exc:
        conn.send((str(exc), time.monotonic() - started))
    except Exception as exc:  # noqa: BLE001
        conn.send((f"{type(exc).__name__}: {exc}", time.monotonic() - started))


def test_user_outside_group_gets_permission_message_not_timeout(cluster: Cluster) -> None:
    """SEC-5: socket dir 0750, socket 0660; tcctl checks access first."""
    if os.geteuid() != 0:
        pytest.fail("this test switches to user nobody and must run as root (CI does)")
    cluster.start_coordinator()
    parent, child = mp.get_context("fork").Pipe()
    p = mp.get_context("fork").Process(target=_as_nobody, args=(cluster.admin, child))
    p.start()
    assert parent.poll(30), "the nobody client did not report"
    message, took = parent.recv()
    p.join(10)
    path = cluster.admin[len("ipc://"):]
    assert f"permission denied on {path} (is this user in group tc?)" in message, message
    assert took < 2.0, f"took {took:.1f}s: it must not wait for a timeout"


def tcctl_tcp(endpoint: str, server_key: str, key_dir: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "coordinator.cli.main", *args, "--json", "--endpoint", endpoint,
                           "--server-key", server_key, "--key-dir", key_dir, "--timeout", "3"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_tcp_admin_needs_an_allowed_key(cluster: Cluster) -> None:
    """SEC-1, SEC-2: a TCP admin endpoint speaks CURVE; only admin.allowed_keys get answers."""
    from protocol import keys as curve
    allowed_dir, other_dir = str(cluster.root / "ok"), str(cluster.root / "other")
    allowed = curve.load_or_create(allowed_dir, "tcctl").public
    port = free_port()
    cluster.curve = True
    cluster.coord_extra = [f"coordinator.admin_endpoint=tcp://127.0.0.1:{port}",
                           f'admin.allowed_keys=["{allowed}"]']
    # start_coordinator polls the ipc admin socket; here the admin endpoint is TCP, so start by hand.
    from tests.support import Proc
    cluster.coordinator = Proc("coordinator", cluster.coordinator_argv(), cluster.root / "coordinator.log",
                               cluster.env()).start()
    endpoint = f"tcp://127.0.0.1:{port}"
    key_file = cluster.root / "coord" / "keys" / "coordinator.key"
    wait_for(key_file.exists, 30, "the coordinator's key")
    server_key = cluster.coordinator_key()
    r = wait_for(lambda: (lambda r: r if r.returncode == 0 else None)(
        tcctl_tcp(endpoint, server_key, allowed_dir, "node", "list")), 30, "an answer to the allowed key")
    assert '"nodes": []' in r.stdout
    r = tcctl_tcp(endpoint, server_key, other_dir, "node", "list")
    assert r.returncode == 4, r.stdout + r.stderr
    assert endpoint in r.stdout
