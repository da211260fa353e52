"""Taking a job for a run and giving it back: the job-row transitions of a worker.

`claim_job` takes the job's lease (queued, or running on an expired or dead lease -> running,
with one compare-and-set UPDATE, see app.runner.leases) and reads what the run needs.
`finish_job` marks it cancelled or failed; `requeue_after_shutdown` leaves it queued to resume.
Each is conditional on the job still being this holder's: a worker whose lease was taken over
touches nothing. (Success is stored with the results, in app.runner.results.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.models import Dataset, Job, JobStatus, utcnow
from app.db.models import Image as ImageRow
from app.runner.leases import lease_is_free, lease_unchanged_clause
from app.storage import Storage

__all__ = [
    "ClaimedJob",
    "claim_job",
    "read_running_job",
    "finish_job",
    "requeue_after_shutdown",
    "elapsed_s",
]

logger = logging.getLogger(__name__)

_MAX_ERROR_CHARS = 10_000


def elapsed_s(started: datetime | None, finished: datetime) -> float | None:
    """Seconds from `started` (naive means UTC: SQLite drops the zone) to `finished`."""
    if started is not None and started.tzinfo is None:
        started = started.replace(tzinfo=UTC)
    return None if started is None else max(0.0, (finished - started).total_seconds())


@dataclass
class ClaimedJob:
    """What a run needs, read in the claiming transaction. Row i of `image_ids`,
    `stored_paths` and `labels` is the image at position i of the dataset."""

    job_id: str
    dataset_id: str
    preset: str
    backbone: str | None  # the pretrained route's backbone; None: SimCLR from scratch
    num_clusters: int
    overcluster: float | list[int] | None
    overrides: dict[str, Any]
    image_ids: list[str]
    stored_paths: list[str]  # relative to DATA_DIR
    labels: list[int] | None
    class_names: list[str] | None
    work_dir: str  # relative to DATA_DIR


def claim_job(
    job_id: str, factory: sessionmaker[Session], settings: Settings, holder: str
) -> ClaimedJob | None:
    """Take the job's lease for `holder` and read what it needs; None when there is nothing to
    run here (missing, finished, cancelled, out of attempts, or held by a live worker)."""
    now = utcnow()
    with factory() as session, session.begin():
        seen = session.execute(
            select(
                Job.status,
                Job.cancel_requested,
                Job.attempts,
                Job.lease_owner,
                Job.lease_expires_at,
                Job.started_at,
            ).where(Job.id == job_id)
        ).one_or_none()
        if seen is None:
            logger.warning("job not found", extra={"job_id": job_id})
            return None
        if seen.status in JobStatus.FINISHED:
            logger.info("job already %s; left alone", seen.status, extra={"job_id": job_id})
            return None
        if not lease_is_free(seen.status, seen.lease_owner, seen.lease_expires_at, now):
            logger.info(
                "job is running under another worker's lease; this delivery leaves it alone",
                extra={"job_id": job_id, "lease_owner": seen.lease_owner},
            )
            return None
        # Compare-and-set against what was read: of two workers, exactly one gets rowcount 1.
        unchanged = [
            Job.id == job_id,
            Job.status == seen.status,
            Job.attempts == seen.attempts,
            lease_unchanged_clause(seen.lease_owner, now),
        ]
        done: dict[str, Any] = {
            "finished_at": now,
            "duration_s": elapsed_s(seen.started_at, now),
            "eta_s": None,
            "lease_expires_at": None,
        }
        if seen.cancel_requested:
            session.execute(
                update(Job).where(*unchanged).values(status=JobStatus.CANCELLED, **done)
            )
            return None
        if seen.attempts >= settings.JOB_MAX_ATTEMPTS:
            error = (
                f"gave up after {seen.attempts} attempts (the worker running it stopped or was "
                "killed each time)"
            )
            session.execute(
                update(Job).where(*unchanged).values(status=JobStatus.FAILED, error=error, **done)
            )
            logger.error(error, extra={"job_id": job_id})
            return None
        taken = session.execute(  # type: ignore[attr-defined]
            update(Job)
            .where(*unchanged)
            .values(
                status=JobStatus.RUNNING,
                started_at=seen.started_at or now,
                attempts=Job.attempts + 1,
                error=None,
                work_dir=Storage.job_work_dir(job_id),
                lease_owner=holder,
                lease_expires_at=now + timedelta(seconds=settings.JOB_LEASE_S),
                heartbeat_at=now,
            )
        ).rowcount
        if not taken:
            logger.info("another worker took the job first", extra={"job_id": job_id})
            return None
        if seen.status == JobStatus.RUNNING:
            logger.warning(
                "taking over a job whose worker stopped; resuming from its last checkpoint",
                extra={"job_id": job_id, "previous_holder": seen.lease_owner},
            )
        job = session.get(Job, job_id)
        assert job is not None  # just updated, in this transaction
        return _job_inputs(session, job)


def read_running_job(job_id: str, factory: sessionmaker[Session]) -> ClaimedJob | None:
    """What a helper of a running job reads (a shard worker, app.runner.shards), without
    taking its lease; None unless the job is running and not asked to cancel."""
    with factory() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != JobStatus.RUNNING or job.cancel_requested:
            return None
        return _job_inputs(session, job)


def _job_inputs(session: Session, job: Job) -> ClaimedJob:
    dataset = session.get(Dataset, job.dataset_id)
    rows = session.execute(
        select(ImageRow.id, ImageRow.stored_path, ImageRow.label)
        .where(ImageRow.dataset_id == job.dataset_id)
        .order_by(ImageRow.position)
    ).all()
    has_labels = dataset is not None and dataset.has_labels
    labels = [row.label for row in rows] if has_labels else None
    if labels is not None and any(label is None for label in labels):
        labels = None
    return ClaimedJob(
        job_id=job.id,
        dataset_id=job.dataset_id,
        preset=job.preset,
        backbone=job.backbone,
        num_clusters=job.num_clusters,
        overcluster=job.overcluster,
        overrides=dict(job.overrides or {}),
        image_ids=[row.id for row in rows],
        stored_paths=[row.stored_path for row in rows],
        labels=labels,
        class_names=dataset.class_names if (dataset and labels is not None) else None,
        work_dir=Storage.job_work_dir(job.id),
    )


def finish_job(
    factory: sessionmaker[Session],
    job_id: str,
    status: str,
    error: str | None = None,
    holder: str | None = None,
) -> None:
    """Mark the job finished, unless it already is or (`holder` given) another worker has it."""
    with factory() as session, session.begin():
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.status in JobStatus.FINISHED:
            return
        if holder is not None and job.lease_owner != holder:
            return
        now = utcnow()
        job.status, job.finished_at = status, now
        job.duration_s = elapsed_s(job.started_at, now)
        job.eta_s = None
        job.lease_expires_at = None
        if error is not None:
            job.error = error[:_MAX_ERROR_CHARS]


def requeue_after_shutdown(
    factory: sessionmaker[Session], job_id: str, holder: str | None = None
) -> None:
    """The process is stopping (not a cancel): leave the job queued to resume at next start."""
    where = [Job.id == job_id, Job.status == JobStatus.RUNNING]
    if holder is not None:
        where.append(Job.lease_owner == holder)
    with factory() as session, session.begin():
        session.execute(
            update(Job)
            .where(*where)
            .values(
                status=JobStatus.QUEUED,
                attempts=Job.attempts - 1,
                eta_s=None,
                lease_owner=None,
                lease_expires_at=None,
                message="interrupted by a shutdown; resumes from its checkpoint",
            )
        )
