"""Template replicas on this node (WIRE-15): REMOVE_REPLICA.

A rootfs-mode replica is the template's use of an artifact copy, which the artifact's own
entry covers; memory-mode replicas (issue 7) add a ``replica`` catalog entry and a memory
snapshot. Removal drops whatever this node holds for the template; nothing there is success.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from protocol import ids
from protocol.errors import InvalidRequest

from .catalog import REPLICA_KIND, Catalog
from .tasks import TaskContext

log = logging.getLogger("replicas")
KIND = REPLICA_KIND


class Replicas:
    def __init__(self, catalog: Catalog, remove_files: Callable[[str], None] | None = None) -> None:
        self.catalog = catalog
        # The runtime's memory-snapshot files of a template (agent/runtime/sandboxes.py).
        self.remove_files = remove_files

    def handlers(self) -> dict[str, Any]:
        return {"REMOVE_REPLICA": self.remove_task}

    def remove_task(self, ctx: TaskContext) -> dict[str, Any]:
        template_id = ctx.args.get("template_id")
        if not ids.valid("template", template_id):
            raise InvalidRequest(f"template_id {str(template_id)[:80]!r} is not tpl-<24 hex>",
                                 {"field": "template_id", "reason": "format"})
        existed = self.catalog.get(KIND, template_id) is not None
        if self.remove_files is not None:
            self.remove_files(template_id)  # CAT-8: files first, then the entry
        if existed:
            self.catalog.delete(KIND, template_id)
            log.info("replica of %s removed", template_id)
        return {"template_id": template_id, "removed": existed}
