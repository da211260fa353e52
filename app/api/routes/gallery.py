"""/api/v1/jobs/{id}/...: the two reads the gallery needs that the results API
(app.api.routes.results) lacks.

- a cluster's members, most confident first, one page at a time (the assignments endpoint pages
  in image order);
- the 2-D map of the collection: a sample of the job's (N, 2) feature projection, with cluster,
  confidence and image id per point, read from the file app.maps describes.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Query

from app import crud
from app.api.deps import ObjectStoreDep, OwnerDep, SessionDep
from app.api.owned import get_owned_result_set
from app.maps import load_embedding
from app.schemas import AssignmentsPublic, MapPublic, Message

__all__ = ["router"]

router = APIRouter(prefix="/jobs", tags=["gallery"])
logger = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Message} for code in (404, 409)}
# Bound parameters of one IN list stay far below SQLite's limit (32,766); a denser map adds nothing.
MAP_MAX_POINTS = 20_000


@router.get(
    "/{job_id}/clusters/{cluster_index}/members",
    response_model=AssignmentsPublic,
    responses=_ERRORS,
)
def get_cluster_members(
    session: SessionDep,
    owner: OwnerDep,
    job_id: str,
    cluster_index: int,
    num_clusters: int | None = Query(None, description="C of the result set; default K."),
    offset: int = Query(0, ge=0),
    limit: int = Query(60, ge=1, le=1000),
) -> AssignmentsPublic:
    """The images of one cluster, most confident first (ties in image order), one page."""
    result_set = get_owned_result_set(session, owner, job_id, num_clusters)
    if not 0 <= cluster_index < result_set.num_clusters:
        raise HTTPException(404, f"cluster {cluster_index} not found (C={result_set.num_clusters})")
    return crud.assignment_page(
        session, job_id, result_set, cluster_index, offset, limit, most_confident_first=True
    )


@router.get("/{job_id}/map", response_model=MapPublic, responses=_ERRORS)
def get_map(
    session: SessionDep,
    store: ObjectStoreDep,
    owner: OwnerDep,
    job_id: str,
    num_clusters: int | None = Query(None, description="C of the result set; default K."),
    limit: int = Query(5000, ge=1, le=MAP_MAX_POINTS, description="At most this many points."),
) -> MapPublic:
    """A uniform sample (the same on every request) of the 2-D projection of the final features."""
    result_set = get_owned_result_set(session, owner, job_id, num_clusters)
    embedding = load_embedding(store, job_id)  # (N, 2) float32, row p = image at position p
    if embedding is None:
        raise HTTPException(404, f"job {job_id} has no stored 2-D map")
    total = crud.assignment_count(session, result_set.id)
    if embedding.ndim != 2 or embedding.shape != (total, 2):
        logger.warning(
            "map does not match the assignments",
            extra={"job_id": job_id, "shape": list(embedding.shape), "rows": total},
        )
        raise HTTPException(404, f"the stored map of job {job_id} does not match its images")
    picked: list[int] | None = None
    if total > limit:
        # A fixed seed: the picture must not shimmer between reloads. Only the sampled rows are
        # read (positions are 0..N-1), so a 50,000-image job costs a 5,000-row query.
        picked = np.sort(np.random.default_rng(0).choice(total, size=limit, replace=False)).tolist()
    rows = crud.assignment_points(session, result_set.id, picked)
    positions = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))  # (M,)
    if len(rows) and positions[-1] >= total:
        raise HTTPException(404, f"the stored map of job {job_id} does not match its images")
    points = np.nan_to_num(embedding[positions].astype(np.float64)).round(4)  # (M, 2)
    return MapPublic(
        job_id=job_id,
        num_clusters=result_set.num_clusters,
        total=total,
        x=points[:, 0].tolist(),
        y=points[:, 1].tolist(),
        cluster=[row[2] for row in rows],
        confidence=[round(row[3], 4) for row in rows],
        image_id=[row[1] for row in rows],
    )
