"""Data access for jobs and their results: the queries the routes share, in one place.

Functions take a session and plain values and return rows or public schemas; they raise no HTTP
errors (the routes and app.api.owned decide what a missing row answers). Writes that must be
visible to a worker before it is told about them commit here (`create_job`, `request_cancel`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.db.models import (
    Assignment,
    Cluster,
    Dataset,
    Job,
    JobStatus,
    Owner,
    ResultSet,
    utcnow,
)
from app.db.models import Image as ImageRow
from app.db.session import get_sessionmaker
from app.schemas import AssignmentPublic, AssignmentsPublic, JobPublic, ResultSetPublic

__all__ = [
    "DatasetInUse",
    "delete_dataset",
    "JobLimitReached",
    "create_job",
    "delete_unsent_job",
    "list_jobs",
    "request_cancel",
    "jobs_public",
    "get_result_set",
    "result_set_counts",
    "clusters_of",
    "get_cluster",
    "assignment_page",
    "assignment_count",
    "assignment_points",
    "assignments_csv",
]

ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


# ---------------------------------------------------------------------------------------------
# Datasets


class DatasetInUse(Exception):
    """The dataset has queued or running jobs."""

    def __init__(self, active: int) -> None:
        super().__init__(f"{active} queued or running jobs")
        self.active = active


def delete_dataset(session: Session, dataset_id: str) -> list[str]:
    """Delete the dataset's row with its images and jobs (and their results), committed; the
    ids of the jobs removed, whose folders the caller removes. DatasetInUse, and nothing
    deleted, while one of its jobs is queued or running."""
    # The dataset's row lock: a job created meanwhile for it waits, then finds it gone.
    session.execute(select(Dataset.id).where(Dataset.id == dataset_id).with_for_update())
    jobs = session.execute(select(Job.id, Job.status).where(Job.dataset_id == dataset_id)).all()
    active = sum(1 for _, status in jobs if status in ACTIVE)
    if active:
        session.rollback()
        raise DatasetInUse(active)
    # Explicit deletes, children first: no reliance on the database enforcing the cascades.
    job_ids = [job_id for job_id, _ in jobs]
    if job_ids:
        result_sets = select(ResultSet.id).where(ResultSet.job_id.in_(job_ids))
        session.execute(delete(Assignment).where(Assignment.result_set_id.in_(result_sets)))
        session.execute(delete(Cluster).where(Cluster.result_set_id.in_(result_sets)))
        session.execute(delete(ResultSet).where(ResultSet.job_id.in_(job_ids)))
        session.execute(delete(Job).where(Job.id.in_(job_ids)))
    session.execute(delete(ImageRow).where(ImageRow.dataset_id == dataset_id))
    session.execute(delete(Dataset).where(Dataset.id == dataset_id))
    session.commit()
    return job_ids


# ---------------------------------------------------------------------------------------------
# Jobs


class JobLimitReached(Exception):
    """The owner already has `limit` queued or running jobs."""

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(f"{active} queued or running jobs; the limit is {limit}")
        self.active = active
        self.limit = limit


def create_job(
    session: Session,
    *,
    owner_id: str,
    dataset_id: str,
    preset: str,
    num_clusters: int,
    overcluster: float | list[int] | None,
    cluster_counts: list[int],
    overrides: dict[str, Any],
    config: dict[str, Any],
    backbone: str | None = None,
    active_limit: int = 0,
) -> Job:
    """Insert a queued job and commit it (a worker told about it must find the row).

    `config` is the resolved ScanConfig as JSON; `backbone` the pretrained route's (None:
    scratch). With `active_limit` > 0, an owner with that many
    queued or running jobs gets JobLimitReached and nothing is written.
    """
    if active_limit:
        # The owner's row lock serialises its concurrent requests (PostgreSQL): two of them
        # cannot both take the last free place.
        session.execute(select(Owner.id).where(Owner.id == owner_id).with_for_update())
        active = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.owner_id == owner_id, Job.status.in_(ACTIVE))
        )
        if (active or 0) >= active_limit:
            session.rollback()
            raise JobLimitReached(active or 0, active_limit)
    job = Job(
        owner_id=owner_id,
        dataset_id=dataset_id,
        status=JobStatus.QUEUED,
        num_clusters=num_clusters,
        overcluster=overcluster,
        cluster_counts=cluster_counts,
        preset=preset,
        backbone=backbone,
        overrides=overrides,
        config=config,
    )
    session.add(job)
    session.commit()
    return job


class JobInUse(Exception):
    """The job is queued or running."""


def delete_job(session: Session, job_id: str) -> None:
    """Delete a finished job's row and its results, committed (its objects are the caller's).
    JobInUse, and nothing deleted, while it is queued or running."""
    status = session.scalar(select(Job.status).where(Job.id == job_id).with_for_update())
    if status in ACTIVE:
        session.rollback()
        raise JobInUse(job_id)
    result_sets = select(ResultSet.id).where(ResultSet.job_id == job_id)
    session.execute(delete(Assignment).where(Assignment.result_set_id.in_(result_sets)))
    session.execute(delete(Cluster).where(Cluster.result_set_id.in_(result_sets)))
    session.execute(delete(ResultSet).where(ResultSet.job_id == job_id))
    session.execute(delete(Job).where(Job.id == job_id))
    session.commit()


def delete_unsent_job(session: Session, job_id: str) -> bool:
    """Delete a job that could not be enqueued; False when a worker has started it after all
    (its message went out), which then stands."""
    removed = session.execute(  # type: ignore[attr-defined]
        delete(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED)
    ).rowcount
    session.commit()
    return bool(removed)


def list_jobs(
    session: Session,
    owner_id: str,
    *,
    status: str | None = None,
    dataset_id: str | None = None,
    offset: int = 0,
    limit: int = 100,
) -> tuple[list[Job], int]:
    """One page of the owner's jobs, newest first, and the total count matching the filters."""
    query = select(Job).where(Job.owner_id == owner_id)
    if status is not None:
        query = query.where(Job.status == status)
    if dataset_id is not None:
        query = query.where(Job.dataset_id == dataset_id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    jobs = list(
        session.scalars(query.order_by(Job.created_at.desc(), Job.id).offset(offset).limit(limit))
    )
    return jobs, total


def request_cancel(session: Session, job_id: str) -> None:
    """Queued -> cancelled now; running -> cancel_requested (the worker stops at its next
    step); finished -> unchanged. Committed."""
    now = utcnow()
    # Conditional updates: the worker may move the job between the caller's read and this write.
    cancelled_now = session.execute(  # type: ignore[attr-defined]
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, cancel_requested=True, finished_at=now, eta_s=None)
    ).rowcount
    if not cancelled_now:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
            .values(cancel_requested=True)
        )
    session.commit()


