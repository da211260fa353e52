"""/api/v1/jobs: create, list, inspect and cancel clustering jobs; read their results."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.api.deps import DispatcherDep, OwnerDep, SessionDep, SettingsDep, StorageDep
from app.api.images import image_response
from app.api.owned import get_owned_dataset, get_owned_job, valid_id
from app.auth import CurrentOwner
from app.db.models import Assignment, Cluster, Job, JobStatus, Owner, ResultSet, utcnow
from app.db.models import Image as ImageRow
from app.db.session import get_sessionmaker
from app.runner.dispatch import DispatchError
from app.schemas import (
    AssignmentPublic,
    AssignmentsPublic,
    ClusterPublic,
    ClustersPublic,
    JobCreate,
    JobPublic,
    JobsPublic,
    Message,
    ResultSetPublic,
)
from app.storage import Storage
from scan_engine.config import ConfigError, default_cluster_range, make_config

router = APIRouter(prefix="/jobs", tags=["jobs"])
logger = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Message} for code in (401, 404, 409, 422, 429, 503)
}
# Set through JobCreate's own fields; in overrides they would clash inside make_config.
_RESERVED_OVERRIDES = ("num_clusters", "overcluster", "preset", "num_clusters_range")


# ---------------------------------------------------------------------------------------------
# Views


def _job_k(job: Job) -> int | None:
    """K as asked; for a job that chooses K (num_clusters_range), None until it has succeeded."""
    choosing = (job.config or {}).get("num_clusters_range") is not None
    return None if choosing and job.status != JobStatus.SUCCEEDED else job.num_clusters


def jobs_public(session: Session, jobs: list[Job]) -> list[JobPublic]:
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


def owned_result_set(
    session: Session, job_id: str, num_clusters: int | None, owner: CurrentOwner
) -> ResultSet:
    """The result set of the owner's succeeded job for C = `num_clusters` (default K)."""
    job = get_owned_job(session, owner, job_id)
    if job.status != JobStatus.SUCCEEDED:
        raise HTTPException(409, f"job {job_id} is {job.status}; results exist once it succeeds")
    wanted = num_clusters if num_clusters is not None else job.num_clusters
    result_set = session.scalar(
        select(ResultSet).where(ResultSet.job_id == job_id, ResultSet.num_clusters == wanted)
    )
    if result_set is None:
        available = sorted(
            session.scalars(select(ResultSet.num_clusters).where(ResultSet.job_id == job_id))
        )
        raise HTTPException(
            404, f"job {job_id} has no result for num_clusters={wanted}; available: {available}"
        )
    return result_set


# ---------------------------------------------------------------------------------------------
# Creating and controlling jobs


def _resolve_weights(overrides: dict[str, Any], storage: Storage) -> dict[str, Any]:
    """backbone_weights may only name a file under DATA_DIR/models (no arbitrary server paths)."""
    weights = overrides.get("backbone_weights")
    if weights is None:
        return overrides
    if not isinstance(weights, str):
        raise HTTPException(422, "backbone_weights must be a file name under DATA_DIR/models")
    models = storage.models_dir.resolve()
    path = (models / weights).resolve()
    if models not in path.parents or not path.is_file():
        raise HTTPException(
            422, f"backbone_weights {weights!r} is not a file under the models folder"
        )
    return {**overrides, "backbone_weights": str(path)}


