"""/api/v1/jobs/{id}/predict and /merge: new images into a finished job's clusters, without
retraining, and an overclustering merged down to fewer clusters.

The job's model file (object `jobs/<id>/work/model.pt`, see scan_engine.predict) holds the
backbone, the kept head per C, the preprocessing and the cluster geometry that flags outliers.
A job without one (not succeeded, or its file is gone) answers 409.

Zips in the upload go through the same rules as dataset uploads (scan_engine.archive with the
settings' limits, at most MAX_PREDICT_IMAGES entries): not a zip 400, over a limit 413, unsafe
or unusable entries skipped with their reasons.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from app.api.deps import ObjectStoreDep, OwnerDep, SessionDep, SettingsDep
from app.api.owned import get_owned_job
from app.auth import CurrentOwner
from app.core.config import Settings
from app.db.models import Cluster, Job, JobStatus, ResultSet
from app.schemas import Message, SkippedEntry
from app.storage import (
    FilesystemObjectStore,
    ObjectStore,
    Storage,
    StorageKeyMissing,
    StoragePathError,
    check_key,
)
from app.uploads import archive_limits, printable, refusal

if TYPE_CHECKING:
    from scan_engine.predict import Predictor

__all__ = ["router", "PredictionsPublic", "MergePublic"]

router = APIRouter(prefix="/jobs", tags=["predict"])
logger = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Message} for code in (401, 404, 409, 411, 413, 415, 422)
}
# One request is answered synchronously: keep it to what a CPU predicts in seconds.
MAX_PREDICT_IMAGES = 5000
MAX_PREDICT_BYTES = 512 * 1024 * 1024
_FILE_FIELDS = ("file", "files")


class PredictedImage(BaseModel):
    filename: str = Field(description="The uploaded file's name, or the path inside the zip.")
    cluster: int
    confidence: float = Field(description="Max probability of the job's model, 0..1.")
    distance: float | None = Field(
        description="Cosine distance of the image's feature to the nearest cluster centroid."
    )
    outlier: bool | None = Field(
        description="Unlike the training images: its 5th nearest training image is farther than "
        "for 99% of the training images (models stored before that rule: outside every "
        "cluster's radius); null for a model stored without cluster geometry."
    )


class PredictionsPublic(BaseModel):
    job_id: str
    num_clusters: int = Field(description="Clusters predicted into (after merging, if asked).")
    merged_from: int | None = Field(description="C of the head whose clusters were merged.")
    groups: list[int] | None = Field(description="Merged cluster of each of the C clusters.")
    model: dict[str, Any]
    outlier_count: int
    items: list[PredictedImage]
    skipped: list[SkippedEntry]


class MergedCluster(BaseModel):
    index: int
    members: list[int] = Field(description="The clusters of C that were merged into this one.")
    size: int


class MergePublic(BaseModel):
    job_id: str
    num_clusters: int = Field(description="C, the overclustering that was merged.")
    merge_to: int
    groups: list[int] = Field(description="Entry c: the merged cluster of cluster c of C.")
    clusters: list[MergedCluster]


# ---------------------------------------------------------------------------------------------
# The job's model


@lru_cache(maxsize=4)
def _cached_predictor(path: str, version: str) -> Predictor:
    # Keyed by version too: a rerun of the job that rewrote the model is reloaded.
    from scan_engine.predict import load_model

    return load_model(path, device="cpu")


def _model_file(store: ObjectStore, settings: Settings, job: Job, key: str) -> tuple[Path, str]:
    """A local file of the job's model and its version: the stored file itself on the local
    store; on S3 a copy fetched once into this host's DATA_DIR/scratch/models."""
    if isinstance(store, FilesystemObjectStore):
        path = store.path_of(key)
        if not path.is_file():
            raise StorageKeyMissing(key)
        return path, str(path.stat().st_mtime_ns)
    version = f"{job.finished_at:%Y%m%dT%H%M%S%f}" if job.finished_at else "0"
    path = Storage(settings.DATA_DIR).abspath(Storage.model_copy_dir(job.id)) / f"{version}.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as part:
            temporary = Path(part.name)
        try:
            store.get_file(key, temporary)
            os.replace(temporary, path)  # concurrent requests never load half a file
        finally:
            temporary.unlink(missing_ok=True)
    return path, version