def _job_k(job: Job) -> int | None:
    """K as asked; for a job that chooses K (num_clusters_range), None until it has succeeded."""
    choosing = (job.config or {}).get("num_clusters_range") is not None
    return None if choosing and job.status != JobStatus.SUCCEEDED else job.num_clusters


def _features_from_cache(run_report: dict[str, Any] | None) -> bool | None:
    value = (run_report or {}).get("features_from_cache")
    return value if isinstance(value, bool) else None


def _route(job: Job) -> str:
    """pretrained (a named backbone, or a ResNet state dict in backbone_weights) or scratch."""
    reported = (job.run_report or {}).get("route")
    if isinstance(reported, str):
        return reported
    frozen = job.backbone is not None or (job.config or {}).get("backbone_weights") is not None
    return "pretrained" if frozen else "scratch"


def _image_size(job: Job) -> int | None:
    value = (job.run_report or {}).get("image_size", (job.config or {}).get("image_size"))
    return value if isinstance(value, int) else None


def jobs_public(session: Session, jobs: Sequence[Job]) -> list[JobPublic]:
    """JobPublic for each job, with its result sets (one query for all of them)."""
    non_empty = func.count(Cluster.id).filter(Cluster.size > 0)
    rows = session.execute(
        select(ResultSet, non_empty)
        .outerjoin(Cluster, Cluster.result_set_id == ResultSet.id)
        .where(ResultSet.job_id.in_([job.id for job in jobs]))
        .group_by(ResultSet.id)
        .order_by(ResultSet.num_clusters)
    ).all()
    by_job: dict[str, list[ResultSetPublic]] = {}
    for result_set, cluster_count in rows:
        by_job.setdefault(result_set.job_id, []).append(
            ResultSetPublic(
                num_clusters=result_set.num_clusters,
                cluster_count=cluster_count,
                head=result_set.head,
                stage=result_set.stage,
                metrics=result_set.metrics,
            )
        )
    return [
        JobPublic(
            id=job.id,
            dataset_id=job.dataset_id,
            status=job.status,
            cancel_requested=job.cancel_requested,
            stage=job.stage,
            progress=job.progress,
            eta_s=job.eta_s,
            message=job.message,
            num_clusters=_job_k(job),
            num_clusters_range=(job.config or {}).get("num_clusters_range"),
            k_selection=(job.metrics or {}).get("k_selection"),
            overcluster=job.overcluster,
            cluster_counts=job.cluster_counts,
            preset=job.preset,
            route=_route(job),
            backbone=job.backbone,
            image_size=_image_size(job),
            features_from_cache=_features_from_cache(job.run_report),
            run_report=job.run_report,
            overrides=job.overrides,
            config=job.config,
            timings=job.timings,
            metrics=job.metrics,
            notes=job.notes,
            error=job.error,
            attempts=job.attempts,
            model_path=job.model_path,
            result_sets=by_job.get(job.id, []),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            duration_s=job.duration_s,
        )
        for job in jobs
    ]