@router.post("", status_code=202, response_model=JobPublic, responses=_ERRORS)
def create_job(
    body: JobCreate,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    dispatcher: DispatcherDep,
    owner: OwnerDep,
    response: Response,
) -> JobPublic:
    """Validate the request against the dataset, commit the job row, then enqueue it.

    The owner's dataset only (404 otherwise); at most MAX_CONCURRENT_JOBS_PER_OWNER queued or
    running jobs per owner (429). When the queue cannot take the job the row is deleted again
    and the answer is 503 with Retry-After: nothing is left behind for a retry to trip over.
    """
    dataset = get_owned_dataset(session, owner, body.dataset_id)
    clashing = [key for key in _RESERVED_OVERRIDES if key in body.overrides]
    if clashing:
        raise HTTPException(422, f"set {', '.join(clashing)} with its own field, not in overrides")
    overrides = _resolve_weights(body.overrides, storage)
    # K unknown (a range, or neither K nor a range): the worker passes the range on to the
    # pipeline through the stored overrides, and the job's K is the chosen one once it succeeds.
    span = body.num_clusters_range
    if body.num_clusters is None and span is None:
        span = default_cluster_range(dataset.image_count)
    if span is not None:
        overrides = {**overrides, "num_clusters_range": list(span)}
    preset = body.preset or settings.DEFAULT_PRESET
    try:
        config = make_config(
            preset, num_clusters=body.num_clusters, overcluster=body.overcluster, **overrides
        )
    except (ConfigError, TypeError, ValueError) as error:
        raise HTTPException(422, str(error)) from None
    counts = config.possible_cluster_counts()
    too_many = [c for c in counts if c > dataset.image_count]
    if too_many:
        raise HTTPException(
            422,
            f"cluster counts {too_many} exceed the {dataset.image_count} images of dataset "
            f"{dataset.id}",
        )
    limit = settings.MAX_CONCURRENT_JOBS_PER_OWNER
    if limit:
        # The owner's row lock serialises its concurrent requests (PostgreSQL): two of them
        # cannot both take the last free place.
        session.execute(select(Owner.id).where(Owner.id == owner.id).with_for_update())
        active = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.owner_id == owner.id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        )
        if (active or 0) >= limit:
            session.rollback()
            raise HTTPException(
                429,
                f"this owner already has {active} queued or running jobs; the limit is {limit} "
                "(MAX_CONCURRENT_JOBS_PER_OWNER). Wait for one to finish or cancel one.",
                headers={"Retry-After": "60"},
            )
    job = Job(
        owner_id=owner.id,
        dataset_id=dataset.id,
        status=JobStatus.QUEUED,
        num_clusters=config.num_clusters,
        overcluster=body.overcluster,
        cluster_counts=counts,
        preset=preset,
        overrides=overrides,
        config=config.to_json_dict(),
    )
    session.add(job)
    session.commit()  # before enqueueing: a worker must find the row
    try:
        dispatcher.enqueue(job.id)
    except DispatchError as error:
        logger.error("could not enqueue job", extra={"job_id": job.id, "error": str(error)})
        # Conditional: had the message gone out after all and a worker started the job, the
        # job stands (and the reaper would re-send it were it lost).
        removed = session.execute(  # type: ignore[attr-defined]
            delete(Job).where(Job.id == job.id, Job.status == JobStatus.QUEUED)
        ).rowcount
        session.commit()
        if removed:
            raise HTTPException(
                503,
                "the job queue is unavailable, so the job was not created; try again later",
                headers={"Retry-After": str(settings.DB_RETRY_AFTER_S)},
            ) from None
    logger.info("job queued", extra={"job_id": job.id, "dataset_id": dataset.id})
    response.headers["Location"] = f"/api/v1/jobs/{job.id}"
    session.refresh(job)
    return jobs_public(session, [job])[0]


@router.get("", response_model=JobsPublic)
def list_jobs(
    session: SessionDep,
    owner: OwnerDep,
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
    dataset_id: str | None = None,
    offset: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=1000),
) -> JobsPublic:
    query = select(Job).where(Job.owner_id == owner.id)
    if status is not None:
        query = query.where(Job.status == status)
    if dataset_id is not None:
        query = query.where(Job.dataset_id == (dataset_id if valid_id(dataset_id) else ""))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    jobs = list(
        session.scalars(query.order_by(Job.created_at.desc(), Job.id).offset(offset).limit(limit))
    )
    return JobsPublic(items=jobs_public(session, jobs), total=total)


@router.get("/{job_id}", response_model=JobPublic, responses=_ERRORS)
def get_job(session: SessionDep, owner: OwnerDep, job_id: str) -> JobPublic:
    return jobs_public(session, [get_owned_job(session, owner, job_id)])[0]


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    responses={**_ERRORS, 202: {"model": JobPublic, "description": "Running: stops soon."}},
)
def cancel_job(session: SessionDep, owner: OwnerDep, job_id: str, response: Response) -> JobPublic:
    """Queued -> cancelled now (200). Running -> stops at its next step (202). Repeating is
    harmless; a job that already succeeded or failed -> 409."""
    job = get_owned_job(session, owner, job_id)
    now = utcnow()
    # Conditional updates: the worker may move the job between our read and our write.
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
    session.refresh(job)
    if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise HTTPException(409, f"job {job_id} already {job.status}; nothing to cancel")
    if job.status == JobStatus.RUNNING:
        response.status_code = 202
    logger.info("job cancel requested", extra={"job_id": job_id, "status": job.status})
    return jobs_public(session, [job])[0]


