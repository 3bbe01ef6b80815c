"""``artifact show ART`` — fingerprint, image, sha256, size, gc deadline, placements and
references by kind (CLI-5, GC-1).

Wire: ADMIN {command: "artifact show", args: {artifact}} → RESULT {artifact}; ArtifactNotFound if unknown.
"""
from __future__ import annotations

import asyncio

from protocol import ids
from protocol.errors import ArtifactNotFound
from protocol.schema import Str

from ..command import Arg, Command
from ._jobs import store

ARTIFACT = Arg("artifact", "artifact id", Str(28, ids.ARTIFACT_ID, 28, "artifact id"), positional=True,
               required=True, metavar="ART")


class ArtifactShow(Command):
    name = "artifact show"
    summary = "show an artifact: digests, size, copies by node, what references it"
    args = (ARTIFACT,)

    async def execute(self, ctx, args):  # type: ignore[no-untyped-def]
        from ._artifacts import show_artifact  # daemon side: SQLAlchemy stays out of tcctl
        art = await asyncio.to_thread(show_artifact, store(ctx).engine, args["artifact"])
        if art is None:
            raise ArtifactNotFound(f"artifact {args['artifact']} not found", {"artifact_id": args["artifact"]})
        return {"artifact": art}

    def render(self, result, console):  # type: ignore[no-untyped-def]
        a = result["artifact"]
        console.print(f"artifact {a['artifact_id']}  {a['kind']}  {a['status']}  {a['size']} bytes")
        console.print(f"  sha256 {a['sha256']}\n  fingerprint {a['fingerprint']}\n  image {a['manifest_digest']}")
        console.print("  copies: " + (", ".join(p["node_id"] for p in a["placements"]) or "none"))
        refs = a["references"]
        console.print(f"  references: templates {refs['templates'] or '-'}, replicas {refs['replicas']}, "
                      f"active jobs {refs['active_jobs'] or '-'}")