# ---------------------------------------------------------------------------------------------
# Results: result sets, clusters, assignments


def get_result_set(session: Session, job_id: str, num_clusters: int) -> ResultSet | None:
    """The job's result set for C = `num_clusters`."""
    return session.scalar(
        select(ResultSet).where(ResultSet.job_id == job_id, ResultSet.num_clusters == num_clusters)
    )


def result_set_counts(session: Session, job_id: str) -> list[int]:
    """Every C the job has a result set for, ascending."""
    return sorted(session.scalars(select(ResultSet.num_clusters).where(ResultSet.job_id == job_id)))


def clusters_of(session: Session, result_set_id: int) -> list[Cluster]:
    """The result set's clusters by index."""
    return list(
        session.scalars(
            select(Cluster).where(Cluster.result_set_id == result_set_id).order_by(Cluster.index)
        )
    )


def get_cluster(session: Session, result_set_id: int, index: int) -> Cluster | None:
    return session.scalar(
        select(Cluster).where(Cluster.result_set_id == result_set_id, Cluster.index == index)
    )


def assignment_page(
    session: Session,
    job_id: str,
    result_set: ResultSet,
    cluster: int | None,
    offset: int,
    limit: int,
    most_confident_first: bool = False,
) -> AssignmentsPublic:
    """One page of a result set's assignments (optionally one cluster's), in image order or
    most confident first (ties in image order)."""
    where = [Assignment.result_set_id == result_set.id]
    if cluster is not None:
        where.append(Assignment.cluster == cluster)
    order = (
        (Assignment.confidence.desc(), Assignment.position)
        if most_confident_first
        else (Assignment.position,)
    )
    total = session.scalar(select(func.count()).select_from(Assignment).where(*where)) or 0
    rows = session.execute(
        select(
            Assignment.image_id, ImageRow.original_path, Assignment.cluster, Assignment.confidence
        )
        .join(ImageRow, ImageRow.id == Assignment.image_id)
        .where(*where)
        .order_by(*order)
        .offset(offset)
        .limit(limit)
    ).all()
    return AssignmentsPublic(
        job_id=job_id,
        num_clusters=result_set.num_clusters,
        total=total,
        offset=offset,
        limit=limit,
        items=[
            AssignmentPublic(image_id=i, filename=f, cluster=c, confidence=p) for i, f, c, p in rows
        ],
    )


def assignment_count(session: Session, result_set_id: int) -> int:
    """Images in the result set (every image of the job's dataset, once)."""
    in_set = Assignment.result_set_id == result_set_id
    return session.scalar(select(func.count()).select_from(Assignment).where(in_set)) or 0


def assignment_points(
    session: Session, result_set_id: int, positions: Sequence[int] | None = None
) -> list[tuple[int, str, int, float]]:
    """(position, image id, cluster, confidence) of the result set's images at `positions`
    (all when None), in position order."""
    query = select(
        Assignment.position, Assignment.image_id, Assignment.cluster, Assignment.confidence
    ).where(Assignment.result_set_id == result_set_id)
    if positions is not None:
        query = query.where(Assignment.position.in_(list(positions)))
    rows = session.execute(query.order_by(Assignment.position)).all()
    return [(row[0], row[1], row[2], row[3]) for row in rows]


def assignments_csv(database_url: str, result_set_id: int) -> Iterator[str]:
    """The whole CSV, produced in chunks from a server-side cursor (never all rows at once).

    Its own session: the response streams after the request's session has closed.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image_id", "filename", "cluster", "confidence"])
    with get_sessionmaker(database_url)() as session:
        result = session.execute(
            select(
                Assignment.image_id,
                ImageRow.original_path,
                Assignment.cluster,
                Assignment.confidence,
            )
            .join(ImageRow, ImageRow.id == Assignment.image_id)
            .where(Assignment.result_set_id == result_set_id)
            .order_by(Assignment.position)
            .execution_options(yield_per=5000)
        )
        for partition in result.partitions():
            for image_id, filename, cluster, confidence in partition:
                writer.writerow([image_id, filename, cluster, f"{confidence:.6f}"])
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    if buffer.getvalue():
        yield buffer.getvalue()
