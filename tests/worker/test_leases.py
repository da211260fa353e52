"""Job leases and the reaper on PostgreSQL: one worker per job, a second delivery leaves a
running job alone, dead workers' jobs are taken over or failed after JOB_MAX_ATTEMPTS."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from tests.service_support import use_settings

NOW = datetime.now(UTC)
LIVE = {"lease_owner": "elsewhere:1:live", "lease_expires_at": NOW + timedelta(hours=1)}
EXPIRED = {"lease_owner": "elsewhere:1:gone", "lease_expires_at": NOW - timedelta(minutes=5)}


def _row(job_id: str) -> Any:
    from app.db.models import Job
    from app.db.session import session_scope

    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        session.expunge(job)
        return job


def _dead_local_holder() -> str:
    from app.runner.leases import local_holder

    process = subprocess.Popen(["true"])
    process.wait()  # reaped: the pid names no process now
    return local_holder(process.pid, "dead")


def test_exactly_one_of_many_concurrent_claims_wins(make_job: Any) -> None:
    from app.core.config import get_settings
    from app.db.session import get_sessionmaker
    from app.runner.claim import claim_job

    job_id = make_job("running", **EXPIRED, attempts=1)
    factory, settings = get_sessionmaker(), get_settings()
    start = threading.Barrier(8)
    won: list[str] = []

    def claim(holder: str) -> None:
        start.wait()
        if claim_job(job_id, factory, settings, holder) is not None:
            won.append(holder)

    threads = [threading.Thread(target=claim, args=(f"h:{i}:t",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    row = _row(job_id)
    assert len(won) == 1 and row.lease_owner == won[0]
    assert row.attempts == 2 and row.status == "running"
    assert row.lease_expires_at > datetime.now(UTC) + timedelta(seconds=50)


def test_second_delivery_of_a_running_job_touches_nothing(make_job: Any) -> None:
    from app.runner.run import run_job

    job_id = make_job("running", **LIVE, attempts=1, stage="scan", progress=0.5)
    before = _row(job_id)
    assert run_job(job_id) == "running"
    after = _row(job_id)
    for column in ("status", "attempts", "lease_owner", "lease_expires_at", "stage", "progress"):
        assert getattr(after, column) == getattr(before, column), column
    assert after.updated_at == before.updated_at  # not even a write


def test_expired_or_dead_leases_are_taken_over(make_job: Any) -> None:
    from app.core.config import get_settings
    from app.db.session import get_sessionmaker
    from app.runner.claim import claim_job
    from app.runner.leases import local_holder

    factory, settings = get_sessionmaker(), get_settings()
    expired = make_job("running", **EXPIRED, attempts=1)
    assert claim_job(expired, factory, settings, "new:1:a") is not None
    assert _row(expired).lease_owner == "new:1:a" and _row(expired).attempts == 2
    # A killed worker on this host: taken over at once, without waiting for the expiry.
    dead = make_job(
        "running", lease_owner=_dead_local_holder(), lease_expires_at=NOW + timedelta(hours=1)
    )
    assert claim_job(dead, factory, settings, "new:1:b") is not None
    # A live lease of another live process of this host is not, nor one of another container
    # that happens to share the host name (another pid namespace).
    for holder in (local_holder(1, "init"), f"{socket.gethostname()}:999999:other-ns:t"):
        alive = make_job("running", lease_owner=holder, lease_expires_at=NOW + timedelta(hours=1))
        assert claim_job(alive, factory, settings, "new:1:c") is None
        assert _row(alive).lease_owner == holder


def test_heartbeat_renews_the_lease_and_notices_its_loss(make_job: Any) -> None:
    from sqlalchemy import update

    from app.db.models import Job
    from app.db.session import get_sessionmaker, session_scope
    from app.runner.leases import Heartbeat

    job_id = make_job("running", lease_owner="me:1:x", lease_expires_at=NOW)
    heartbeat = Heartbeat(get_sessionmaker(), job_id, "me:1:x", lease_s=30, interval_s=0.1)
    heartbeat.start()
    try:
        time.sleep(0.5)
        row = _row(job_id)
        assert row.lease_expires_at > datetime.now(UTC) + timedelta(seconds=25)
        assert row.heartbeat_at is not None and not heartbeat.lost.is_set()
        with session_scope() as session:  # another worker took the job over
            session.execute(update(Job).where(Job.id == job_id).values(lease_owner="you:2:y"))
        assert heartbeat.lost.wait(2)
    finally:
        heartbeat.stop()
    assert _row(job_id).lease_owner == "you:2:y"


def test_a_worker_without_the_lease_writes_nothing(make_job: Any) -> None:
    import numpy as np

    from app.core.config import get_settings
    from app.db.session import get_sessionmaker
    from app.runner.claim import finish_job
    from app.runner.engine_callbacks import ProgressWriter
    from app.runner.results import save_results
    from app.storage import object_store
    from scan_engine.results import PipelineResult, ProgressEvent

    job_id = make_job("running", **LIVE, stage="pretext", progress=0.1)
    factory = get_sessionmaker()
    ProgressWriter(job_id, factory, 0, holder="stale:1:z")(ProgressEvent("scan", 0.5, 0.9, 1.0))
    finish_job(factory, job_id, "failed", "boom", holder="stale:1:z")
    empty = PipelineResult([], {}, {}, {}, [], {}, embedding_2d=np.zeros((0, 2), np.float32))
    storage = object_store(get_settings())
    assert save_results(factory, job_id, [], empty, storage, holder="stale:1:z") == "running"
    row = _row(job_id)
    assert (row.status, row.stage, row.progress, row.error) == ("running", "pretext", 0.1, None)


def test_reaper_requeues_fails_or_cancels_stale_jobs(
    make_job: Any, monkeypatch: pytest.MonkeyPatch, pg_settings: str, tmp_path: Any
) -> None:
    from app.core.config import get_settings
    from app.db.session import get_sessionmaker
    from app.runner.reaper import reap_stale_jobs

    use_settings(
        monkeypatch,
        DATA_DIR=str(tmp_path / "data"),
        DATABASE_URL=pg_settings,
        JOB_MAX_ATTEMPTS="3",
        QUEUED_REDISPATCH_S="60",
        AUTH_MODE="api_keys",
    )
    resume = make_job("running", **EXPIRED, attempts=1, heartbeat_at=NOW - timedelta(minutes=5))
    give_up = make_job("running", **EXPIRED, attempts=3)
    cancel = make_job("running", **EXPIRED, attempts=1, cancel_requested=True)
    dead = make_job(
        "running", lease_owner=_dead_local_holder(), lease_expires_at=LIVE["lease_expires_at"]
    )
    live = make_job("running", **LIVE, attempts=1)
    forgotten = make_job("queued", updated_at=NOW - timedelta(hours=2))
    fresh = make_job("queued")
    sent: list[str] = []
    assert sorted(reap_stale_jobs(get_sessionmaker(), get_settings(), sent.append)) == sorted(
        [resume, dead, forgotten]
    )
    assert sorted(sent) == sorted([resume, dead, forgotten])
    row = _row(resume)
    assert (row.status, row.lease_owner, row.attempts) == ("queued", None, 1)
    assert "resume from its last checkpoint" in row.message and "last heartbeat" in row.message
    row = _row(give_up)
    assert row.status == "failed" and "gave up after 3 attempts" in row.error
    assert row.finished_at is not None
    assert _row(cancel).status == "cancelled"
    assert _row(live).status == "running" and _row(live).lease_owner == LIVE["lease_owner"]
    assert _row(fresh).status == "queued"
    assert reap_stale_jobs(get_sessionmaker(), get_settings(), sent.append) == []  # settled

    # The queue is down: the job stays queued and is due again at the next pass.
    stuck = make_job("queued", updated_at=NOW - timedelta(hours=2))

    def broken(job_id: str) -> None:
        raise ConnectionError("broker down")

    assert reap_stale_jobs(get_sessionmaker(), get_settings(), broken) == []
    assert reap_stale_jobs(get_sessionmaker(), get_settings(), sent.append) == [stuck]
