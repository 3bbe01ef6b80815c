"""Artifact views for `artifact list` and `artifact show` (CLI-5, GC-1)."""
from __future__ import annotations

from typing import Any

from sqlalchemy import func, or_, select

from ...db.models import Artifact, Job, Placement, Replica, Template

A, P, R, T, J = Artifact.__table__, Placement.__table__, Replica.__table__, Template.__table__, Job.__table__


def summary(row: Any, placements: int) -> dict[str, Any]:
    return {"artifact_id": row["id"], "kind": row["kind"], "status": row["status"], "fingerprint": row["fingerprint"],
            "sha256": row["sha256"], "size": row["size"], "manifest_digest": row["manifest_digest"],
            "gc_deadline_ms": row["gc_deadline_ms"], "placements": placements, "updated_ms": row["updated_ms"]}


def list_artifacts(engine: Any, status: str | None) -> list[dict[str, Any]]:
    with engine.connect() as c:
        stmt = select(A).order_by(A.c.updated_ms.desc(), A.c.id)
        if status:
            stmt = stmt.where(A.c.status == status)
        counts = dict(c.execute(select(P.c.artifact_id, func.count()).group_by(P.c.artifact_id)).all())
        return [summary(r, counts.get(r["id"], 0)) for r in c.execute(stmt).mappings()]


def show_artifact(engine: Any, artifact_id: str) -> dict[str, Any] | None:
    with engine.connect() as c:
        row = c.execute(select(A).where(A.c.id == artifact_id)).mappings().first()
        if row is None:
            return None
        nodes = [dict(node_id=n, verified=v) for n, v in c.execute(
            select(P.c.node_id, P.c.verified).where(P.c.artifact_id == artifact_id).order_by(P.c.node_id))]
        templates = sorted(c.execute(select(T.c.id).where(or_(T.c.artifact_id == artifact_id,
                                                              T.c.memstate_artifact_id == artifact_id))).scalars())
        replicas = c.execute(select(func.count()).select_from(R).where(R.c.artifact_id == artifact_id)).scalar_one()
        jobs = sorted(c.execute(select(J.c.id).where(J.c.artifact_id == artifact_id,
                                                     J.c.status.in_(("PENDING", "RUNNING")))).scalars())
        out = summary(row, len(nodes))
        out.update(files=row["files"], image_config=row["image_config"], owner_job_id=row["owner_job_id"],
                   generation=row["generation"], placements=nodes,
                   references={"templates": templates, "replicas": replicas, "active_jobs": jobs, "snapshots": []})
        return out


def list_orphans(engine: Any, node_id: str | None = None) -> list[dict[str, Any]]:
    """Quarantined files the agents reported (CAT-3), from their mirrored catalogs (CAT-6)."""
    from ...db.models import NodeCatalogEntry
    e = NodeCatalogEntry.__table__
    with engine.connect() as c:
        stmt = select(e.c.node_id, e.c.entry_id, e.c.body).where(e.c.kind == "orphan").order_by(e.c.node_id,
                                                                                                 e.c.entry_id)
        if node_id is not None:
            stmt = stmt.where(e.c.node_id == node_id)
        return [{"node_id": n, "orphan_id": i, "path": (b or {}).get("path", ""),
                 "original": (b or {}).get("original", ""), "size": (b or {}).get("size"),
                 "found_ms": (b or {}).get("found_ms")} for n, i, b in c.execute(stmt)]


def list_strays(engine: Any, node_id: str | None = None) -> list[dict[str, Any]]:
    """Copies on nodes that match no READY artifact (GC-12), by the presence rule."""
    from ...db.models import NodeCatalogEntry
    from ...presence import stray_copies
    e = NodeCatalogEntry.__table__
    with engine.connect() as c:
        nodes = sorted(set(c.execute(select(e.c.node_id).where(e.c.kind == "artifact")).scalars()))
    return [s for n in nodes if node_id in (None, n) for s in stray_copies(engine, n)]


def node_replicas(engine: Any, node_id: str) -> list[dict[str, Any]]:
    with engine.connect() as c:
        return [{"template_id": r["template_id"], "status": r["status"], "phase": r["phase"],
                 "compat": r["compat"], "artifact_id": r["artifact_id"], "last_error": r["last_error"]}
                for r in c.execute(select(R).where(R.c.node_id == node_id).order_by(R.c.template_id)).mappings()]
