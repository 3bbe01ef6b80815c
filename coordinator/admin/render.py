"""Shared CLI rendering helpers: fixed human columns (CLI-2), RFC 3339 times (CONV-3)."""
from __future__ import annotations

import datetime as dt


def rfc3339(ms: int | None) -> str:
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{n}B"


def ago(ms: int | None) -> str:
    if ms is None:
        return "never"
    s = ms / 1000
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"



def table(*columns: str):  # type: ignore[no-untyped-def]
    """The one table shape every list command prints (CLI-2): no box, fixed column order."""
    from rich.table import Table
    t = Table(box=None, pad_edge=False)
    for col in columns:
        t.add_column(col)
    return t
