"""Sharded embedding with no other worker to help (app.runner.shards): the job's own worker
embeds every shard itself instead of waiting on the tasks it sent, gathers them into the
dataset's feature cache and leaves no shard behind; a later job on the dataset shards nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

OVERRIDES = {"image_size": 32, "scan": {"epochs": 5}, "selflabel": {"epochs": 2}}


class QueueWithoutWorkers:
    """A shard dispatcher whose tasks no worker ever takes: it keeps what was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[int]]] = []

    def enqueue_shards(self, job_id: str, indexes: list[int]) -> None:
        self.sent.append((job_id, list(indexes)))


@pytest.mark.slow
def test_a_lone_worker_embeds_every_shard_itself(
    dataset: dict[str, Any], make_job: Any, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.core.config import get_settings
    from app.db.models import FeatureShard, Job
    from app.db.session import session_scope
    from app.runner.run import run_job
    from app.runner.shards import help_embed_shards
    from scan_engine.config import make_config

    monkeypatch.setenv("EMBED_SHARD_IMAGES", "8")
    get_settings.cache_clear()
    queue = QueueWithoutWorkers()
    jobs = [
        make_job(
            dataset["id"],
            num_clusters=k,
            preset="pretrained",
            backbone="efficientnet_lite0",
            overrides=OVERRIDES,
            config=make_config("pretrained", num_clusters=k, **OVERRIDES).to_json_dict(),
        )
        for k in (3, 4)
    ]
    assert run_job(jobs[0], shard_dispatcher=queue) == "succeeded"
    assert queue.sent == [(jobs[0], [0, 1, 2, 3, 4])]
    assert help_embed_shards(jobs[0], prefer=2) == 0  # a task taken after the job: nothing
    with session_scope() as session:
        job = session.get(Job, jobs[0])
        assert job is not None
        assert job.run_report["feature_shards"]["shards"] == 5
        assert job.run_report["feature_shards"]["workers"] == 1
        assert job.run_report["features_from_cache"] is False
        assert "features embedded in 5 shards by 1 worker" in job.notes
        assert session.scalars(select(FeatureShard)).all() == []
    assert not (data_dir / "jobs" / jobs[0] / "feature_shards").exists()
    assert len(list((data_dir / "features" / dataset["id"]).glob("*.npz"))) == 1

    assert run_job(jobs[1], shard_dispatcher=queue) == "succeeded"
    assert len(queue.sent) == 1  # cached: nothing to shard
    with session_scope() as session:
        job = session.get(Job, jobs[1])
        assert job is not None and job.run_report["features_from_cache"] is True
        assert "feature_shards" not in job.run_report