def _job_predictor(
    session: Session, owner: CurrentOwner, store: ObjectStore, settings: Settings, job_id: str
) -> Predictor:
    """The owner's succeeded job's model; 404 for a foreign or unknown job, 409 without a model,
    503 (StorageUnavailable) while the store is down."""
    job: Job = get_owned_job(session, owner, job_id)
    if job.status != JobStatus.SUCCEEDED:
        raise HTTPException(
            409, f"job {job_id} is {job.status}; prediction needs a job that succeeded"
        )
    missing = (
        f"job {job_id} has no stored model to predict with (finished before models were kept, "
        "or its files were removed); run the job again"
    )
    if not job.model_path:
        raise HTTPException(409, missing)
    try:
        path, version = _model_file(store, settings, job, check_key(job.model_path))
    except (StoragePathError, StorageKeyMissing):
        raise HTTPException(409, missing) from None
    from scan_engine.predict import ModelFormatError

    try:
        return _cached_predictor(str(path), version)
    except ModelFormatError as error:
        raise HTTPException(
            409, f"the stored model of job {job_id} cannot be used: {error}"
        ) from None


def _cluster_count(predictor: Predictor, job_id: str, num_clusters: int | None) -> int:
    wanted = predictor.num_clusters if num_clusters is None else num_clusters
    if wanted not in predictor.cluster_counts:
        raise HTTPException(
            404,
            f"job {job_id} has no model for num_clusters={wanted}; "
            f"available: {predictor.cluster_counts}",
        )
    return wanted


def _check_merge(num_clusters: int, merge_to: int | None) -> None:
    if merge_to is not None and not 1 <= merge_to <= num_clusters:
        raise HTTPException(422, f"merge_to must be between 1 and num_clusters={num_clusters}")


# ---------------------------------------------------------------------------------------------
# Reading the uploaded images


def _is_zip(upload: UploadFile) -> bool:
    """A zip by its name, first bytes or end record; a damaged one is refused, not decoded."""
    from scan_engine.archive import looks_like_zip

    upload.file.seek(0)
    head = upload.file.read(4)
    upload.file.seek(0)
    named = (upload.filename or "").lower().endswith(".zip")
    found = named or looks_like_zip(head) or zipfile.is_zipfile(upload.file)
    upload.file.seek(0)
    return found


def _read_images(
    uploads: list[UploadFile], image_size: int, settings: Settings
) -> tuple[list[str], np.ndarray, list[SkippedEntry]]:
    """(filenames, images (N, S, S, 3) uint8, skipped) from image files and zips, in order."""
    from scan_engine.archive import ArchiveLimitError, NotAZipError
    from scan_engine.data import MAX_FILE_BYTES, ImageDecodeError, decode_image, load_zip

    limits = archive_limits(settings, max_entries=MAX_PREDICT_IMAGES)
    names: list[str] = []
    arrays: list[np.ndarray] = []
    skipped: list[SkippedEntry] = []
    for upload in uploads:
        name = upload.filename or "upload"
        if _is_zip(upload):
            with tempfile.NamedTemporaryFile(suffix=".zip") as copy:
                while chunk := upload.file.read(1024 * 1024):
                    copy.write(chunk)
                copy.flush()
                try:
                    collection = load_zip(copy.name, image_size, limits=limits)
                except (NotAZipError, ArchiveLimitError) as error:
                    status = refusal(error).status_code
                    raise HTTPException(status, f"{name}: {error}") from None
            names += collection.paths
            arrays.append(collection.images.permute(0, 2, 3, 1).numpy())  # (n, S, S, 3)
            skipped += [
                SkippedEntry(path=printable(s.path), reason=printable(s.reason))
                for s in collection.skipped
            ]
        else:
            upload.file.seek(0)
            payload = upload.file.read(MAX_FILE_BYTES + 1)
            try:
                array = decode_image(payload, image_size)  # (S, S, 3) uint8
            except ImageDecodeError as error:
                skipped.append(SkippedEntry(path=printable(name), reason=str(error)))
                continue
            names.append(name)
            arrays.append(array[None])
        if len(names) > MAX_PREDICT_IMAGES:
            raise HTTPException(413, f"more than {MAX_PREDICT_IMAGES} images in one request")
    images = (
        np.concatenate(arrays) if arrays else np.zeros((0, image_size, image_size, 3), np.uint8)
    )
    return names, images, skipped


def _predict(
    predictor: Predictor,
    uploads: list[UploadFile],
    num_clusters: int,
    merge_to: int | None,
    settings: Settings,
) -> tuple[list[str], Any, list[SkippedEntry]]:
    import torch

    names, images, skipped = _read_images(uploads, predictor.image_size, settings)
    if not names:
        shown = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:5])
        raise HTTPException(422, f"no usable image in the upload ({shown or 'no files'})")
    tensor = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # (N, 3, S, S)
    try:
        prediction = predictor.predict(tensor, num_clusters, merge_to)
    except ValueError as error:
        raise HTTPException(422, str(error)) from None
    return names, prediction, skipped


