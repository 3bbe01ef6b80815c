"""Jobs: persisted, resumable coordinator operations (SPEC §5, STYLE 6).

``transitions`` is the only writer of job/template/artifact statuses; ``store`` submits and
reads jobs; ``base`` defines job types and the context their steps see; ``runner`` claims,
resumes and drives them. Concrete job types (CREATE, REDO, COMMIT, DELETE, snapshots) live in
their own modules and register with ``base.register``.
"""
from .base import (
    JobContext,
    JobLost,
    JobType,
    TaskPort,
    job_error,
    phase_progress,
    register,
    registered,
)
from .requests import request_digest, sanitize_request
from .runner import JobRunner
from .store import JobStore, Submitted, job_info
from .transitions import transition_artifact, transition_job, transition_template

__all__ = [
    "JobContext",
    "JobLost",
    "JobRunner",
    "JobStore",
    "JobType",
    "Submitted",
    "TaskPort",
    "job_error",
    "job_info",
    "phase_progress",
    "register",
    "registered",
    "request_digest",
    "sanitize_request",
    "transition_artifact",
    "transition_job",
    "transition_template",
]
