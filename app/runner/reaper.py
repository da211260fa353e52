"""The reaper: no job stays "running" or "queued" forever.

Every worker runs it: the embedded worker in a thread of the API process, each Celery worker in
a thread of its pool processes, once at start and then every REAPER_INTERVAL_S (no beat
scheduler needed; several reapers at once are harmless, every change is a conditional UPDATE).

- A running job whose lease expired (or whose holder is a dead process on this host): its worker
  is gone. Cancel requested -> cancelled; JOB_MAX_ATTEMPTS reached -> failed with the reason;
  otherwise back to queued and sent to the queue again, to resume from its last checkpoint.
- A job queued for QUEUED_REDISPATCH_S without being taken: its message may have been lost (a
  broker restarted without persistence), so it is sent again. A duplicate message is harmless:
  the lease lets only one delivery run the job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.models import Job, JobStatus, utcnow
from app.runner.leases import lease_is_free, lease_unchanged_clause

__all__ = ["reap_stale_jobs", "Reaper"]

logger = logging.getLogger(__name__)


def _when(value: object) -> str:
    return "never" if value is None else str(value)[:19]


def reap_stale_jobs(
    factory: sessionmaker[Session], settings: Settings, enqueue: Callable[[str], None]
) -> list[str]:
    """One pass; the ids of the jobs sent to the queue again through `enqueue` (a dispatcher's,
    app.runner.dispatch: the embedded pool's submit or the Celery send)."""
    now = utcnow()
    resend: list[str] = []
    with factory() as session:
        running = session.execute(
            select(
                Job.id,
                Job.attempts,
                Job.cancel_requested,
                Job.lease_owner,
                Job.lease_expires_at,
                Job.heartbeat_at,
            ).where(Job.status == JobStatus.RUNNING)
        ).all()
        for job in running:
            if not lease_is_free(JobStatus.RUNNING, job.lease_owner, job.lease_expires_at, now):
                continue
            unchanged = [
                Job.id == job.id,
                Job.attempts == job.attempts,
                lease_unchanged_clause(job.lease_owner, now),
            ]
            lost = f"the worker running it stopped (last heartbeat {_when(job.heartbeat_at)})"
            finished = {"finished_at": now, "eta_s": None, "lease_expires_at": None}
            if job.cancel_requested:
                values = {"status": JobStatus.CANCELLED, **finished}
            elif job.attempts >= settings.JOB_MAX_ATTEMPTS:
                error = f"gave up after {job.attempts} attempts: {lost}"
                values = {"status": JobStatus.FAILED, "error": error, **finished}
            else:
                values = {
                    "status": JobStatus.QUEUED,
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "eta_s": None,
                    "message": f"{lost}; queued again to resume from its last checkpoint",
                }
            changed = session.execute(  # type: ignore[attr-defined]
                update(Job).where(*unchanged).values(**values)
            ).rowcount
            session.commit()
            if changed:
                logger.warning(
                    "stale job %s", values["status"], extra={"job_id": job.id, "reason": lost}
                )
                if values["status"] == JobStatus.QUEUED:
                    resend.append(job.id)

        cutoff = now - timedelta(seconds=settings.QUEUED_REDISPATCH_S)
        waiting = session.scalars(
            select(Job.id).where(Job.status == JobStatus.QUEUED, Job.updated_at < cutoff)
        ).all()
        for job_id in waiting:
            touched = session.execute(  # type: ignore[attr-defined]
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.updated_at < cutoff)
                .values(updated_at=now)
            ).rowcount
            session.commit()
            if touched:
                logger.warning("job queued too long; sending it again", extra={"job_id": job_id})
                resend.append(job_id)

    sent: list[str] = []
    for job_id in resend:
        try:
            enqueue(job_id)
            sent.append(job_id)
        except Exception:
            # The queue is down: make the job due again, so the next pass retries it.
            logger.warning("could not re-send job", extra={"job_id": job_id}, exc_info=True)
            with factory() as session, session.begin():
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
                    .values(updated_at=cutoff - timedelta(seconds=1))
                )
    return sent


class Reaper:
    """A daemon thread calling `run_once` at start and then every `interval_s` seconds."""

    def __init__(self, run_once: Callable[[], object], interval_s: float) -> None:
        self.run_once = run_once
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scan-reaper", daemon=True)

    def start(self) -> Reaper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            try:
                self.run_once()
            except Exception:  # the database is down: try again next time
                logger.warning("reaper pass failed", exc_info=True)
            if self._stop.wait(self.interval_s):
                return