# ---------------------------------------------------------------------------------------------
# Results


def _csv_rows(url: str, result_set_id: int) -> Iterator[str]:
    """The whole CSV, produced in chunks from a server-side cursor (never all rows at once)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image_id", "filename", "cluster", "confidence"])
    with get_sessionmaker(url)() as session:
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


@router.get(
    "/{job_id}/assignments",
    response_model=AssignmentsPublic,
    responses={**_ERRORS, 200: {"content": {"text/csv": {}}}},
)
def get_assignments(
    session: SessionDep,
    settings: SettingsDep,
    owner: OwnerDep,
    job_id: str,
    num_clusters: int | None = Query(None, description="C of the result set; default K."),
    offset: int = Query(0, ge=0),
    limit: int = Query(1000, ge=1, le=10000),
    cluster: int | None = Query(None, ge=0, description="Only the members of this cluster."),
    output_format: Literal["json", "csv"] | None = Query(None, alias="format"),
    accept: str | None = Header(None),
) -> Any:
    """Every image exactly once with its cluster and confidence: JSON pages, or the whole CSV
    (`format=csv` or `Accept: text/csv`)."""
    result_set = owned_result_set(session, job_id, num_clusters, owner)
    wants_csv = output_format == "csv" or (
        output_format is None and accept is not None and "text/csv" in accept
    )
    if wants_csv:
        filename = f"job-{job_id}-C{result_set.num_clusters}.csv"
        return StreamingResponse(
            _csv_rows(settings.DATABASE_URL, result_set.id),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
    return assignment_page(session, job_id, result_set, cluster, offset, limit)


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


@router.get("/{job_id}/clusters", response_model=ClustersPublic, responses=_ERRORS)
def get_clusters(
    session: SessionDep,
    owner: OwnerDep,
    job_id: str,
    num_clusters: int | None = Query(None, description="C of the result set; default K."),
) -> ClustersPublic:
    """Per cluster: size, mean confidence, prototype image id and the top members' ids."""
    result_set = owned_result_set(session, job_id, num_clusters, owner)
    clusters = session.scalars(
        select(Cluster).where(Cluster.result_set_id == result_set.id).order_by(Cluster.index)
    )
    return ClustersPublic(
        job_id=job_id,
        num_clusters=result_set.num_clusters,
        head=result_set.head,
        stage=result_set.stage,
        metrics=result_set.metrics,
        clusters=[
            ClusterPublic(
                index=c.index,
                size=c.size,
                mean_confidence=c.mean_confidence,
                prototype_image_id=c.prototype_image_id,
                top_members=list(c.top_members),
            )
            for c in clusters
        ],
    )


@router.get(
    "/{job_id}/clusters/{cluster_index}/prototype",
    response_class=Response,
    responses={**_ERRORS, 200: {"content": {"image/png": {}, "image/jpeg": {}}}},
)
def get_prototype(
    session: SessionDep,
    storage: StorageDep,
    owner: OwnerDep,
    job_id: str,
    cluster_index: int,
    num_clusters: int | None = Query(None, description="C of the result set; default K."),
    thumbnail: bool = Query(False),
) -> Response:
    """The prototype image of a cluster (PNG or JPEG bytes)."""
    result_set = owned_result_set(session, job_id, num_clusters, owner)
    cluster = session.scalar(
        select(Cluster).where(
            Cluster.result_set_id == result_set.id, Cluster.index == cluster_index
        )
    )
    if cluster is None:
        raise HTTPException(404, f"cluster {cluster_index} not found (C={result_set.num_clusters})")
    if cluster.prototype_image_id is None:
        raise HTTPException(404, f"cluster {cluster_index} is empty; it has no prototype")
    row = session.get(ImageRow, cluster.prototype_image_id)
    if row is None:
        raise HTTPException(404, f"the prototype image of cluster {cluster_index} is gone")
    return image_response(row, storage, thumbnail=thumbnail, png_or_jpeg=True)


__all__ = ["router", "jobs_public"]
