"""/api/v1/jobs: create, list, inspect and cancel clustering jobs (their results:
app.api.routes.results)."""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query, Response

from app import crud
from app.api.deps import (
    DispatcherDep,
    ObjectStoreDep,
    OwnerDep,
    SessionDep,
    SettingsDep,
    StorageDep,
)
from app.api.owned import get_owned_dataset, get_owned_job, valid_id
from app.backbones import BackboneChoiceError, check_backbone, preset_is_pretrained
from app.core.config import Settings
from app.db.models import Dataset, JobStatus
from app.runner.dispatch import DispatchError
from app.schemas import JobCreate, JobPublic, JobsPublic, Message
from app.storage import remove_prefixes
from scan_engine.config import (
    PRESETS,
    ConfigError,
    ScanConfig,
    default_cluster_range,
    make_config,
)

__all__ = ["router"]

router = APIRouter(prefix="/jobs", tags=["jobs"])
logger = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Message} for code in (401, 404, 409, 422, 429, 503)
}
# Set through JobCreate's own fields; in overrides they would clash inside make_config.
_RESERVED_OVERRIDES = (
    "num_clusters",
    "overcluster",
    "preset",
    "num_clusters_range",
    "pretrained_backbone",
)
_OWN_FIELD = {"pretrained_backbone": "backbone"}
# This server's folders: the worker sets them (MODELS_DIR, the dataset's feature cache).
_SERVER_OVERRIDES = ("models_dir", "feature_cache_dir")