@router.post(
    "/{job_id}/predict",
    response_model=PredictionsPublic,
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                            }
                        },
                    }
                }
            },
            "required": True,
        }
    },
)
async def predict(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: ObjectStoreDep,
    owner: OwnerDep,
    job_id: str,
    num_clusters: int | None = Query(
        None, description="C of the head to use; default the job's K."
    ),
    merge_to: int | None = Query(
        None, description="Merge the C clusters down to this many (the most confused first)."
    ),
) -> PredictionsPublic:
    """Assign uploaded images (multipart: one or more `file` parts, each an image or a zip of
    images) to the job's clusters with its stored model: cluster, confidence, distance and an
    outlier flag per image. Nothing is stored; the job is not changed."""
    predictor = _job_predictor(session, owner, store, settings, job_id)
    c = _cluster_count(predictor, job_id, num_clusters)
    _check_merge(c, merge_to)
    media_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise HTTPException(415, "send the images as multipart/form-data in fields named 'file'")
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise HTTPException(411, "a Content-Length header is required")
    limit = min(MAX_PREDICT_BYTES, settings.MAX_UPLOAD_BYTES)
    if int(length) > limit:
        raise HTTPException(413, f"the request is larger than the limit of {limit} bytes")
    form = await request.form(max_files=MAX_PREDICT_IMAGES, max_fields=16)
    try:
        uploads = [
            part
            for field in _FILE_FIELDS
            for part in form.getlist(field)
            if isinstance(part, UploadFile)
        ]
        if not uploads:
            raise HTTPException(422, "the form has no 'file' field with an image or a zip")
        names, prediction, skipped = await run_in_threadpool(
            _predict, predictor, uploads, c, merge_to, settings
        )
    finally:
        await form.close()
    distance = prediction.distance
    outlier = prediction.outlier
    items = [
        PredictedImage(
            filename=name,
            cluster=int(prediction.assignments[i]),
            confidence=float(prediction.confidence[i]),
            distance=None if distance is None else float(distance[i]),
            outlier=None if outlier is None else bool(outlier[i]),
        )
        for i, name in enumerate(names)
    ]
    logger.info(
        "predicted", extra={"job_id": job_id, "images": len(items), "skipped": len(skipped)}
    )
    return PredictionsPublic(
        job_id=job_id,
        num_clusters=prediction.num_clusters,
        merged_from=prediction.merged_from,
        groups=prediction.groups,
        model={k: v for k, v in predictor.describe().items() if k != "path"},
        outlier_count=0 if outlier is None else int(outlier.sum()),
        items=items,
        skipped=skipped,
    )


@router.get("/{job_id}/merge", response_model=MergePublic, responses=_ERRORS)
def merge(
    session: SessionDep,
    store: ObjectStoreDep,
    settings: SettingsDep,
    owner: OwnerDep,
    job_id: str,
    merge_to: int = Query(..., ge=1, description="How many clusters to merge down to."),
    num_clusters: int | None = Query(None, description="C to merge; default the job's K."),
) -> MergePublic:
    """Merge the job's clustering into C into `merge_to` clusters, joining first the clusters the
    model confuses most between images and their mined neighbours. Maps old to new clusters;
    apply `groups` to /assignments?num_clusters=C to get the merged assignments."""
    predictor = _job_predictor(session, owner, store, settings, job_id)
    c = _cluster_count(predictor, job_id, num_clusters)
    _check_merge(c, merge_to)
    try:
        groups = [int(g) for g in predictor.merge_groups(c, merge_to)]
    except ValueError as error:
        raise HTTPException(409, str(error)) from None
    sizes = dict(
        session.execute(
            select(Cluster.index, Cluster.size)
            .join(ResultSet, ResultSet.id == Cluster.result_set_id)
            .where(ResultSet.job_id == job_id, ResultSet.num_clusters == c)
        ).all()
    )
    clusters = [
        MergedCluster(
            index=k,
            members=[old for old, new in enumerate(groups) if new == k],
            size=sum(sizes.get(old, 0) for old, new in enumerate(groups) if new == k),
        )
        for k in range(merge_to)
    ]
    return MergePublic(
        job_id=job_id, num_clusters=c, merge_to=merge_to, groups=groups, clusters=clusters
    )
