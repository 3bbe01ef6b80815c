"""What a command's ``execute`` may use in the coordinator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from ..compat.scanner import CompatScanner
    from ..config import CoordinatorConfig
    from ..events import EventBus
    from ..jobs.store import JobStore
    from ..templates.create_job import Services
    from ..keys import KeyRegistry
    from ..nodes import NodeRegistry
    from ..storage import StorageProbe
    from ..resolve import ResolveIndex
    from ..sandboxes import Sandboxes
    from ..snapshots.service import SnapshotOps
    from protocol.peers import PeerTable


@dataclass(slots=True)
class AdminContext:
    config: "CoordinatorConfig"
    engine: "Engine"
    nodes: "NodeRegistry"
    events: "EventBus"
    peers: "PeerTable"
    keys: "KeyRegistry | None" = None  # None when security.curve is off
    jobs: "JobStore | None" = None                 # templates and jobs (issue 5)
    templates: "Services | None" = None
    wake_jobs: Callable[[], None] = lambda: None    # a new job: let the runner pick it up now
    compat: "CompatScanner | None" = None           # compat scans (COMPAT-4, COMPAT-8; issue 6)
    storage: "StorageProbe | None" = None           # storage status --refresh (SNAP-22)
    resolve: "ResolveIndex | None" = None           # the resolve index (RES-1, RES-4; issue 7)
    sandboxes: "Sandboxes | None" = None            # sandbox records and lifecycle (RT-17 to RT-19)
    snapshots: "SnapshotOps | None" = None          # snapshot operations (SNAP-1 to SNAP-17)
    # Sends a PROGRESS message to the caller (WIRE-19); commands call it on long work.
    progress: Callable[[str, dict[str, Any] | None], None] = lambda message, data=None: None
