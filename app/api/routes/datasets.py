"""/api/v1/datasets: zip upload, listing, dataset details, its images and their files, deletion."""

from __future__ import annotations

import logging
from pathlib import PurePosixPath
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select

from app import crud
from app.api.deps import ObjectStoreDep, OwnerDep, SessionDep, SettingsDep, StorageDep
from app.api.images import image_response
from app.api.owned import get_owned_dataset, valid_id
from app.backbones import FEATURES_DIR
from app.db.models import Dataset
from app.db.models import Image as ImageRow
from app.db.session import get_sessionmaker
from app.schemas import DatasetPublic, DatasetsPublic, ImagePublic, ImagesPublic, Message
from app.storage import remove_prefixes
from app.uploads import (
    UploadError,
    check_storage_room,
    ingest_zip,
    parse_bool,
    printable,
    receive_multipart,
)

router = APIRouter(prefix="/datasets", tags=["datasets"])
logger = logging.getLogger(__name__)

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "A zip."},
                        "name": {"type": "string", "description": "Default: the zip's name."},
                        "labels_from_folders": {
                            "type": "boolean",
                            "default": False,
                            "description": "Top-level folders are ground-truth classes "
                            "(jobs then report ACC/NMI/ARI).",
                        },
                    },
                }
            }
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Message} for code in (400, 401, 404, 413, 415, 422, 503)
}


@router.post(
    "",
    status_code=201,
    response_model=DatasetPublic,
    openapi_extra=_UPLOAD_BODY,
    responses={**_ERRORS, 200: {"model": DatasetPublic, "description": "Already uploaded."}},
    summary="Upload a zip of images",
)
async def upload_dataset(
    request: Request,
    response: Response,
    settings: SettingsDep,
    storage: StorageDep,
    store: ObjectStoreDep,
    owner: OwnerDep,
) -> DatasetPublic:
    """Stream the zip to disk, extract the usable images, record them; report what was skipped.

    The body is parsed by hand (not UploadFile) so the size limit applies while receiving.
    The same zip uploaded again by the same owner (same bytes, same labels flag) is not stored
    twice: 200 with the dataset made the first time (201 when a new dataset was made).
    """
    factory = get_sessionmaker(settings.DATABASE_URL)
    try:  # an owner whose storage is full is refused before the body is read
        await run_in_threadpool(check_storage_room, factory, owner.id, settings)
        with storage.locked_temp_dir("upload") as work:  # removed after, whatever happens
            received = await receive_multipart(
                request.headers.get("content-type"),
                request.headers.get("content-length"),
                request.stream(),
                work / "upload.zip",
                settings.MAX_UPLOAD_BYTES,
            )
            labels = parse_bool(received.fields.get("labels_from_folders"), "labels_from_folders")
            name = received.fields.get("name", "").strip()
            if not name and received.filename:
                name = PurePosixPath(received.filename.replace("\\", "/")).stem
            ingested = await run_in_threadpool(
                ingest_zip,
                received.zip_path,
                work,
                name=printable(name, 255).strip() or "dataset",
                labels_from_folders=labels,
                settings=settings,
                store=store,
                session_factory=factory,
                owner_id=owner.id,
                content_sha256=received.sha256,
            )
    except UploadError as error:
        logger.info("upload refused: %s", error.message)
        raise HTTPException(error.status_code, error.message) from None
    if not ingested.created:
        response.status_code = 200
    response.headers["Location"] = f"/api/v1/datasets/{ingested.dataset_id}"
    with factory() as session:
        return DatasetPublic.model_validate(get_owned_dataset(session, owner, ingested.dataset_id))


@router.get("", response_model=DatasetsPublic, responses={401: {"model": Message}})
def list_datasets(
    session: SessionDep,
    owner: OwnerDep,
    offset: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=1000),
) -> DatasetsPublic:
    mine = Dataset.owner_id == owner.id
    total = session.scalar(select(func.count()).select_from(Dataset).where(mine)) or 0
    rows = session.scalars(
        select(Dataset)
        .where(mine)
        .order_by(Dataset.created_at.desc(), Dataset.id)
        .offset(offset)
        .limit(limit)
    )
    return DatasetsPublic(items=[DatasetPublic.model_validate(d) for d in rows], total=total)


