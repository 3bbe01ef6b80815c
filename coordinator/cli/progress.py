"""Showing PROGRESS while tcctl waits for a command (WIRE-19, CLI-3).

On a terminal: one line that updates in place (rich ``Console.status``). Elsewhere (a pipe,
a log file): one line per distinct message, never the same line twice in a row, so a
``still running`` every 5 s does not flood a log. Never used with ``--json``: stdout then
holds exactly one JSON document and stderr stays quiet.
"""
from __future__ import annotations

import sys
from typing import Any, TextIO


def describe(message: str | None, data: dict[str, Any] | None) -> str:
    """The line shown for one PROGRESS: its message, plus data the message does not already say."""
    text = message or "working"
    extra = [f"{k}={v}" for k, v in sorted((data or {}).items())
             if isinstance(v, (str, int, float)) and not isinstance(v, bool) and f"{v}" not in text]
    return f"{text} ({', '.join(extra)})" if extra else text


class ProgressRenderer:
    """Callable given to ``AdminClient.request`` as ``on_progress``; ``close()`` clears the line."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.last: str | None = None
        self._status: Any = None

    def __call__(self, msg: Any) -> None:
        self.show(describe(getattr(msg, "message", None), getattr(msg, "data", None)))

    def show(self, line: str) -> None:
        if line == self.last:
            return
        self.last = line
        if not self.tty:
            print(f"… {line}", file=self.stream, flush=True)
            return
        if self._status is None:
            from rich.console import Console
            self._status = Console(file=self.stream, highlight=False).status(line)
            self._status.start()
        else:
            self._status.update(line)

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def __enter__(self) -> "ProgressRenderer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
