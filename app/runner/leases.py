"""Job leases: exactly one worker runs a job at a time.

A worker takes a job with one atomic conditional UPDATE (compare-and-set on status, lease holder
and attempts, and only while the lease is free: the job is queued, its lease expired, or its
holder is a dead process on this machine). While it runs, a heartbeat thread pushes
`lease_expires_at` forward; every write the worker makes is conditional on still holding the
lease. A worker that cannot renew (its lease was taken over, or the database was unreachable for
longer than the lease) stops at its next step and touches nothing. A second delivery of a job
whose lease is held (Redis redelivers unacknowledged tasks after the visibility timeout) exits
without touching it. An expired lease lets the next worker resume from the last checkpoint.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, and_, or_, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Job, JobStatus, utcnow

__all__ = [
    "new_holder",
    "local_holder",
    "holder_is_dead",
    "lease_is_free",
    "lease_free_clause",
    "lease_unchanged_clause",
    "renew",
    "Heartbeat",
]

logger = logging.getLogger(__name__)


def _pid_namespace() -> str:
    # Containers sharing a host name (host networking) still have their own pid numbering.
    try:
        return os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        return "-"


def local_holder(pid: int, token: str) -> str:
    """The holder name of process `pid` of this host: "<host>:<pid>:<pid namespace>:<token>"."""
    return f"{socket.gethostname()}:{pid}:{_pid_namespace()}:{token}"


def new_holder() -> str:
    """A lease holder name for this process, with a token unique to one claim."""
    return local_holder(os.getpid(), uuid.uuid4().hex[:12])


def holder_is_dead(holder: str | None) -> bool:
    """True when `holder` names a process of this host (and pid namespace) that no longer runs:
    a killed worker.

    Holders elsewhere, and this very process, are never declared dead here: for them only the
    lease expiry counts.
    """
    parts = (holder or "").split(":")
    if len(parts) != 4 or not parts[1].isdigit():
        return False
    host, pid_text, namespace, _ = parts
    if host != socket.gethostname() or namespace != _pid_namespace():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        # "pid (name) S ...": Z (zombie, not yet reaped by its parent) and X are dead too.
        return stat.read_text().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _aware(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes; every stored time is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def lease_is_free(
    status: str, holder: str | None, expires_at: datetime | None, now: datetime
) -> bool:
    """Whether a worker may take a job in this state (queued, or running on a dead lease)."""
    if status == JobStatus.QUEUED:
        return True
    if status != JobStatus.RUNNING:
        return False
    expires_at = _aware(expires_at)
    return expires_at is None or expires_at < now or holder_is_dead(holder)


def lease_free_clause(seen_holder: str | None, now: datetime) -> ColumnElement[bool]:
    """SQL for `lease_is_free`, bound to the holder read before (a dead one may be replaced)."""
    running_on_dead_lease = and_(
        Job.status == JobStatus.RUNNING,
        or_(
            Job.lease_expires_at.is_(None),
            Job.lease_expires_at < now,
            *([Job.lease_owner == seen_holder] if holder_is_dead(seen_holder) else []),
        ),
    )
    return or_(Job.status == JobStatus.QUEUED, running_on_dead_lease)


def lease_unchanged_clause(seen_holder: str | None, now: datetime) -> ColumnElement[bool]:
    """Compare-and-set guard: the row still has the holder read before and its lease is still
    free to take; of two workers updating under it, exactly one gets rowcount 1."""
    same_holder = (
        Job.lease_owner.is_(None) if seen_holder is None else Job.lease_owner == seen_holder
    )
    return and_(same_holder, lease_free_clause(seen_holder, now))


def renew(factory: sessionmaker[Session], job_id: str, holder: str, lease_s: float) -> bool:
    """Push the lease forward; False when `holder` no longer holds it (or the job ended)."""
    now = utcnow()
    with factory() as session, session.begin():
        renewed = session.execute(  # type: ignore[attr-defined]
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == holder, Job.status == JobStatus.RUNNING)
            .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_s))
            .execution_options(synchronize_session=False)
        ).rowcount
    return bool(renewed)


class Heartbeat:
    """A daemon thread renewing one job's lease every `interval_s` while the job runs.

    `lost` is set when the lease is gone: renewal refused, or no renewal got through for
    `lease_s` (by then another worker may have taken the job over). `renew_lease`: renews some
    other lease of the job instead (a feature shard's, app.runner.shards; `what` names it in
    the log); False when lost.
    """

    def __init__(
        self,
        factory: sessionmaker[Session],
        job_id: str,
        holder: str,
        lease_s: float,
        interval_s: float,
        *,
        renew_lease: Callable[[], bool] | None = None,
        what: str = "job",
    ) -> None:
        self.factory = factory
        self.job_id = job_id
        self.holder = holder
        self.lease_s = lease_s
        self.interval_s = interval_s
        self._renew = renew_lease or (lambda: renew(factory, job_id, holder, lease_s))
        self.what = what
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{job_id[:8]}", daemon=True
        )

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)

    def _run(self) -> None:
        last_renewed = time.monotonic()
        while not self._stop.wait(self.interval_s):
            try:
                if not self._renew():
                    logger.warning(
                        "%s lease lost; stopping without touching the %s",
                        self.what,
                        self.what,
                        extra={"job_id": self.job_id, "holder": self.holder},
                    )
                    self.lost.set()
                    return
                last_renewed = time.monotonic()
            except Exception:
                logger.warning("lease renewal failed", extra={"job_id": self.job_id}, exc_info=True)
                if time.monotonic() - last_renewed > self.lease_s:
                    logger.error(
                        "lease expired while the database was unreachable; stopping",
                        extra={"job_id": self.job_id},
                    )
                    self.lost.set()
                    return
