"""The build-tools preflight (SPEC IMG-22).

At agent start ``preflight()`` decides the ``build`` capability: mke2fs, e2fsck and debugfs
must be on PATH, ``mke2fs -d`` must populate a tiny file system from a tiny directory, and
``e2fsck -fn`` must pass on it. ``require_build_tools()`` is the same check for use in the
middle of a build, raising BuilderPreflightFailed.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import BuilderPreflightFailed

__all__ = ["TOOLS", "PreflightResult", "preflight", "require_build_tools"]

TOOLS = ("mke2fs", "e2fsck", "debugfs")
_TIMEOUT = 30.0
_SIZE = 8 << 20


@dataclass(frozen=True, slots=True)
class PreflightResult:
    ok: bool
    reason: str                 # "" when ok, else what is missing or broken
    e2fsprogs_version: str      # e.g. "1.47.0"; "" if mke2fs is missing

    def __bool__(self) -> bool:
        return self.ok


def _env(path: str | None) -> dict[str, str]:
    return {"LC_ALL": "C", "LANG": "C", "PATH": path if path is not None else os.environ.get("PATH", os.defpath),
            "E2FSPROGS_FAKE_TIME": "0"}


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=_TIMEOUT,
                          check=False)


def _last(data: bytes) -> str:
    text = data.decode("utf-8", "replace").strip()
    return text.splitlines()[-1] if text else ""


def preflight(tmpdir: Path | None = None, *, path: str | None = None) -> PreflightResult:
    """Check the e2fsprogs tools (IMG-22). ``path`` overrides PATH for the lookup and the runs."""
    search = path if path is not None else os.environ.get("PATH", os.defpath)
    tools = {t: shutil.which(t, path=search) for t in TOOLS}
    missing = [t for t, p in tools.items() if p is None]
    version = ""
    if tools["mke2fs"] is not None:
        try:
            v = _run([tools["mke2fs"], "-V"], _env(search))
            m = re.search(rb"mke2fs (\d+\.\d+(?:\.\d+)?)", v.stdout + v.stderr)
            version = m.group(1).decode() if m else ""
        except (OSError, subprocess.TimeoutExpired) as exc:
            return PreflightResult(False, f"mke2fs -V failed: {exc}", "")
    if missing:
        return PreflightResult(False, "missing build tools: " + ", ".join(missing) + f" (PATH={search})", version)
    env = _env(search)
    try:
        with tempfile.TemporaryDirectory(prefix="tc-preflight-", dir=tmpdir) as td:
            src = Path(td) / "src"
            (src / "d").mkdir(parents=True)
            (src / "d" / "f").write_bytes(b"preflight\n")
            os.symlink("d/f", src / "l")
            img = Path(td) / "img"
            with open(img, "wb") as f:
                f.truncate(_SIZE)
            mk = _run([tools["mke2fs"], "-q", "-F", "-t", "ext4", "-b", "4096", "-N", "64",
                       "-L", "preflight", "-E", "root_owner=0:0", "-d", os.fspath(src), os.fspath(img)], env)
            if mk.returncode != 0:
                return PreflightResult(False, f"mke2fs does not support -d (rc {mk.returncode}): "
                                              f"{_last(mk.stderr)}", version)
            ck = _run([tools["e2fsck"], "-fn", os.fspath(img)], env)
            if ck.returncode != 0:
                return PreflightResult(False, f"e2fsck -fn failed on a fresh file system (rc {ck.returncode}): "
                                              f"{_last(ck.stdout + ck.stderr)}", version)
            ls = _run([tools["debugfs"], "-R", "ls -p /d", os.fspath(img)], env)
            if ls.returncode != 0 or b"/f/" not in ls.stdout:
                return PreflightResult(False, f"debugfs cannot read the file system (rc {ls.returncode}): "
                                              f"{_last(ls.stderr)}", version)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return PreflightResult(False, f"build tools preflight failed: {exc}", version)
    return PreflightResult(True, "", version)


def require_build_tools(tmpdir: Path | None = None, *, path: str | None = None) -> PreflightResult:
    """``preflight`` for use mid-build: BuilderPreflightFailed (details: reason, version) unless ok."""
    res = preflight(tmpdir, path=path)
    if not res.ok:
        raise BuilderPreflightFailed(res.reason, {"reason": res.reason, "e2fsprogs_version": res.e2fsprogs_version})
    return res
