"""The Celery application: Redis broker and result backend, one `gpu` queue, late acks.

Run workers as `celery -A worker.celery_app worker -Q gpu --concurrency 1` (one per GPU).
Why the settings: a job takes minutes to hours, so a worker takes one message at a time
(prefetch 1) and acknowledges it only when done (acks_late); if the worker dies the message is
requeued (reject_on_worker_lost) and the job resumes from its checkpoints. Redis redelivers an
unacknowledged message after the visibility timeout; that is set above the hard time limit, so
normally a job is delivered once, and whatever the setting the job lease (app.leases) lets only
one worker run a job: a second delivery of a running job exits without touching it. Each pool
process also runs the reaper (app.reaper) at start and every REAPER_INTERVAL_S: jobs whose
worker died are handed out again or failed, no beat scheduler needed. Nothing here touches CUDA:
the prefork pool forks children after import, and CUDA cannot be used across a fork.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_process_init

from app.core.config import Settings, get_settings
from app.core.logging import configure_logging
from app.dispatch import TASK_NAME

__all__ = ["app", "celery_app", "create_celery_app", "TASK_NAME"]

logger = logging.getLogger(__name__)


def create_celery_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured from the service settings."""
    settings = settings or get_settings()
    broker = settings.CELERY_BROKER_URL or "redis://localhost:6379/0"
    celery = Celery(
        "scan_service",
        broker=broker,
        backend=settings.CELERY_RESULT_BACKEND or broker,
        include=["worker.tasks"],
    )
    visibility_s = settings.CELERY_VISIBILITY_TIMEOUT_S
    transport: dict[str, Any] = {"visibility_timeout": visibility_s}
    broker_transport = dict(transport)
    if visibility_s < 600:
        # kombu sweeps for expired unacked messages only every 10 x 10 s by default; with a
        # short visibility timeout, sweep at its own pace or the setting means little.
        broker_transport |= {
            "unacked_restore_interval": max(1.0, visibility_s / 2),
            "unacked_restore_throttle": 1,
        }
    celery.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.JOB_SOFT_TIME_LIMIT_S,
        task_time_limit=settings.JOB_HARD_TIME_LIMIT_S,
        task_routes={TASK_NAME: {"queue": settings.CELERY_QUEUE}},
        task_default_queue=settings.CELERY_QUEUE,
        broker_transport_options=broker_transport,
        result_backend_transport_options=transport,
        result_expires=7 * 24 * 3600,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_track_started=True,
        broker_connection_retry_on_startup=True,
        # docker stop (SIGTERM remapped to SIGQUIT): the job gets a grace period, then its
        # message is requeued at once and another worker resumes it from its checkpoints.
        worker_soft_shutdown_timeout=settings.CELERY_SOFT_SHUTDOWN_TIMEOUT_S,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return celery


@setup_logging.connect
def _configure_worker_logging(**_: Any) -> None:
    # Connecting this signal stops Celery from installing its own handlers: JSON lines instead.
    settings = get_settings()
    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)


@worker_process_init.connect
def _fresh_db_pool(**_: Any) -> None:
    # A forked child must not reuse the parent's DB sockets.
    from app.db.session import dispose_engines

    dispose_engines(close=False)


_reaper: Any = None


@worker_process_init.connect
def _start_reaper(**_: Any) -> None:
    # In the pool process (prefork child, or the solo pool's own process), never in a parent
    # that forks later: a thread there could hold a lock at the moment of a fork.
    global _reaper
    from app.db.session import get_sessionmaker
    from app.reaper import Reaper, reap_stale_jobs

    settings = get_settings()

    def enqueue(job_id: str) -> None:
        app.send_task(TASK_NAME, args=[job_id], queue=settings.CELERY_QUEUE, ignore_result=True)

    def run_once() -> None:
        reap_stale_jobs(get_sessionmaker(), settings, enqueue)

    _reaper = Reaper(run_once, settings.REAPER_INTERVAL_S).start()


app = create_celery_app()
celery_app = app
