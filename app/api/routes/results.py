"""/api/v1/jobs/{id}/...: a succeeded job's results: assignments (JSON pages or CSV), clusters
and their prototype images. One result set per C (K and each overclustering): `num_clusters`
picks it, default K."""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Response
from fastapi.responses import StreamingResponse

from app import crud
from app.api.deps import ObjectStoreDep, OwnerDep, SessionDep, SettingsDep
from app.api.images import image_response
from app.api.owned import get_owned_result_set
from app.db.models import Image as ImageRow
from app.schemas import AssignmentsPublic, ClusterPublic, ClustersPublic, Message

__all__ = ["router"]

router = APIRouter(prefix="/jobs", tags=["jobs"])
logger = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Message} for code in (401, 404, 409, 422, 429, 503)
}


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
    result_set = get_owned_result_set(session, owner, job_id, num_clusters)
    wants_csv = output_format == "csv" or (
        output_format is None and accept is not None and "text/csv" in accept
    )
    if wants_csv:
        filename = f"job-{job_id}-C{result_set.num_clusters}.csv"
        return StreamingResponse(
            crud.assignments_csv(settings.DATABASE_URL, result_set.id),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
    return crud.assignment_page(session, job_id, result_set, cluster, offset, limit)


@router.get("/{job_id}/clusters", response_model=ClustersPublic, responses=_ERRORS)
def get_clusters(
    session: SessionDep,
    owner: OwnerDep,
    job_id: str,
    num_clusters: int | None = Query(None, description="C of the result set; default K."),
) -> ClustersPublic:
    """Per cluster: size, mean confidence, prototype image id and the top members' ids."""
    result_set = get_owned_result_set(session, owner, job_id, num_clusters)
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
            for c in crud.clusters_of(session, result_set.id)
        ],
    )


@router.get(
    "/{job_id}/clusters/{cluster_index}/prototype",
    response_class=Response,
    responses={**_ERRORS, 200: {"content": {"image/png": {}, "image/jpeg": {}}}},
)
def get_prototype(
    session: SessionDep,
    store: ObjectStoreDep,
    settings: SettingsDep,
    owner: OwnerDep,
    job_id: str,
    cluster_index: int,
    num_clusters: int | None = Query(None, description="C of the result set; default K."),
    thumbnail: bool = Query(False),
) -> Response:
    """The prototype image of a cluster (PNG or JPEG bytes)."""
    result_set = get_owned_result_set(session, owner, job_id, num_clusters)
    cluster = crud.get_cluster(session, result_set.id, cluster_index)
    if cluster is None:
        raise HTTPException(404, f"cluster {cluster_index} not found (C={result_set.num_clusters})")
    if cluster.prototype_image_id is None:
        raise HTTPException(404, f"cluster {cluster_index} is empty; it has no prototype")
    row = session.get(ImageRow, cluster.prototype_image_id)
    if row is None:
        raise HTTPException(404, f"the prototype image of cluster {cluster_index} is gone")
    return image_response(
        row, store, settings.PRESIGNED_URL_EXPIRES_S, thumbnail=thumbnail, png_or_jpeg=True
    )
