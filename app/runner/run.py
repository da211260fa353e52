"""Run one clustering job: the single job function the embedded worker and the Celery task call.

`run_job(job_id)` claims the job (app.runner.claim: takes its lease, reads its images' keys),
builds the config with make_config, gets the job's files ready (app.runner.job_files: on the
local store the folders are the store; on S3 a scratch folder with the checkpoints and feature
cache fetched from the store, and the images: all for the scratch route, only those read on
the pretrained route), loads the images (the scratch route: all of them as
pixels, scan_engine.data.load_files; the pretrained route: a list of files, scan_engine.sources,
that the engine streams through the backbone, its features cached per dataset), runs
scan_engine.pipeline.run in the job's work folder (a rerun resumes from the checkpoints there)
with the callbacks of app.runner.engine_callbacks, and stores the results (app.runner.results:
every object written before the job is marked succeeded). On the Celery route a big dataset's
features may first be embedded in shards by several workers (app.runner.shards,
EMBED_SHARD_IMAGES); the features stage then finds them cached. A heartbeat thread renews the
lease; every write is conditional on still holding it. Idempotent: a finished job is left
alone and a job running under another worker's live lease is not touched, so a redelivered task
is harmless.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.backbones import feature_cache_dir
from app.core.config import Settings, get_settings
from app.db.models import Job, JobStatus
from app.db.session import get_sessionmaker
from app.runner.claim import ClaimedJob, claim_job, finish_job, requeue_after_shutdown
from app.runner.engine_callbacks import ProgressWriter, StopFlag
from app.runner.job_files import JobFiles
from app.runner.leases import Heartbeat, new_holder
from app.runner.results import save_results
from app.runner.shards import ShardDispatcher, ShardedEmbedding, embed_in_shards
from app.storage import StorageUnavailable, object_store
from scan_engine.results import StopRequested

if TYPE_CHECKING:
    from scan_engine.config import ScanConfig

__all__ = ["run_job", "job_config"]

logger = logging.getLogger(__name__)


def job_config(
    claimed: ClaimedJob, settings: Settings, features_dir: Path | None = None
) -> ScanConfig:
    """The claimed job's engine config: as stored, plus this machine's folders on the
    pretrained route (MODELS_DIR; the dataset's feature cache, shared by all its jobs:
    `features_dir`, by default the one under DATA_DIR)."""
    from scan_engine.config import make_config

    route: dict[str, Any] = {}
    if claimed.backbone is not None:
        cache = features_dir or feature_cache_dir(settings, claimed.dataset_id)
        route = {
            "pretrained_backbone": claimed.backbone,
            "models_dir": str(settings.MODELS_DIR),
            "feature_cache_dir": str(cache),
        }
    return make_config(
        claimed.preset,
        num_clusters=claimed.num_clusters,
        overcluster=claimed.overcluster,
        **claimed.overrides,
        **route,
    )


def _collection(claimed: ClaimedJob, config: ScanConfig, files: JobFiles) -> Any:
    """The pretrained route: ImageSources (files listed, decoded while streaming); the scratch
    route: an ImageCollection of every image as pixels at the config's size."""
    from scan_engine.data import load_files

    if config.pretrained_backbone is not None:
        return files.image_sources(
            claimed.image_ids,
            claimed.stored_paths,
            labels=claimed.labels,
            class_names=claimed.class_names,
        )
    paths = files.image_paths(claimed.stored_paths)
    entries = list(zip(claimed.image_ids, paths, strict=True))
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
    return collection


