"""Celery tasks: thin adapters over app.runner (idempotent, so a redelivery is harmless)."""

from __future__ import annotations

import logging

from app.core.config import get_settings
from app.runner.celery_app import SHARD_TASK_NAME, TASK_NAME
from app.runner.dispatch import CeleryDispatcher
from app.runner.run import run_job
from app.runner.shards import help_embed_shards
from worker.celery_app import celery_app

__all__ = ["run_scan_job", "embed_feature_shards"]

logger = logging.getLogger(__name__)


@celery_app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)
def run_scan_job(job_id: str) -> str | None:
    """Run job `job_id` (see app.runner.run.run_job, which the embedded worker calls too);
    returns its final status. Its feature shards, if any, are sent with this worker's app."""
    return run_job(job_id, shard_dispatcher=CeleryDispatcher(get_settings(), celery=celery_app))


@celery_app.task(name=SHARD_TASK_NAME, acks_late=True, reject_on_worker_lost=True)
def embed_feature_shards(job_id: str, index: int) -> int:
    """Help running job `job_id` embed its features: shard `index` first, then any free one
    (app.runner.shards.help_embed_shards); how many shards this task embedded."""
    return help_embed_shards(job_id, prefer=index)
