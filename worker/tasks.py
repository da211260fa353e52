"""Celery tasks: thin adapters over app.runner (idempotent, so a redelivery is harmless)."""

from __future__ import annotations

import logging

from app.runner.celery_app import TASK_NAME
from app.runner.run import run_job
from worker.celery_app import celery_app

__all__ = ["run_scan_job"]

logger = logging.getLogger(__name__)


@celery_app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)
def run_scan_job(job_id: str) -> str | None:
    """Run job `job_id` (see app.runner.run.run_job, which the embedded worker calls too);
    returns its final status."""
    return run_job(job_id)
