"""Run one clustering job: the single job function both the embedded worker and Celery call.

`run_job(job_id)` takes the job's lease (app.leases: queued, or running on an expired lease ->
running, with one atomic conditional UPDATE), loads its stored images with
scan_engine.data.load_files, builds the config with make_config, runs scan_engine.pipeline.run
in DATA_DIR/jobs/<id>/work (a rerun resumes from the checkpoints there), and stores all result
sets, clusters and assignments in one transaction. A heartbeat thread renews the lease; every
write is conditional on still holding it. Idempotent: a finished job is left alone and a job
running under another worker's live lease is not touched, so a redelivered task is harmless.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings, get_settings
from app.db.models import Assignment, Cluster, Dataset, Job, JobStatus, ResultSet, utcnow
from app.db.models import Image as ImageRow
from app.db.session import get_sessionmaker
from app.leases import Heartbeat, lease_is_free, lease_unchanged_clause, new_holder
from app.maps import save_embedding
from app.storage import Storage
from scan_engine.results import ProgressEvent, StopRequested

if TYPE_CHECKING:
    from scan_engine.results import PipelineResult

__all__ = ["run_job", "save_results", "ProgressWriter", "StopFlag", "jsonable"]

logger = logging.getLogger(__name__)

_MAX_ERROR_CHARS = 10_000


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


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _duration(started: datetime | None, finished: datetime) -> float | None:
    started = _aware(started)
    return None if started is None else max(0.0, (finished - started).total_seconds())


class ProgressWriter:
    """Pipeline progress callback: writes stage, progress, ETA and live stage timings to the job.

    Throttled to one write per `interval_s`, except that a stage change is always written.
    A failed write is logged and ignored: a DB hiccup must not kill a long job.
    """

    def __init__(
        self,
        job_id: str,
        factory: sessionmaker[Session],
        interval_s: float,
        holder: str | None = None,
    ) -> None:
        self.job_id = job_id
        self.factory = factory
        self.interval_s = interval_s
        self.holder = holder  # when set, only written while this lease holder has the job
        self.stage: str | None = None
        self.timings: dict[str, float] = {}
        self._stage_started = time.monotonic()
        self._last_write = float("-inf")

    def __call__(self, event: ProgressEvent) -> None:
        now = time.monotonic()
        stage_changed = event.stage != self.stage
        if stage_changed:
            if self.stage is not None:
                self.timings[self.stage] = round(now - self._stage_started, 3)
            self.stage, self._stage_started = event.stage, now
        elif now - self._last_write < self.interval_s:
            return
        self._last_write = now
        values: dict[str, Any] = {
            "stage": event.stage,
            "progress": min(1.0, max(0.0, float(event.fraction))),
            "eta_s": None if event.eta_s is None else max(0.0, float(event.eta_s)),
            "message": event.message or None,
        }
        if stage_changed:
            values["timings"] = dict(self.timings)
        where = [Job.id == self.job_id, Job.status == JobStatus.RUNNING]
        if self.holder is not None:
            where.append(Job.lease_owner == self.holder)
        try:
            with self.factory() as session, session.begin():
                session.execute(update(Job).where(*where).values(**values))
        except Exception:
            logger.warning("progress write failed", extra={"job_id": self.job_id}, exc_info=True)


class StopFlag:
    """Pipeline should_stop callback: true once the job is cancelled (read from the DB at most
    every `interval_s`), the process is shutting down (`shutdown` event, embedded mode) or the
    job's lease is lost (`lease_lost` event, set by the heartbeat)."""

    def __init__(
        self,
        job_id: str,
        factory: sessionmaker[Session],
        interval_s: float,
        shutdown: threading.Event | None = None,
        lease_lost: threading.Event | None = None,
    ) -> None:
        self.job_id = job_id
        self.factory = factory
        self.interval_s = interval_s
        self.shutdown = shutdown
        self.lease_lost = lease_lost
        self.cancelled = False
        self._last_check = float("-inf")

    def __call__(self) -> bool:
        if self.cancelled or (self.shutdown is not None and self.shutdown.is_set()):
            return True
        if self.lease_lost is not None and self.lease_lost.is_set():
            return True
        now = time.monotonic()
        if now - self._last_check < self.interval_s:
            return False
        self._last_check = now
        try:
            with self.factory() as session:
                row = session.execute(
                    select(Job.cancel_requested, Job.status).where(Job.id == self.job_id)
                ).one_or_none()
        except Exception:
            logger.warning("cancel check failed", extra={"job_id": self.job_id}, exc_info=True)
            return False
        self.cancelled = row is None or bool(row.cancel_requested) or row.status != "running"
        return self.cancelled


@dataclass
class _ClaimedJob:
    job_id: str
    preset: str
    num_clusters: int
    overcluster: float | list[int] | None
    overrides: dict[str, Any]
    image_ids: list[str]
    stored_paths: list[str]
    labels: list[int] | None
    class_names: list[str] | None
    work_dir: str


def _claim(
    job_id: str, factory: sessionmaker[Session], settings: Settings, holder: str
) -> _ClaimedJob | None:
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
            "duration_s": _duration(seen.started_at, now),
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
        return _ClaimedJob(
            job_id=job_id,
            preset=job.preset,
            num_clusters=job.num_clusters,
            overcluster=job.overcluster,
            overrides=dict(job.overrides or {}),
            image_ids=[row.id for row in rows],
            stored_paths=[row.stored_path for row in rows],
            labels=labels,
            class_names=dataset.class_names if (dataset and labels is not None) else None,
            work_dir=Storage.job_work_dir(job_id),
        )