def _resolve_weights(overrides: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """backbone_weights may only name a file under MODELS_DIR (no arbitrary server paths)."""
    weights = overrides.get("backbone_weights")
    if weights is None:
        return overrides
    if not isinstance(weights, str):
        raise HTTPException(422, "backbone_weights must be a file name under the models folder")
    assert settings.MODELS_DIR is not None  # resolved by Settings
    models = settings.MODELS_DIR.resolve()
    path = (models / weights).resolve()
    if models not in path.parents or not path.is_file():
        raise HTTPException(
            422, f"backbone_weights {weights!r} is not a file under the models folder"
        )
    return {**overrides, "backbone_weights": str(path)}


def _job_backbone(body: JobCreate, preset: str, settings: Settings) -> str | None:
    """The backbone the job runs with (None: SimCLR from scratch), or 422 with the reason."""
    if preset not in PRESETS:
        return None  # make_config names the known presets
    if not preset_is_pretrained(preset):
        if body.backbone is not None:
            raise HTTPException(
                422,
                f"preset {preset!r} trains its own features from scratch (SimCLR) and takes no "
                f"backbone; use preset 'pretrained' to cluster with backbone "
                f"{body.backbone!r}, or leave backbone out",
            )
        return None
    backbone = body.backbone or settings.DEFAULT_BACKBONE
    try:
        check_backbone(backbone, settings)
    except BackboneChoiceError as error:
        raise HTTPException(422, str(error)) from None
    return backbone


def _job_config(
    body: JobCreate, dataset: Dataset, preset: str, backbone: str | None, settings: Settings
) -> tuple[ScanConfig, dict[str, Any]]:
    """The resolved config and the overrides to store, or 422 with the reason."""
    clashing = [_OWN_FIELD.get(key, key) for key in _RESERVED_OVERRIDES if key in body.overrides]
    if clashing:
        raise HTTPException(422, f"set {', '.join(clashing)} with its own field, not in overrides")
    server_owned = [key for key in _SERVER_OVERRIDES if key in body.overrides]
    if server_owned:
        raise HTTPException(
            422, f"{', '.join(server_owned)} belong to the server's setup, not to a request"
        )
    overrides = _resolve_weights(body.overrides, settings)
    # K unknown (a range, or neither K nor a range): the worker passes the range on to the
    # pipeline through the stored overrides, and the job's K is the chosen one once it succeeds.
    span = body.num_clusters_range
    if body.num_clusters is None and span is None:
        span = default_cluster_range(dataset.image_count)
    if span is not None:
        overrides = {**overrides, "num_clusters_range": list(span)}
    try:
        route = {} if backbone is None else {"pretrained_backbone": backbone}
        config = make_config(
            preset,
            num_clusters=body.num_clusters,
            overcluster=body.overcluster,
            **overrides,
            **route,
        )
    except (ConfigError, TypeError, ValueError) as error:
        raise HTTPException(422, str(error)) from None
    too_many = [c for c in config.possible_cluster_counts() if c > dataset.image_count]
    if too_many:
        raise HTTPException(
            422,
            f"cluster counts {too_many} exceed the {dataset.image_count} images of dataset "
            f"{dataset.id}",
        )
    return config, overrides


@router.post("", status_code=202, response_model=JobPublic, responses=_ERRORS)
def create_job(
    body: JobCreate,
    session: SessionDep,
    settings: SettingsDep,
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
    preset = body.preset or settings.DEFAULT_PRESET
    backbone = _job_backbone(body, preset, settings)
    config, overrides = _job_config(body, dataset, preset, backbone, settings)
    try:
        job = crud.create_job(
            session,
            owner_id=owner.id,
            dataset_id=dataset.id,
            preset=preset,
            backbone=backbone,
            num_clusters=config.num_clusters,
            overcluster=body.overcluster,
            cluster_counts=config.possible_cluster_counts(),
            overrides=overrides,
            config=config.to_json_dict(),
            active_limit=settings.MAX_CONCURRENT_JOBS_PER_OWNER,
        )
    except crud.JobLimitReached as full:
        raise HTTPException(
            429,
            f"this owner already has {full.active} queued or running jobs; the limit is "
            f"{full.limit} (MAX_CONCURRENT_JOBS_PER_OWNER). Wait for one to finish or cancel one.",
            headers={"Retry-After": "60"},
        ) from None
    try:
        dispatcher.enqueue(job.id)  # after the commit: a worker must find the row
    except DispatchError as error:
        logger.error("could not enqueue job", extra={"job_id": job.id, "error": str(error)})
        # Conditional: had the message gone out after all and a worker started the job, the
        # job stands (and the reaper would re-send it were it lost).
        if crud.delete_unsent_job(session, job.id):
            raise HTTPException(
                503,
                "the job queue is unavailable, so the job was not created; try again later",
                headers={"Retry-After": str(settings.DB_RETRY_AFTER_S)},
            ) from None
    logger.info("job queued", extra={"job_id": job.id, "dataset_id": dataset.id})
    response.headers["Location"] = f"/api/v1/jobs/{job.id}"
    session.refresh(job)
    return crud.jobs_public(session, [job])[0]


@router.get("", response_model=JobsPublic)
def list_jobs(
    session: SessionDep,
    owner: OwnerDep,
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
    dataset_id: str | None = None,
    offset: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=1000),
) -> JobsPublic:
    if dataset_id is not None and not valid_id(dataset_id):
        dataset_id = ""  # matches nothing, without sending an odd string to SQL
    jobs, total = crud.list_jobs(
        session, owner.id, status=status, dataset_id=dataset_id, offset=offset, limit=limit
    )
    return JobsPublic(items=crud.jobs_public(session, jobs), total=total)


@router.get("/{job_id}", response_model=JobPublic, responses=_ERRORS)
def get_job(session: SessionDep, owner: OwnerDep, job_id: str) -> JobPublic:
    return crud.jobs_public(session, [get_owned_job(session, owner, job_id)])[0]


@router.delete("/{job_id}", status_code=204, responses={**_ERRORS, 409: {"model": Message}})
def delete_job(
    session: SessionDep,
    owner: OwnerDep,
    store: ObjectStoreDep,
    storage: StorageDep,
    job_id: str,
) -> Response:
    """Delete a finished job with its results and its stored files (model, checkpoints, map).
    409 while it is queued or running (cancel it first). The dataset stays."""
    get_owned_job(session, owner, job_id)
    try:
        crud.delete_job(session, job_id)
    except crud.JobInUse:
        raise HTTPException(
            409, f"job {job_id} is queued or running; cancel it or wait for it to finish"
        ) from None
    remove_prefixes(store, [f"jobs/{job_id}/"])  # after the commit, as for datasets
    storage.remove(storage.model_copy_dir(job_id))  # this host's copy for prediction (S3)
    logger.info("job deleted", extra={"job_id": job_id})
    return Response(status_code=204)


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    responses={**_ERRORS, 202: {"model": JobPublic, "description": "Running: stops soon."}},
)
def cancel_job(session: SessionDep, owner: OwnerDep, job_id: str, response: Response) -> JobPublic:
    """Queued -> cancelled now (200). Running -> stops at its next step (202). Repeating is
    harmless; a job that already succeeded or failed -> 409."""
    job = get_owned_job(session, owner, job_id)
    crud.request_cancel(session, job_id)
    session.refresh(job)
    if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise HTTPException(409, f"job {job_id} already {job.status}; nothing to cancel")
    if job.status == JobStatus.RUNNING:
        response.status_code = 202
    logger.info("job cancel requested", extra={"job_id": job_id, "status": job.status})
    return crud.jobs_public(session, [job])[0]