@router.get("/{dataset_id}", response_model=DatasetPublic, responses=_ERRORS)
def get_dataset(session: SessionDep, owner: OwnerDep, dataset_id: str) -> DatasetPublic:
    return DatasetPublic.model_validate(get_owned_dataset(session, owner, dataset_id))


@router.delete("/{dataset_id}", status_code=204, responses={**_ERRORS, 409: {"model": Message}})
def delete_dataset(
    session: SessionDep,
    owner: OwnerDep,
    store: ObjectStoreDep,
    storage: StorageDep,
    dataset_id: str,
) -> Response:
    """Delete the dataset with its images, its jobs and their results, and its cached
    features. 409 while one of its jobs is queued or running (cancel it first)."""
    dataset = get_owned_dataset(session, owner, dataset_id)
    folder = dataset.storage_path
    try:
        job_ids = crud.delete_dataset(session, dataset.id)
    except crud.DatasetInUse as busy:
        raise HTTPException(
            409,
            f"dataset {dataset_id} has {busy.active} queued or running jobs; cancel them or "
            "wait for them to finish, then delete it",
        ) from None
    # Objects after the commit: a failed removal leaves stray objects (logged), never rows that
    # point at missing objects.
    prefixes = [f"{folder}/", f"{FEATURES_DIR}/{dataset.id}/"]
    remove_prefixes(store, prefixes + [f"jobs/{job_id}/" for job_id in job_ids])
    for job_id in job_ids:  # this host's copies of their models for prediction (S3)
        storage.remove(storage.model_copy_dir(job_id))
    logger.info("dataset deleted", extra={"dataset_id": dataset_id, "jobs": len(job_ids)})
    return Response(status_code=204)


@router.get("/{dataset_id}/images", response_model=ImagesPublic, responses=_ERRORS)
def list_images(
    session: SessionDep,
    owner: OwnerDep,
    dataset_id: str,
    offset: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=1000),
) -> ImagesPublic:
    dataset = get_owned_dataset(session, owner, dataset_id)
    rows = session.scalars(
        select(ImageRow)
        .where(ImageRow.dataset_id == dataset_id)
        .order_by(ImageRow.position)
        .offset(offset)
        .limit(limit)
    )
    items = [
        ImagePublic(
            id=row.id,
            position=row.position,
            filename=row.original_path,
            media_type=row.media_type,
            size_bytes=row.size_bytes,
            sha256=row.sha256,
            width=row.width,
            height=row.height,
            label=row.label,
        )
        for row in rows
    ]
    return ImagesPublic(
        dataset_id=dataset_id, items=items, total=dataset.image_count, offset=offset, limit=limit
    )


@router.get(
    "/{dataset_id}/images/{image_id}",
    response_class=Response,
    responses={200: {"content": {"image/*": {}}}, 404: {"model": Message}},
)
def get_image(
    session: SessionDep,
    store: ObjectStoreDep,
    settings: SettingsDep,
    owner: OwnerDep,
    dataset_id: str,
    image_id: str,
    thumbnail: bool = Query(False, description="The JPEG thumbnail made at upload."),
) -> Response:
    """The original image file as uploaded, or its square thumbnail (on S3: a 307 redirect to
    a short-lived presigned URL of it)."""
    get_owned_dataset(session, owner, dataset_id)
    row = session.get(ImageRow, image_id) if valid_id(image_id) else None
    if row is None or row.dataset_id != dataset_id:
        raise HTTPException(404, f"image {image_id} not found in dataset {dataset_id}")
    return image_response(row, store, settings.PRESIGNED_URL_EXPIRES_S, thumbnail=thumbnail)
