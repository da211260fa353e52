"""Feature-shard leases on PostgreSQL (app.runner.shards): a shard goes to exactly one of many
concurrent claimers, a live lease is left alone, an expired or dead one is taken over, and a
holder that lost its shard can neither renew nor finish it; a helper task for a job that is not
running, or has nothing free, does nothing."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

RANGES = [range(0, 8), range(8, 16), range(16, 20)]


def _dead_local_holder() -> str:
    import subprocess

    from app.runner.leases import local_holder

    process = subprocess.Popen(["true"])
    process.wait()  # reaped: the pid names no process now
    return local_holder(process.pid, "dead")


def _plan(job_id: str, cache_key: str = "entry-a") -> list[int]:
    from app.db.session import get_sessionmaker
    from app.runner.shards import plan_shards

    return plan_shards(get_sessionmaker(), job_id, cache_key, "c" * 64, RANGES)


def _claim(job_id: str, holder: str, lease_s: float = 60, prefer: int | None = None) -> Any:
    from app.db.session import get_sessionmaker
    from app.runner.shards import claim_shard

    return claim_shard(get_sessionmaker(), job_id, holder, lease_s, prefer)


def _rows(job_id: str) -> list[Any]:
    from app.db.models import FeatureShard
    from app.db.session import session_scope

    with session_scope() as session:
        rows = session.scalars(
            select(FeatureShard).where(FeatureShard.job_id == job_id).order_by(FeatureShard.index)
        ).all()
        session.expunge_all()
        return list(rows)


def _set(job_id: str, index: int, **values: Any) -> None:
    from app.db.models import FeatureShard
    from app.db.session import session_scope

    with session_scope() as session:
        session.execute(
            update(FeatureShard)
            .where(FeatureShard.job_id == job_id, FeatureShard.index == index)
            .values(**values)
        )


def test_a_plan_is_kept_across_attempts_and_replaced_for_another_entry(make_job: Any) -> None:
    from app.db.session import get_sessionmaker
    from app.runner.shards import finish_shard

    job_id = make_job("running")
    assert _plan(job_id) == [0, 1, 2]
    assert [(r.start, r.stop, r.status) for r in _rows(job_id)] == [
        (0, 8, "pending"),
        (8, 16, "pending"),
        (16, 20, "pending"),
    ]
    claim = _claim(job_id, "me:1:x:a")
    assert finish_shard(get_sessionmaker(), claim.id, "me:1:x:a", "jobs/j/f/0.npz", 1.0)
    assert _plan(job_id) == [1, 2]  # a second attempt keeps the done shard
    assert _plan(job_id, cache_key="entry-b") == [0, 1, 2]
    assert {r.cache_key for r in _rows(job_id)} == {"entry-b"}
    assert all(r.status == "pending" and r.object_key is None for r in _rows(job_id))


def test_each_shard_goes_to_exactly_one_of_many_concurrent_claimers(make_job: Any) -> None:
    job_id = make_job("running")
    _plan(job_id)
    start = threading.Barrier(8)
    won: list[tuple[str, int]] = []
    lock = threading.Lock()

    def claim(holder: str) -> None:
        start.wait()
        taken = _claim(job_id, holder)
        if taken is not None:
            with lock:
                won.append((holder, taken.index))

    threads = [threading.Thread(target=claim, args=(f"h:{i}:ns:t",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(index for _, index in won) == [0, 1, 2]  # every shard once, nobody twice
    assert len({holder for holder, _ in won}) == 3
    holders = {row.index: row.lease_owner for row in _rows(job_id)}
    assert holders == {index: holder for holder, index in won}
    assert _claim(job_id, "late:1:ns:t") is None  # all held under live leases


def test_expired_and_dead_leases_are_taken_over_and_the_loser_touches_nothing(
    make_job: Any,
) -> None:
    from app.db.session import get_sessionmaker
    from app.runner.shards import finish_shard, release_shard, renew_shard

    factory = get_sessionmaker()
    job_id = make_job("running")
    _plan(job_id)
    first = _claim(job_id, "a:1:ns:t", prefer=2)
    assert first.index == 2 and (first.start, first.stop) == (16, 20)
    second = _claim(job_id, "b:1:ns:t")
    assert second.index == 0
    _set(job_id, 0, lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))
    dead = _dead_local_holder()
    _set(job_id, 2, lease_owner=dead)  # lease still live, but its process is gone

    taken = {_claim(job_id, "c:1:ns:t").index for _ in range(3)} - {None}
    assert taken == {0, 1, 2}
    assert {row.lease_owner for row in _rows(job_id)} == {"c:1:ns:t"}
    assert [row.attempts for row in _rows(job_id)] == [2, 1, 2]

    # The holders that lost their shards can neither renew nor finish nor release them.
    assert not renew_shard(factory, second.id, "b:1:ns:t", 60)
    assert not finish_shard(factory, second.id, "b:1:ns:t", "jobs/x.npz", 1.0)
    release_shard(factory, second.id, "b:1:ns:t")
    assert _rows(job_id)[0].status == "running"
    assert renew_shard(factory, second.id, "c:1:ns:t", 60)
    assert finish_shard(factory, second.id, "c:1:ns:t", "jobs/x.npz", 1.0)
    done = _rows(job_id)[0]
    assert done.status == "done" and done.embedded_by == "c:1:ns" and done.lease_owner is None
    release_shard(factory, _rows(job_id)[1].id, "c:1:ns:t")
    assert _claim(job_id, "d:1:ns:t").index == 1  # given back: free at once
    assert _claim(job_id, "e:1:ns:t") is None  # 0 done, 1 and 2 held


def test_a_helper_does_nothing_for_a_job_that_is_not_running_or_has_no_free_shard(
    make_job: Any,
) -> None:
    from app.runner.shards import help_embed_shards

    for status in ("queued", "succeeded", "cancelled"):
        job_id = make_job(status)
        _plan(job_id)
        assert help_embed_shards(job_id, prefer=0) == 0
        assert {row.status for row in _rows(job_id)} == {"pending"}  # nothing was claimed
    cancelling = make_job("running", cancel_requested=True)
    _plan(cancelling)
    assert help_embed_shards(cancelling) == 0
    assert {row.status for row in _rows(cancelling)} == {"pending"}
    busy = make_job("running")
    _plan(busy)
    for index in range(3):
        _claim(busy, f"other:{index}:ns:t")
    assert help_embed_shards(busy) == 0  # a surplus or redelivered task
    assert help_embed_shards("no-such-job") == 0