def _run_pipeline(
    claimed: ClaimedJob,
    factory: sessionmaker[Session],
    settings: Settings,
    files: JobFiles,
    stop: StopFlag,
    holder: str | None = None,
    shard_dispatcher: ShardDispatcher | None = None,
) -> str:
    """Load the claimed job's images, run the engine pipeline, store the results; the status."""
    # Imported here: the engine (and torch) load only in processes that run jobs.
    from scan_engine import pipeline  # type: ignore[attr-defined,unused-ignore]

    config = job_config(claimed, settings, files.feature_cache_dir)
    files.prepare()
    collection = _collection(claimed, config, files)
    writer = ProgressWriter(claimed.job_id, factory, settings.PROGRESS_INTERVAL_S, holder)
    try:
        sharded = None
        if shard_dispatcher is not None and holder is not None:
            sharded = embed_in_shards(
                claimed,
                config,
                collection,
                store=files.store,
                temp_dir=files.scratch or files.work_dir,
                work_dir=files.work_dir,
                stop=stop,
                progress=writer,
                dispatcher=shard_dispatcher,
                holder=holder,
                push_cache=files.push_checkpoints,
                factory=factory,
                settings=settings,
            )
        result = pipeline.run(
            collection,
            config,
            files.work_dir,
            progress=files.with_checkpoints(writer),
            should_stop=stop,
            device=settings.JOB_DEVICE or None,
        )
    finally:
        close = getattr(collection, "close", None)  # ImageSources hold files open, pixels not
        if callable(close):
            close()
    if sharded is not None:
        _report_shards(result, sharded, files.work_dir)
    return save_results(
        factory,
        claimed.job_id,
        list(collection.ids),
        result,
        files.store,
        holder,
        publish=files.publish,
    )


def _report_shards(result: Any, sharded: ShardedEmbedding, work_dir: Path) -> None:
    """The features came from the cache entry the shards made: the report says how."""
    result.notes.append(sharded.note())
    result.report["feature_shards"] = sharded.describe()
    (work_dir / "report.json").write_text(json.dumps(result.report, indent=2))


def run_job(
    job_id: str,
    *,
    shutdown: threading.Event | None = None,
    shard_dispatcher: ShardDispatcher | None = None,
) -> str | None:
    """Run job `job_id` to the end; its final status (None when the job does not exist).

    `shard_dispatcher` (the Celery worker's): with EMBED_SHARD_IMAGES set, a big dataset's
    features are embedded in shards by every free worker (app.runner.shards).

    StopRequested from a cancel -> "cancelled"; from `shutdown` (embedded worker stopping) ->
    back to "queued" to resume later; from a lost lease -> the job is left to the worker that
    holds it now; any other exception -> "failed" with the error text. A job this call cannot
    take (finished, or running under another worker's live lease) is left as it is and its
    status returned.
    """
    settings = get_settings()
    factory = get_sessionmaker()
    holder = new_holder()
    claimed = claim_job(job_id, factory, settings, holder)
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
    files = JobFiles(object_store(settings), settings, job_id, claimed.dataset_id)
    try:
        status = _run_pipeline(claimed, factory, settings, files, stop, holder, shard_dispatcher)
    except StopRequested:
        if heartbeat.lost.is_set():
            logger.warning("job lease lost; left to its new holder", extra={"job_id": job_id})
            with factory() as session:
                return session.scalar(select(Job.status).where(Job.id == job_id))
        if shutdown is not None and shutdown.is_set() and not stop.cancelled:
            requeue_after_shutdown(factory, job_id, holder)
            logger.info("job interrupted by shutdown", extra={"job_id": job_id})
            return JobStatus.QUEUED
        finish_job(factory, job_id, JobStatus.CANCELLED, holder=holder)
        logger.info("job cancelled", extra={"job_id": job_id})
        return JobStatus.CANCELLED
    except StorageUnavailable as error:
        logger.exception("job failed: the object store is unavailable", extra={"job_id": job_id})
        message = (
            f"StorageUnavailable: the object store could not be reached ({error}); nothing was "
            "marked as a result. Run the job again once the store is back: it resumes from its "
            "last stored checkpoint"
        )
        finish_job(factory, job_id, JobStatus.FAILED, message, holder)
        return JobStatus.FAILED
    except Exception as error:
        logger.exception("job failed", extra={"job_id": job_id})
        finish_job(factory, job_id, JobStatus.FAILED, f"{type(error).__name__}: {error}", holder)
        return JobStatus.FAILED
    finally:
        heartbeat.stop()
        files.close()
    logger.info("job finished", extra={"job_id": job_id, "status": status})
    return status
