"""Hand a committed job to whatever runs jobs: the embedded thread pool or Celery (JOB_RUNNER).

The API commits the job row first and enqueues second, so a worker never sees an unknown id.
The Celery route sends the task by name (app.runner.celery_app.TASK_NAME): the sender never
imports the worker's task module. The reaper re-sends jobs through the same `enqueue`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from app.core.config import Settings
from app.runner.celery_app import SHARD_TASK_NAME, TASK_NAME, create_celery_app
from app.runner.embedded import EmbeddedWorker

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["DispatchError", "EmbeddedDispatcher", "CeleryDispatcher", "make_dispatcher"]

logger = logging.getLogger(__name__)

# A request waits at most a couple of seconds for the broker before answering 503.
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


class DispatchError(RuntimeError):
    """The job could not be handed to a worker (broker down...)."""


class EmbeddedDispatcher:
    kind = "embedded"

    def __init__(self, settings: Settings) -> None:
        self.worker = EmbeddedWorker(settings.EMBEDDED_WORKERS, settings)

    def start(self) -> None:
        self.worker.start(resume=True)

    def stop(self) -> None:
        self.worker.stop()

    def enqueue(self, job_id: str) -> None:
        try:
            self.worker.submit(job_id)
        except RuntimeError as error:
            raise DispatchError(str(error)) from error

    def check(self, timeout_s: float) -> None:
        """Raise when jobs cannot be dispatched (used by /readyz)."""
        if not self.worker.alive:
            raise DispatchError("embedded worker is not running")


class CeleryDispatcher:
    """Sends jobs to the Celery queue. `celery`: an app to send with (a worker passes its own);
    by default one is made from `settings` when first needed."""

    kind = "celery"

    def __init__(self, settings: Settings, celery: Celery | None = None) -> None:
        self.settings = settings
        self._celery = celery
        self._owns_celery = celery is None

    def _app(self) -> Celery:
        if self._celery is None:
            self._celery = create_celery_app(self.settings)
        return self._celery

    def start(self) -> None:
        pass

    def stop(self) -> None:
        if self._celery is not None and self._owns_celery:
            self._celery.close()  # release the broker connection pool

    def enqueue(self, job_id: str) -> None:
        try:
            self._app().send_task(
                TASK_NAME,
                args=[job_id],
                queue=self.settings.CELERY_QUEUE,
                # The job's state lives in the DB; not waiting on a result saves a Redis
                # subscription per job (and a long retry loop when Redis is down).
                ignore_result=True,
                retry_policy=_PUBLISH_RETRY,
            )
        except Exception as error:  # kombu raises OperationalError and friends
            raise DispatchError(f"could not reach the job queue: {error}") from error

    def enqueue_shards(self, job_id: str, indexes: list[int]) -> None:
        """One `embed_feature_shards` task per shard of job `job_id`, sent as a group: any free
        worker helps embed (app.runner.shards); nobody waits on their results."""
        from celery import group

        app = self._app()
        tasks = group(
            app.signature(SHARD_TASK_NAME, args=[job_id, index], queue=self.settings.CELERY_QUEUE)
            for index in indexes
        )
        try:
            tasks.apply_async(ignore_result=True, retry_policy=_PUBLISH_RETRY)
        except Exception as error:  # kombu raises OperationalError and friends
            raise DispatchError(f"could not reach the job queue: {error}") from error

    def check(self, timeout_s: float) -> None:
        """Raise when the broker does not answer within `timeout_s` (used by /readyz)."""
        with self._app().connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout_s)


def make_dispatcher(settings: Settings) -> EmbeddedDispatcher | CeleryDispatcher:
    if settings.JOB_RUNNER == "celery":
        return CeleryDispatcher(settings)
    return EmbeddedDispatcher(settings)
