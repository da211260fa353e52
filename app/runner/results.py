"""Storing a finished pipeline run: every result set, its clusters and assignments, the 2-D
map and the job's final fields, in one transaction (a reader never sees half a result).

The objects come first: the map and, through the caller's `publish`, every file of the result
(model, report) are written to the object store inside that transaction, before it commits; a
store that fails there rolls it back, so a job is never marked succeeded with an object missing
(S3 has no rename to make a folder of results appear at once: the row is the switch).
Conditional on the job still running under the caller's lease, and a cancel that arrived
meanwhile wins: then nothing is stored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Assignment, Cluster, Job, JobStatus, ResultSet, utcnow
from app.db.models import Image as ImageRow
from app.maps import save_embedding
from app.runner.claim import elapsed_s
from app.storage import ObjectStore, StorageError

if TYPE_CHECKING:
    from scan_engine.results import PipelineResult

__all__ = ["save_results", "jsonable", "route_report", "ROUTE_REPORT_KEYS"]

logger = logging.getLogger(__name__)


def jsonable(value: Any) -> Any:
    """Plain JSON types from engine output: numpy scalars and arrays become numbers and lists,
    mapping keys become strings (JSON objects have string keys; numpy ints are not accepted)."""
    if isinstance(value, dict):
        return {str(_plain(key)): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    value = _plain(value)
    if isinstance(value, list):
        return [jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN/inf are not JSON
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _plain(value: Any) -> Any:
    # numpy scalars and arrays (and torch tensors) expose tolist(); Paths and the rest -> str.
    if hasattr(value, "tolist") and not isinstance(value, str | int | float | bool):
        return value.tolist()
    return value


# What the job keeps of the engine's report: which route ran, on what, and whether the features
# were computed or came from the dataset's cache. The engine reports the backbone as a section
# (scan_engine.pipeline: "backbone": {name, weights_sha256, image_size, from_cache, ...}).
ROUTE_REPORT_KEYS = (
    "route",
    "backbone",
    "image_size",
    "features_from_cache",
    "weights_sha256",
    "weights_source",
    "feature_shards",
)
_BACKBONE_SECTION_KEYS = {
    "name": "backbone",
    "image_size": "image_size",
    "from_cache": "features_from_cache",
    "weights_sha256": "weights_sha256",
    "weights_source": "weights_source",
}


def route_report(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ROUTE_REPORT_KEYS of the engine's report, the backbone section flattened into them;
    None when it holds none of them (an older engine)."""
    if not isinstance(report, dict):
        return None
    found: dict[str, Any] = {}
    if isinstance(report.get("route"), str):
        found["route"] = report["route"]
    section = report.get("backbone")
    if isinstance(section, dict):
        found.update(
            {ours: section[key] for key, ours in _BACKBONE_SECTION_KEYS.items() if key in section}
        )
    shards = report.get("feature_shards")  # app.runner.shards: this job embedded them, sharded
    if isinstance(shards, dict):
        found["feature_shards"] = shards
        found["features_from_cache"] = False  # read from the entry its own shards made
    return jsonable(found) if found else None


def save_results(
    factory: sessionmaker[Session],
    job_id: str,
    ids: list[str],
    result: PipelineResult,
    store: ObjectStore,
    holder: str | None = None,
    publish: Callable[[str | None], str | None] | None = None,
) -> str:
    """Store every result set, its clusters and assignments, and mark the job: ONE transaction.

    `ids[i]` is the image id of row i of the engine's arrays (the collection's ids). The job
    must be running (and, `holder` given, under that lease: a worker whose lease was taken over
    stores nothing); a cancel that arrived meanwhile wins and nothing is stored.
    `publish(result.model_path)` writes the run's files to the store and returns the model
    file's key (app.runner.job_files.JobFiles.publish); without it a result with a model file
    is refused, since only a key may be stored.
    """
    if result.model_path and publish is None:
        raise ValueError("a result with a model file needs `publish` to store it by key")
    with factory() as session, session.begin():
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.status != JobStatus.RUNNING:
            return job.status if job is not None else JobStatus.CANCELLED
        if holder is not None and job.lease_owner != holder:
            logger.warning("lease lost before the results were stored", extra={"job_id": job_id})
            return job.status
        now = utcnow()
        if job.cancel_requested:
            job.status, job.finished_at = JobStatus.CANCELLED, now
            job.duration_s = elapsed_s(job.started_at, now)
            return job.status
        position: dict[str, int] = {
            image_id: pos
            for image_id, pos in session.execute(
                select(ImageRow.id, ImageRow.position).where(ImageRow.dataset_id == job.dataset_id)
            )
        }
        missing = [image_id for image_id in ids if image_id not in position]
        if missing or len(set(ids)) != len(position):
            raise RuntimeError(
                f"results cover {len(set(ids))} images but the dataset has {len(position)}"
            )
        session.execute(delete(ResultSet).where(ResultSet.job_id == job_id))
        for clustering in result.results:
            result_set = ResultSet(
                job_id=job_id,
                num_clusters=int(clustering.num_clusters),
                head=int(clustering.head),
                stage=str(clustering.stage),
                metrics=jsonable(clustering.metrics) if clustering.metrics is not None else None,
            )
            session.add(result_set)
            session.flush()  # the id the clusters and assignments point at
            if clustering.clusters:
                session.execute(
                    insert(Cluster),
                    [
                        {
                            "result_set_id": result_set.id,
                            "index": int(summary.index),
                            "size": int(summary.size),
                            "mean_confidence": float(summary.mean_confidence),
                            "prototype_image_id": (
                                None if summary.prototype is None else ids[summary.prototype]
                            ),
                            "top_members": [ids[i] for i in summary.top_members],
                        }
                        for summary in clustering.clusters
                    ],
                )
            clusters = clustering.assignments.tolist()  # (N,) int64 -> list[int]
            confidence = clustering.confidence.tolist()  # (N,) float32 -> list[float]
            session.execute(
                insert(Assignment),  # one executemany: 50k images are not 50k round trips
                [
                    {
                        "result_set_id": result_set.id,
                        "image_id": image_id,
                        "position": position[image_id],
                        "cluster": int(cluster),
                        "confidence": float(conf),
                    }
                    for image_id, cluster, conf in zip(ids, clusters, confidence, strict=True)
                ],
            )
        embedding = getattr(result, "embedding_2d", None)  # (N, 2) float32, engine row order
        if embedding is not None:
            try:  # the gallery's map is a nicety: a failure to write it fails nothing
                save_embedding(store, job_id, embedding, [position[i] for i in ids])
            except (OSError, ValueError, StorageError):
                logger.warning(
                    "could not store the 2-D map", extra={"job_id": job_id}, exc_info=True
                )
        job.status, job.finished_at = JobStatus.SUCCEEDED, now
        job.lease_expires_at = None
        job.duration_s = elapsed_s(job.started_at, now)
        job.progress, job.eta_s, job.stage = 1.0, 0.0, "finalize"
        job.timings = jsonable(result.timings)
        job.metrics = jsonable(result.metrics) if result.metrics else None
        job.notes = [str(note) for note in result.notes]
        job.run_report = route_report(getattr(result, "report", None))
        job.message = None
        k_selection = getattr(result, "k_selection", None)
        if k_selection is not None:  # K chosen by the pipeline: the job's K from now on
            job.num_clusters = int(k_selection["chosen"])
            job.cluster_counts = [int(r.num_clusters) for r in result.results]
            job.config = {**job.config, "num_clusters": job.num_clusters}
        if publish is not None:  # last: every object is written before the commit
            job.model_path = publish(result.model_path or None)
        return job.status
