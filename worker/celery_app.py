"""The worker's Celery app: `celery -A worker.celery_app worker -Q gpu --concurrency 1` (one per
GPU).

The configuration is app.runner.celery_app's (the API sends with the same one); this module
adds what only a worker process does: JSON logging, a fresh DB pool after the fork, and the
reaper (app.runner.reaper) in each pool process at start and every REAPER_INTERVAL_S, which
re-sends through the Celery dispatcher: jobs whose worker died are handed out again or failed,
no beat scheduler needed. Nothing here touches CUDA: the prefork pool forks children after
import, and CUDA cannot be used across a fork.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import setup_logging, worker_process_init

from app.core.config import get_settings
from app.core.logging import configure_logging
from app.runner.celery_app import create_celery_app

__all__ = ["app", "celery_app"]

logger = logging.getLogger(__name__)


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
    from app.runner.dispatch import CeleryDispatcher
    from app.runner.reaper import Reaper, reap_stale_jobs

    settings = get_settings()
    dispatcher = CeleryDispatcher(settings, celery=app)  # sends with this worker's app

    def run_once() -> None:
        reap_stale_jobs(get_sessionmaker(), settings, dispatcher.enqueue)

    _reaper = Reaper(run_once, settings.REAPER_INTERVAL_S).start()


app = create_celery_app(include=["worker.tasks"])
celery_app = app
