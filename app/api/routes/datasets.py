"""/api/v1/datasets: zip upload, listing, dataset details, its images and their files."""

from __future__ import annotations

import logging
from pathlib import PurePosixPath
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select

from app.api.deps import SessionDep, SettingsDep, StorageDep
from app.api.images import image_response
from app.db.models import Dataset
from app.db.models import Image as ImageRow
from app.db.session import get_sessionmaker
from app.schemas import DatasetPublic, DatasetsPublic, ImagePublic, ImagesPublic, Message
from app.uploads import UploadError, ingest_zip, parse_bool, receive_multipart, remove_quietly

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
    code: {"model": Message} for code in (400, 404, 413, 415, 422)
}


def _get_dataset(session: SessionDep, dataset_id: str) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise HTTPException(404, f"dataset {dataset_id} not found")
    return dataset


@router.post(
    "",
    status_code=201,
    response_model=DatasetPublic,
    openapi_extra=_UPLOAD_BODY,
    responses=_ERRORS,
    summary="Upload a zip of images",
)
async def upload_dataset(
    request: Request, settings: SettingsDep, storage: StorageDep
) -> DatasetPublic:
    """Stream the zip to disk, extract the usable images, record them; report what was skipped.

    The body is parsed by hand (not UploadFile) so the size limit applies while receiving.
    """
    work = storage.make_temp_dir("upload")
    try:
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
        dataset_id = await run_in_threadpool(
            ingest_zip,
            received.zip_path,
            work,
            name=name or "dataset",
            labels_from_folders=labels,
            settings=settings,
            storage=storage,
            session_factory=get_sessionmaker(settings.DATABASE_URL),
        )
    except UploadError as error:
        logger.info("upload refused: %s", error.message)
        raise HTTPException(error.status_code, error.message) from None
    finally:
        remove_quietly(work)  # gone already when the upload succeeded
    with get_sessionmaker(settings.DATABASE_URL)() as session:
        return DatasetPublic.model_validate(_get_dataset(session, dataset_id))


@router.get("", response_model=DatasetsPublic)
def list_datasets(
    session: SessionDep,
    offset: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=1000),
) -> DatasetsPublic:
    total = session.scalar(select(func.count()).select_from(Dataset)) or 0
    rows = session.scalars(
        select(Dataset).order_by(Dataset.created_at.desc(), Dataset.id).offset(offset).limit(limit)
    )
    return DatasetsPublic(items=[DatasetPublic.model_validate(d) for d in rows], total=total)


@router.get("/{dataset_id}", response_model=DatasetPublic, responses=_ERRORS)
def get_dataset(session: SessionDep, dataset_id: str) -> DatasetPublic:
    return DatasetPublic.model_validate(_get_dataset(session, dataset_id))


@router.get("/{dataset_id}/images", response_model=ImagesPublic, responses=_ERRORS)
def list_images(
    session: SessionDep,
    dataset_id: str,
    offset: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=1000),
) -> ImagesPublic:
    dataset = _get_dataset(session, dataset_id)
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
    storage: StorageDep,
    dataset_id: str,
    image_id: str,
    thumbnail: bool = Query(False, description="The JPEG thumbnail made at upload."),
) -> Response:
    """The original image file as uploaded, or its square thumbnail."""
    row = session.get(ImageRow, image_id)
    if row is None or row.dataset_id != dataset_id:
        raise HTTPException(404, f"image {image_id} not found in dataset {dataset_id}")
    return image_response(row, storage, thumbnail=thumbnail)
