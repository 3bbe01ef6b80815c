"""Running e2fsprogs for the ext4 builder: a locale-free environment, and a subprocess runner
that drains both pipes, stops at a deadline (Ext4BuildFailed) or on cancel (JobCancelled), and
turns a vanished tool into BuilderPreflightFailed (IMG-22)."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from protocol.errors import BuilderPreflightFailed, Ext4BuildFailed, JobCancelled

_STDERR_TAIL = 2048
_POLL = 0.05

def build_env(epoch: int | None = None, path: str | None = None, profile: Path | None = None) -> dict[str, str]:
    """A minimal, locale-free environment for e2fsprogs."""
    env = {"LC_ALL": "C", "LANG": "C", "PATH": path if path is not None else os.environ.get("PATH", os.defpath)}
    if epoch is not None:
        env["E2FSPROGS_FAKE_TIME"] = str(int(epoch))
    if profile is not None:
        env["MKE2FS_CONFIG"] = os.fspath(profile)
    return env


def tail(data: bytes) -> str:
    return data[-_STDERR_TAIL:].decode("utf-8", "replace")


def run(argv: Sequence[str], *, stage: str, env: Mapping[str, str], timeout: float,
         cancel: threading.Event | None) -> tuple[int, bytes, bytes]:
    """Run ``argv``; kill it when ``cancel`` is set (JobCancelled) or ``timeout`` passes (Ext4BuildFailed)."""
    if cancel is not None and cancel.is_set():
        raise JobCancelled("build cancelled", {"stage": stage})
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=dict(env), close_fds=True)
    except (FileNotFoundError, PermissionError) as exc:
        # The tool vanished or lost its x bit since the start-up preflight (IMG-22).
        raise BuilderPreflightFailed(f"{stage}: build tool {argv[0]} cannot run on this builder: {exc.strerror}",
                                     {"stage": stage, "tool": argv[0]}) from None
    except OSError as exc:
        raise Ext4BuildFailed(f"{stage}: cannot run {argv[0]}: {exc}",
                              {"stage": stage, "rc": None, "stderr": str(exc)}) from None
    deadline = time.monotonic() + timeout
    out_chunks: list[bytes] = []
    err_chunks: list[bytes] = []
    # Drain both pipes in threads so a chatty tool never blocks on a full pipe.
    def drain(src, sink: list[bytes]) -> None:
        sink.extend(iter(lambda: src.read(65536), b""))
    readers = [threading.Thread(target=drain, args=(proc.stdout, out_chunks), daemon=True),
               threading.Thread(target=drain, args=(proc.stderr, err_chunks), daemon=True)]
    for t in readers:
        t.start()
    try:
        while True:
            try:
                proc.wait(timeout=_POLL)
                break
            except subprocess.TimeoutExpired:
                pass
            if cancel is not None and cancel.is_set():
                proc.kill()
                proc.wait()
                raise JobCancelled("build cancelled", {"stage": stage})
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise Ext4BuildFailed(f"{stage}: {argv[0]} timed out after {timeout:g} s",
                                      {"stage": stage, "rc": None, "stderr": tail(b"".join(err_chunks))})
    finally:
        for t in readers:
            t.join(timeout=5)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    return proc.returncode, b"".join(out_chunks), b"".join(err_chunks)


def fail(stage: str, rc: int | None, err: bytes, what: str) -> Ext4BuildFailed:
    text = tail(err)
    last = text.strip().splitlines()[-1] if text.strip() else ""
    return Ext4BuildFailed(f"{stage}: {what} (rc {rc}){': ' + last if last else ''}",
                           {"stage": stage, "rc": rc, "stderr": text})

