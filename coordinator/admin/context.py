"""What a command's ``execute`` may use in the coordinator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from ..config import CoordinatorConfig
    from ..events import EventBus
    from ..jobs.store import JobStore
    from ..templates.create_job import Services
    from ..keys import KeyRegistry
    from ..nodes import NodeRegistry
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
    # Sends a PROGRESS message to the caller (WIRE-19); commands call it on long work.
    progress: Callable[[str, dict[str, Any] | None], None] = lambda message, data=None: None
