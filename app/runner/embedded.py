"""In-process job runner for the embedded mode: a thread pool executing app.runner.run.run_job.

One thread by default (jobs use every core anyway). At start it resumes jobs left queued or
running by a previous process (a killed process's leases are recognised as dead); a reaper
thread (app.runner.reaper) then re-runs jobs whose worker stopped, every REAPER_INTERVAL_S. At
shutdown it asks running jobs to stop at their next step and leaves them queued, so the next
start resumes them from their checkpoints.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor

from sqlalchemy import select

from app.core.config import Settings, get_settings
from app.db.models import Job, JobStatus
from app.db.session import get_sessionmaker
from app.runner.reaper import Reaper, reap_stale_jobs
from app.runner.run import run_job

__all__ = ["EmbeddedWorker"]

logger = logging.getLogger(__name__)


class EmbeddedWorker:
    """A small thread pool that runs jobs by id, in submission order."""

    def __init__(self, workers: int = 1, settings: Settings | None = None) -> None:
        self.workers = workers
        self.settings = settings
        self.shutdown_event = threading.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._futures: set[Future[str | None]] = set()
        self._lock = threading.Lock()
        self._reaper: Reaper | None = None
        self._resume_pending = False

    @property
    def alive(self) -> bool:
        return self._executor is not None and not self.shutdown_event.is_set()

    def start(self, resume: bool = True, reap: bool = True) -> None:
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="scan-job")
        if resume:
            try:
                self._resume()
            except Exception:  # DB down at start: serve 503s now, the reaper resumes them later
                logger.exception("could not look for unfinished jobs to resume")
                self._resume_pending = True
        if reap:
            settings = self.settings or get_settings()
            self._reaper = Reaper(self._reap_once, settings.REAPER_INTERVAL_S).start()

    def _resume(self) -> None:
        for job_id in self._unfinished_job_ids():
            logger.info("resuming job left by a previous run", extra={"job_id": job_id})
            self.submit(job_id)
        self._resume_pending = False

    def _reap_once(self) -> None:
        if not self.alive:
            return
        if self._resume_pending:
            self._resume()
        reap_stale_jobs(get_sessionmaker(), self.settings or get_settings(), self.submit)

    def submit(self, job_id: str) -> None:
        if not self.alive or self._executor is None:
            raise RuntimeError("the embedded worker is not running")
        future = self._executor.submit(self._run, job_id)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)

    def _run(self, job_id: str) -> str | None:
        if self.shutdown_event.is_set():
            return None  # stays queued for the next start
        try:
            return run_job(job_id, shutdown=self.shutdown_event)
        except Exception:  # run_job records failures itself; this is a last resort
            logger.exception("embedded job crashed", extra={"job_id": job_id})
            return None

    def _forget(self, future: Future[str | None]) -> None:
        with self._lock:
            self._futures.discard(future)

    def pending(self) -> int:
        with self._lock:
            return len(self._futures)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask running jobs to stop at their next step and wait for the threads."""
        self.shutdown_event.set()
        if self._reaper is not None:
            self._reaper.stop()
        executor, self._executor = self._executor, None
        if executor is None:
            return
        executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            futures = list(self._futures)
        for future in futures:
            try:
                future.result(timeout=timeout_s)
            except CancelledError:
                pass  # never started: the job stays queued for the next start
            except TimeoutError:
                logger.warning("embedded job did not stop within %.0f s", timeout_s)

    @staticmethod
    def _unfinished_job_ids() -> list[str]:
        with get_sessionmaker()() as session:
            return list(
                session.scalars(
                    select(Job.id)
                    .where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
                    .order_by(Job.created_at)
                )
            )
