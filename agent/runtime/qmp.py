"""QMP conversations with a VM's QEMU through the ``qemu.qmp`` library (SPEC RT-4, RT-11,
RT-12): its synchronous client, used from the task worker threads."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from protocol.errors import RuntimeFailed

# The library logs every refused connection while QEMU is still starting at ERROR; our own
# errors say what failed.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class Qmp:
    """A short QMP conversation through the ``qemu.qmp`` library's synchronous client."""

    def __init__(self, address: str, connect_timeout: float, alive: Callable[[], bool]) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        deadline = time.monotonic() + connect_timeout
        while True:
            self._mon = QEMUMonitorProtocol(address)
            try:
                self._mon.connect(negotiate=True)
                break
            except Exception as exc:  # noqa: BLE001 — the library raises several types while QEMU starts
                if time.monotonic() >= deadline or not alive():
                    raise RuntimeFailed(f"cannot reach QMP: {exc}", {"stage": "qmp"}) from None
                time.sleep(0.05)
        self._mon.settimeout(30.0)

    def __enter__(self) -> "Qmp":
        return self

    def __exit__(self, *_: Any) -> None:
        try:
            self._mon.close()
        except Exception:  # noqa: BLE001 — after quit the socket is gone already
            pass

    def call(self, name: str, **args: Any) -> Any:
        try:
            resp = self._mon.cmd_obj({"execute": name, **({"arguments": args} if args else {})})
        except Exception as exc:  # noqa: BLE001 — transport errors of the library
            if name == "quit":
                return None
            raise RuntimeFailed(f"QMP {name}: {exc}", {"stage": "qmp"}) from None
        if "error" in resp:
            raise RuntimeFailed(f"QMP {name}: {resp['error'].get('desc', resp['error'])}", {"stage": "qmp"})
        return resp.get("return")

    def wait_migration(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            info = self.call("query-migrate") or {}
            status = info.get("status", "")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise RuntimeFailed(f"migration {status}: {info.get('error-desc', '')}", {"stage": "migrate"})
            if time.monotonic() >= deadline:
                raise RuntimeFailed(f"migration did not complete within {timeout:g}s (status {status})",
                                    {"stage": "migrate"})
            time.sleep(0.02)
