"""Short transactions on template, artifact, replica and placement rows for the template jobs
(TPL-8 to TPL-17, DIST-2, DIST-6, DIST-7). Every function is one transaction; none waits on
an agent (STYLE 8). Status changes go through ``coordinator.jobs.transitions``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from protocol.errors import Internal

from ..db.engine import is_lock_conflict
from ..db.models import Artifact, Job, Placement, Replica, Snapshot, Template
from ..jobs import transitions as tr

A, R, P, T, J = Artifact.__table__, Replica.__table__, Placement.__table__, Template.__table__, Job.__table__
SN = Snapshot.__table__


@dataclass(frozen=True, slots=True)
class Claim:
    outcome: str            # "adopt" | "claimed" | "wait"
    generation: int = 0
    owner_job_id: str = ""  # for "wait": the job building it


class Rows:
    def __init__(self, engine: Engine, clock: Callable[[], int]) -> None:
        self.sessions = sessionmaker(engine)
        self.now_ms = clock

    # --- artifacts (TPL-8, TPL-9, TPL-12) -------------------------------------------------

    def artifact(self, artifact_id: str) -> dict[str, Any] | None:
        with self.sessions() as s:
            row = s.execute(select(A).where(A.c.id == artifact_id)).mappings().first()
            return dict(row) if row else None

    def claim_artifact(self, artifact_id: str, fingerprint: str, job_id: str, *, has_copy: bool,
                       manifest_digest: str) -> Claim:
        """Adopt a READY row with a surviving copy, wait for a live build, else claim (BUILDING,
        owner = this job, generation + 1). A claim this job already holds is kept (a resumed step)."""
        for _ in range(3):
            with self.sessions.begin() as s:
                row = s.execute(select(A).where(A.c.id == artifact_id)).mappings().first()
                if row is None:
                    try:
                        with s.begin_nested():
                            s.execute(insert(A).values(
                                id=artifact_id, kind="rootfs", fingerprint=fingerprint, status=tr.BUILDING,
                                owner_job_id=job_id, generation=1, manifest_digest=manifest_digest,
                                created_ms=self.now_ms(), updated_ms=self.now_ms()))
                        return Claim("claimed", 1)
                    except IntegrityError:
                        continue  # another job inserted it first: read it again
                if row["status"] == tr.READY and has_copy:
                    return Claim("adopt", row["generation"])
                if row["status"] == tr.BUILDING:
                    if row["owner_job_id"] == job_id:
                        return Claim("claimed", row["generation"])
                    owner = s.execute(select(J.c.status).where(J.c.id == row["owner_job_id"])).scalar()
                    if owner in tr.JOB_ACTIVE:
                        return Claim("wait", row["generation"], row["owner_job_id"])
                    # The owner ended without registering: its claim is void (TPL-9), re-claim via ORPHANED.
                    tr.transition_artifact(s, artifact_id, tr.BUILDING, tr.ORPHANED)
                    row = dict(row, status=tr.ORPHANED)
                if tr.transition_artifact(s, artifact_id, row["status"], tr.BUILDING, owner_job_id=job_id,
                                          manifest_digest=manifest_digest):
                    gen = s.execute(select(A.c.generation).where(A.c.id == artifact_id)).scalar_one()
                    return Claim("claimed", gen)
        raise Internal(f"could not claim artifact {artifact_id}", {"artifact_id": artifact_id})

    def register_artifact(self, artifact_id: str, job_id: str, generation: int, *, sha256: str, size: int,
                          files: list[Any], image_config: dict[str, Any], builder: str, gc_ttl_ms: int) -> bool:
        """TPL-12: BUILDING→READY fenced on (owner, generation), and the builder's placement."""
        now = self.now_ms()
        with self.sessions.begin() as s:
            ok = tr.transition_artifact(s, artifact_id, tr.BUILDING, tr.READY, expect_owner=job_id,
                                        expect_generation=generation, sha256=sha256, size=size, files=files,
                                        image_config=image_config, gc_deadline_ms=now + gc_ttl_ms, now=now)
            if ok:
                self._placement(s, artifact_id, builder, now)
            return ok

    def fail_artifact(self, artifact_id: str, job_id: str) -> None:
        """A failed build's claim ends FAILED (a later claim may take it again, CONV-8)."""
        with self.sessions.begin() as s:
            tr.transition_artifact(s, artifact_id, tr.BUILDING, tr.FAILED, expect_owner=job_id)

    def register_export(self, artifact_id: str, fingerprint: str, job_id: str, *, sha256: str, size: int,
                        files: list[Any], node: str, gc_ttl_ms: int, kind: str = "rootfs") -> str:
        """TPL-24, CONV-8: a COMMIT export's row (``rootfs`` or ``memstate``) — new rows start PENDING (owner = the job) and
        turn READY fenced on owner and generation; a READY row of the same fingerprint is
        adopted; a FAILED/ORPHANED/CLEANUP_PENDING one is claimed again. The node's placement
        is recorded either way. Returns "created" or "adopted"; a re-run keeps its answer."""
        now = self.now_ms()
        for _ in range(3):
            try:
                with self.sessions.begin() as s:
                    row = s.execute(select(A).where(A.c.id == artifact_id)).mappings().first()
                    if row is None:
                        s.execute(insert(A).values(id=artifact_id, kind=kind, fingerprint=fingerprint,
                                                   status=tr.PENDING, owner_job_id=job_id, generation=1,
                                                   created_ms=now, updated_ms=now))
                        row = {"status": tr.PENDING, "owner_job_id": job_id, "generation": 1}
                    elif row["status"] == tr.READY:
                        self._placement(s, artifact_id, node, now)
                        return "created" if row["owner_job_id"] == job_id else "adopted"
                    elif row["status"] in (tr.PENDING, tr.BUILDING) and row["owner_job_id"] != job_id:
                        raise Internal(f"artifact {artifact_id} is being registered by {row['owner_job_id']}",
                                       {"artifact_id": artifact_id})
                    elif row["status"] not in (tr.PENDING, tr.BUILDING):
                        tr.transition_artifact(s, artifact_id, row["status"], tr.BUILDING, owner_job_id=job_id)
                        row = s.execute(select(A).where(A.c.id == artifact_id)).mappings().one()
                    if not tr.transition_artifact(s, artifact_id, row["status"], tr.READY, expect_owner=job_id,
                                                  expect_generation=row["generation"], sha256=sha256, size=size,
                                                  files=files, gc_deadline_ms=now + gc_ttl_ms, now=now):
                        raise Internal(f"artifact {artifact_id} changed while it was registered",
                                       {"artifact_id": artifact_id})
                    self._placement(s, artifact_id, node, now)
                    return "created"
            except IntegrityError:
                continue  # another job inserted the same fingerprint first: read it again
        raise Internal(f"could not register artifact {artifact_id}", {"artifact_id": artifact_id})

    def placements(self, artifact_id: str) -> list[str]:
        """Nodes recorded with a verified copy (DIST-6): known at once from task results, before
        the node's catalog mirror catches up."""
        with self.sessions() as s:
            return sorted(s.execute(select(P.c.node_id).where(P.c.artifact_id == artifact_id,
                                                              P.c.verified.is_(True))).scalars())

    def placement(self, artifact_id: str, node_id: str) -> None:
        with self.sessions.begin() as s:
            self._placement(s, artifact_id, node_id, self.now_ms())

    def _placement(self, s: Session, artifact_id: str, node_id: str, now: int) -> None:
        exists = s.execute(select(P.c.node_id).where(P.c.artifact_id == artifact_id, P.c.node_id == node_id)).first()
        if exists is None:
            s.execute(insert(P).values(artifact_id=artifact_id, node_id=node_id, verified=True, created_ms=now))
        else:
            s.execute(update(P).where(P.c.artifact_id == artifact_id, P.c.node_id == node_id).values(verified=True))

    # --- replicas (DIST-2, DIST-6, DIST-7, CONV-9) ----------------------------------------------

    # Called as on_change(topic, kind, data) after a replica or template status write commits:
    # the coordinator publishes it as an event (the resolve index keeps current with it, RES-4).
    # Rows run in worker threads, so the callback must be thread-safe.
    on_change: Callable[[str, str, dict[str, Any]], None] | None = None

    def replica(self, template_id: str, node_id: str, **values: Any) -> None:
        """Upsert one replica row; no failure of one replica undoes another's (DIST-7)."""
        values["updated_ms"] = self.now_ms()
        with self.sessions.begin() as s:
            cur = s.execute(update(R).where(R.c.template_id == template_id, R.c.node_id == node_id)
                            .values(**values)).rowcount
            if not cur:
                s.execute(insert(R).values(template_id=template_id, node_id=node_id, **values))
        if self.on_change is not None:
            self.on_change(f"template.{template_id}", "replica", {"template": template_id, "node": node_id, **values})

    def replicas(self, template_id: str) -> list[dict[str, Any]]:
        with self.sessions() as s:
            return [dict(r) for r in s.execute(select(R).where(R.c.template_id == template_id)
                                               .order_by(R.c.node_id)).mappings()]

    # --- templates ------------------------------------------------------------------------------

    def template(self, template_id: str) -> dict[str, Any] | None:
        with self.sessions() as s:
            row = s.execute(select(T).where(T.c.id == template_id)).mappings().first()
            return dict(row) if row else None

    def set_template(self, template_id: str, **values: Any) -> None:
        values["updated_ms"] = self.now_ms()
        with self.sessions.begin() as s:
            s.execute(update(T).where(T.c.id == template_id).values(**values))

    def publish(self, template_id: str, job_id: str, status: str, *, last_error: str = "",
                runtime_config: dict[str, Any] | None = None, claim_alias: bool = True) -> str:
        """TPL-14, TPL-16, TPL-17: claim the requested alias (when the status is not FAILED) and
        write the aggregate status in one transaction; a conflicting alias goes to the template
        with the newer CREATE/REDO job, the loser publishes without it. Returns a warning ("" if none).
        Retried once on a deadlock or lock timeout and once on a unique-key conflict (TPL-17)."""
        conflicts = locks = 0
        for _ in range(3):
            warning = ""
            try:
                with self.sessions.begin() as s:
                    tpl = s.execute(select(T).where(T.c.id == template_id)).mappings().one()
                    values: dict[str, Any] = {"last_error": last_error}
                    if runtime_config is not None:
                        values["runtime_config"] = runtime_config
                    want = tpl["requested_alias"]
                    if claim_alias and status != tr.FAILED and want and tpl["alias"] != want:
                        holder = s.execute(select(T.c.id).where(T.c.alias == want, T.c.id != template_id)).scalar()
                        if holder is not None and self._newer(s, holder, job_id):
                            warning = f"alias {want} kept by {holder} (its job is newer)"
                        else:
                            if holder is not None:
                                s.execute(update(T).where(T.c.id == holder).values(alias=None))
                                warning = f"alias {want} taken over from {holder}"
                            values["alias"] = want
                    if not tr.transition_template(s, template_id, tpl["status"], status, **values):
                        raise Internal(f"template {template_id} could not go {tpl['status']} → {status}",
                                       {"template_id": template_id})
                if self.on_change is not None:
                    if "alias" in values and holder is not None:
                        self.on_change(f"template.{holder}", "alias", {"template": holder, "alias": None})
                    self.on_change(f"template.{template_id}", "status", {
                        "template": template_id, "status": status, "alias": values.get("alias", tpl["alias"])})
                return warning
            except IntegrityError:
                if conflicts:
                    raise
                conflicts += 1
            except DBAPIError as exc:
                if locks or not is_lock_conflict(exc):
                    raise
                locks += 1
        raise Internal(f"publishing template {template_id} kept conflicting", {"template_id": template_id})

    def set_alias(self, template_id: str, alias: str, *, transfer: bool) -> dict[str, Any]:
        result = self._set_alias(template_id, alias, transfer=transfer)
        if result["changed"] and self.on_change is not None:  # the resolve index follows aliases (RES-4)
            if result["released_from"]:
                self.on_change(f"template.{result['released_from']}", "alias",
                               {"template": result["released_from"], "alias": None})
            self.on_change(f"template.{template_id}", "alias", {"template": template_id, "alias": result["alias"]})
        return result

    def _set_alias(self, template_id: str, alias: str, *, transfer: bool) -> dict[str, Any]:
        """TPL-18 in one transaction: "" clears (any non-DELETING template; nothing to clear is
        a no-op); a claim needs READY and an alias nobody else holds, unless ``transfer``
        releases it from its holder in the same transaction. Retried once on a unique conflict
        (a concurrent claim): the second round sees the other holder and answers accordingly."""
        from protocol.errors import DuplicateTemplate, TemplateNotFound, TemplateNotReady
        for attempt in range(2):
            try:
                with self.sessions.begin() as s:
                    tpl = s.execute(select(T).where(T.c.id == template_id)).mappings().first()
                    if tpl is None or tpl["status"] == tr.DELETING:
                        raise TemplateNotFound(f"template {template_id} not found", {"template": template_id})
                    before = tpl["alias"]
                    result = {"template_id": template_id, "alias": alias or None, "previous": before,
                              "released_from": None, "changed": before != (alias or None)}
                    if not alias:
                        if before is not None:
                            s.execute(update(T).where(T.c.id == template_id)
                                      .values(alias=None, updated_ms=self.now_ms()))
                        return result
                    if tpl["status"] != tr.READY:
                        raise TemplateNotReady(f"template {template_id} is {tpl['status']}; an alias can only be "
                                               "claimed by a READY template",
                                               {"template_id": template_id, "status": tpl["status"]})
                    if before == alias:
                        return result
                    holder = s.execute(select(T.c.id).where(T.c.alias == alias, T.c.id != template_id)).scalar()
                    if holder is not None:
                        if not transfer:
                            raise DuplicateTemplate(f"alias {alias} is held by template {holder}; use --transfer "
                                                    "to move it", {"alias": alias, "holder": holder})
                        s.execute(update(T).where(T.c.id == holder).values(alias=None, updated_ms=self.now_ms()))
                        s.flush()  # release before the claim: the unique index sees one holder at a time
                        result["released_from"] = holder
                    s.execute(update(T).where(T.c.id == template_id).values(alias=alias, updated_ms=self.now_ms()))
                    return result
            except IntegrityError:
                if attempt:
                    raise
        raise Internal("unreachable")

    @staticmethod
    def _newer(s: Session, holder: str, job_id: str) -> bool:
        """Whether ``holder``'s newest CREATE/REDO job is newer than ``job_id`` (TPL-16)."""
        mine = s.execute(select(J.c.created_ms).where(J.c.id == job_id)).scalar() or 0
        theirs = s.execute(select(J.c.created_ms).where(J.c.resource_id == holder,
                                                        J.c.operation.in_(("CREATE", "REDO")))
                           .order_by(J.c.created_ms.desc()).limit(1)).scalar() or 0
        return theirs > mine


    # --- last-owner cleanup (GC-1, GC-3, GC-5) ----------------------------------------------------

    def references(self, s: Session, artifact_id: str, *, exclude_template: str | None) -> int:
        """GC-1: replica rows, active jobs, templates and snapshots naming the artifact (the
        excluded template left out), counted through columns only."""
        from sqlalchemy import func, or_
        reps = select(func.count()).select_from(R).where(
            or_(R.c.artifact_id == artifact_id, R.c.memstate_artifact_id == artifact_id))
        tpls = select(func.count()).select_from(T).where(
            or_(T.c.artifact_id == artifact_id, T.c.memstate_artifact_id == artifact_id))
        jobs = select(func.count()).select_from(J).where(J.c.artifact_id == artifact_id,
                                                          J.c.status.in_(tuple(tr.JOB_ACTIVE)))
        # Snapshots in every status, DELETED tombstones included: a snapshot's disk descends
        # from its base artifact, so a template delete must not take it away (GC-1).
        snaps = select(func.count()).select_from(SN).where(SN.c.base_artifact_id == artifact_id)
        if exclude_template is not None:
            reps = reps.where(R.c.template_id != exclude_template)
            tpls = tpls.where(T.c.id != exclude_template)
            jobs = jobs.where(J.c.resource_id != exclude_template)
        return sum(s.execute(q).scalar_one() for q in (reps, tpls, jobs, snaps))

    def cleanup_begin(self, artifact_id: str, exclude_template: str | None, extra_nodes: list[str]) -> list[str] | None:
        """GC-3, phase 1: drop the excluded template's replica rows for the artifact; referenced →
        renew and return None; else mark CLEANUP_PENDING and return the node set."""
        now = self.now_ms()
        with self.sessions.begin() as s:
            row = s.execute(select(A).where(A.c.id == artifact_id).with_for_update()).mappings().first()
            if row is None:
                return None
            if exclude_template is not None:
                s.execute(R.delete().where(R.c.template_id == exclude_template, R.c.artifact_id == artifact_id))
            if self.references(s, artifact_id, exclude_template=exclude_template):
                if row["status"] == tr.CLEANUP_PENDING:
                    tr.transition_artifact(s, artifact_id, tr.CLEANUP_PENDING, tr.READY, gc_deadline_ms=now + 7 * 86400000)
                elif row["status"] == tr.READY:
                    s.execute(update(A).where(A.c.id == artifact_id).values(gc_deadline_ms=now + 7 * 86400000))
                return None
            if row["status"] == tr.READY:
                tr.transition_artifact(s, artifact_id, tr.READY, tr.CLEANUP_PENDING)
            nodes = set(s.execute(select(P.c.node_id).where(P.c.artifact_id == artifact_id)).scalars())
            return sorted(nodes | set(extra_nodes))

    def cleanup_finish(self, artifact_id: str, exclude_template: str | None) -> bool:
        """GC-5, phase 3: recount; still unreferenced and CLEANUP_PENDING (or FAILED/ORPHANED) →
        delete the placements and the row."""
        with self.sessions.begin() as s:
            row = s.execute(select(A).where(A.c.id == artifact_id).with_for_update()).mappings().first()
            if row is None:
                return True
            if row["status"] not in (tr.CLEANUP_PENDING, tr.FAILED, tr.ORPHANED):
                return False
            if self.references(s, artifact_id, exclude_template=exclude_template):
                return False
            s.execute(P.delete().where(P.c.artifact_id == artifact_id))
            s.execute(A.delete().where(A.c.id == artifact_id))
            return True

    def drop_template(self, template_id: str) -> None:
        """TPL-27: the template's rows go (replicas cascade); its jobs stay for their retention."""
        with self.sessions.begin() as s:
            s.execute(R.delete().where(R.c.template_id == template_id))
            s.execute(T.delete().where(T.c.id == template_id))
        if self.on_change is not None:
            self.on_change(f"template.{template_id}", "deleted", {"template": template_id})

    def mark_deleting(self, template_id: str, from_status: str) -> None:
        """TPL-27's first step: DELETING hides the template from resolve and releases its alias."""
        with self.sessions.begin() as s:
            changed = tr.transition_template(s, template_id, from_status, tr.DELETING)
        if changed and self.on_change is not None:
            self.on_change(f"template.{template_id}", "status",
                           {"template": template_id, "status": tr.DELETING, "alias": None})
