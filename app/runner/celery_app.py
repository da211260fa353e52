"""The Celery app factory and the task name: one configuration for the API (which only sends)
and the workers (which run `worker.tasks`).

Why the settings: a job takes minutes to hours, so a worker takes one message at a time
(prefetch 1) and acknowledges it only when done (acks_late); if the worker dies the message is
requeued (reject_on_worker_lost) and the job resumes from its checkpoints. Redis redelivers an
unacknowledged message after the visibility timeout; that is set above the hard time limit, so
normally a job is delivered once, and whatever the setting the job lease (app.runner.leases)
lets only one worker run a job: a second delivery of a running job exits without touching it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from app.core.config import Settings, get_settings

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["TASK_NAME", "SHARD_TASK_NAME", "create_celery_app"]

# The names messages carry (and so part of the wire format: queued messages outlive a deploy).
TASK_NAME = "worker.tasks.run_scan_job"
# Helping a running job embed its features in shards (app.runner.shards); same queue.
SHARD_TASK_NAME = "worker.tasks.embed_feature_shards"


def create_celery_app(settings: Settings | None = None, include: Sequence[str] = ()) -> Celery:
    """A Celery app configured from the service settings; `include`: task modules a worker loads."""
    # Imported here: the embedded service never loads Celery.
    from celery import Celery

    settings = settings or get_settings()
    broker = settings.CELERY_BROKER_URL or "redis://localhost:6379/0"
    celery = Celery(
        "scan_service",
        broker=broker,
        backend=settings.CELERY_RESULT_BACKEND or broker,
        include=list(include),
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
        task_routes={
            TASK_NAME: {"queue": settings.CELERY_QUEUE},
            SHARD_TASK_NAME: {"queue": settings.CELERY_QUEUE},
        },
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