def _finish(
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
        job.duration_s = _duration(job.started_at, now)
        job.eta_s = None
        job.lease_expires_at = None
        if error is not None:
            job.error = error[:_MAX_ERROR_CHARS]


def _requeue_after_shutdown(
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


def save_results(
    factory: sessionmaker[Session],
    job_id: str,
    ids: list[str],
    result: PipelineResult,
    storage: Storage,
    holder: str | None = None,
) -> str:
    """Store every result set, its clusters and assignments, and mark the job: ONE transaction.

    `ids[i]` is the image id of row i of the engine's arrays (the collection's ids). The job
    must be running (and, `holder` given, under that lease: a worker whose lease was taken over
    stores nothing); a cancel that arrived meanwhile wins and nothing is stored.
    """
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
            job.duration_s = _duration(job.started_at, now)
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
                save_embedding(storage, job_id, embedding, [position[i] for i in ids])
            except (OSError, ValueError):
                logger.warning(
                    "could not store the 2-D map", extra={"job_id": job_id}, exc_info=True
                )
        job.status, job.finished_at = JobStatus.SUCCEEDED, now
        job.lease_expires_at = None
        job.duration_s = _duration(job.started_at, now)
        job.progress, job.eta_s, job.stage = 1.0, 0.0, "finalize"
        job.timings = jsonable(result.timings)
        job.metrics = jsonable(result.metrics) if result.metrics else None
        job.notes = [str(note) for note in result.notes]
        job.message = None
        k_selection = getattr(result, "k_selection", None)
        if k_selection is not None:  # K chosen by the pipeline: the job's K from now on
            job.num_clusters = int(k_selection["chosen"])
            job.cluster_counts = [int(r.num_clusters) for r in result.results]
            job.config = {**job.config, "num_clusters": job.num_clusters}
        if result.model_path:
            try:
                job.model_path = storage.relpath(Path(result.model_path))
            except ValueError:
                job.model_path = str(result.model_path)
        return job.status


def _execute(
    claimed: _ClaimedJob,
    factory: sessionmaker[Session],
    settings: Settings,
    storage: Storage,
    stop: StopFlag,
    holder: str | None = None,
) -> str:
    # Imported here: the engine (and torch) load only in processes that run jobs.
    from scan_engine.config import make_config
    from scan_engine.data import load_files

    config = make_config(
        claimed.preset,
        num_clusters=claimed.num_clusters,
        overcluster=claimed.overcluster,
        **claimed.overrides,
    )
    entries = [
        (image_id, storage.abspath(path))
        for image_id, path in zip(claimed.image_ids, claimed.stored_paths, strict=True)
    ]
    collection = load_files(
        entries,
        image_size=config.image_size,
        labels=claimed.labels,
        class_names=claimed.class_names,
    )
    if collection.skipped:
        first = collection.skipped[0]
        raise RuntimeError(
            f"{len(collection.skipped)} stored images could not be read "
            f"(first: {first.path}: {first.reason})"
        )
    from scan_engine import pipeline  # type: ignore[attr-defined,unused-ignore]

    work_dir = storage.abspath(claimed.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    writer = ProgressWriter(claimed.job_id, factory, settings.PROGRESS_INTERVAL_S, holder)
    result = pipeline.run(
        collection,
        config,
        work_dir,
        progress=writer,
        should_stop=stop,
        device=settings.JOB_DEVICE or None,
    )
    return save_results(factory, claimed.job_id, list(collection.ids), result, storage, holder)


def run_job(job_id: str, *, shutdown: threading.Event | None = None) -> str | None:
    """Run job `job_id` to the end; its final status (None when the job does not exist).

    StopRequested from a cancel -> "cancelled"; from `shutdown` (embedded worker stopping) ->
    back to "queued" to resume later; from a lost lease -> the job is left to the worker that
    holds it now; any other exception -> "failed" with the error text. A job this call cannot
    take (finished, or running under another worker's live lease) is left as it is and its
    status returned.
    """
    settings = get_settings()
    storage = Storage(settings.DATA_DIR)
    factory = get_sessionmaker()
    holder = new_holder()
    claimed = _claim(job_id, factory, settings, holder)
    if claimed is None:
        with factory() as session:
            return session.scalar(select(Job.status).where(Job.id == job_id))
    logger.info("job started", extra={"job_id": job_id, "holder": holder})
    heartbeat = Heartbeat(
        factory, job_id, holder, settings.JOB_LEASE_S, settings.JOB_HEARTBEAT_S
    ).start()
    stop = StopFlag(
        job_id, factory, settings.CANCEL_CHECK_INTERVAL_S, shutdown, lease_lost=heartbeat.lost
    )
    try:
        status = _execute(claimed, factory, settings, storage, stop, holder)
    except StopRequested:
        if heartbeat.lost.is_set():
            logger.warning("job lease lost; left to its new holder", extra={"job_id": job_id})
            with factory() as session:
                return session.scalar(select(Job.status).where(Job.id == job_id))
        if shutdown is not None and shutdown.is_set() and not stop.cancelled:
            _requeue_after_shutdown(factory, job_id, holder)
            logger.info("job interrupted by shutdown", extra={"job_id": job_id})
            return JobStatus.QUEUED
        _finish(factory, job_id, JobStatus.CANCELLED, holder=holder)
        logger.info("job cancelled", extra={"job_id": job_id})
        return JobStatus.CANCELLED
    except Exception as error:
        logger.exception("job failed", extra={"job_id": job_id})
        _finish(factory, job_id, JobStatus.FAILED, f"{type(error).__name__}: {error}", holder)
        return JobStatus.FAILED
    finally:
        heartbeat.stop()
    logger.info("job finished", extra={"job_id": job_id, "status": status})
    return status
