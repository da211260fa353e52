"""The engine pipeline's two callbacks for a job run, backed by the job's row.

`ProgressWriter` is the `progress=` callback: stage, progress, ETA and live stage timings go to
the job. `StopFlag` is the `should_stop=` callback: a cancel, a shutdown or a lost lease stops
the pipeline at its next step. Both tolerate a database hiccup: a long job must not die of one.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Job, JobStatus
from scan_engine.results import ProgressEvent

__all__ = ["ProgressWriter", "StopFlag"]

logger = logging.getLogger(__name__)


class ProgressWriter:
    """Pipeline progress callback: writes stage, progress, ETA and live stage timings to the job.

    Throttled to one write per `interval_s`, except that a stage change is always written.
    Progress never falls back within one attempt (sharded embedding reports the features
    stage before the pipeline starts it again from the cache). A failed write is logged and
    ignored: a DB hiccup must not kill a long job.
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
        self._progress = 0.0

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
        self._progress = min(1.0, max(self._progress, float(event.fraction)))
        values: dict[str, Any] = {
            "stage": event.stage,
            "progress": self._progress,
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
