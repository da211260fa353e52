"""Hand a committed job to whatever runs jobs: the embedded thread pool or Celery (JOB_RUNNER).

The API commits the job row first and enqueues second, so a worker never sees an unknown id.
The Celery route sends the task by name: the API never imports the worker's task module.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from app.core.config import Settings
from app.embedded_worker import EmbeddedWorker

__all__ = ["Dispatcher", "EmbeddedDispatcher", "CeleryDispatcher", "make_dispatcher", "TASK_NAME"]

logger = logging.getLogger(__name__)

TASK_NAME = "worker.tasks.run_scan_job"
# A request waits at most a couple of seconds for the broker before answering 503.
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


class DispatchError(RuntimeError):
    """The job could not be handed to a worker (broker down...)."""


class Dispatcher(Protocol):
    kind: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def enqueue(self, job_id: str) -> None: ...

    def check(self, timeout_s: float) -> None:
        """Raise when jobs cannot be dispatched (used by /readyz)."""


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
        if not self.worker.alive:
            raise DispatchError("embedded worker is not running")


class CeleryDispatcher:
    kind = "celery"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._celery: Any = None

    def _app(self) -> Any:
        # A producer configured like the workers (worker.celery_app), from this app's settings
        # rather than the module-level app built at import. Imported late: only this runner
        # needs Celery.
        if self._celery is None:
            from worker.celery_app import create_celery_app

            self._celery = create_celery_app(self.settings)
        return self._celery

    def start(self) -> None:
        pass

    def stop(self) -> None:
        if self._celery is not None:
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

    def check(self, timeout_s: float) -> None:
        with self._app().connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout_s)


def make_dispatcher(settings: Settings) -> EmbeddedDispatcher | CeleryDispatcher:
    if settings.JOB_RUNNER == "celery":
        return CeleryDispatcher(settings)
    return EmbeddedDispatcher(settings)
