"""app.runner.run.run_job and its callbacks, on the parts that do not need the engine's pipeline."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

JOBS = "/api/v1/jobs"


def _row(job_id: str) -> Any:
    from app.db.models import Job
    from app.db.session import session_scope

    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        session.expunge(job)
        return job


def test_finished_jobs_are_left_alone(dataset: dict[str, Any], make_job: Any) -> None:
    from app.runner.run import run_job

    for status in ("succeeded", "failed", "cancelled"):
        job_id = make_job(
            dataset["id"], status=status, error="kept" if status == "failed" else None
        )
        assert run_job(job_id) == status
        row = _row(job_id)
        assert row.status == status and row.attempts == 0 and row.started_at is None
    assert run_job("no-such-job") is None


def test_cancel_before_start_cancels(dataset: dict[str, Any], make_job: Any) -> None:
    from app.runner.run import run_job

    job_id = make_job(dataset["id"], status="queued", cancel_requested=True)
    assert run_job(job_id) == "cancelled"
    assert _row(job_id).finished_at is not None


def test_gives_up_after_max_attempts(dataset: dict[str, Any], make_job: Any) -> None:
    from app.runner.run import run_job

    job_id = make_job(dataset["id"], status="running", attempts=5, lease_expires_at=None)
    assert run_job(job_id) == "failed"
    assert "gave up after 5 attempts" in _row(job_id).error


def test_bad_stored_config_fails_with_the_message(dataset: dict[str, Any], make_job: Any) -> None:
    from app.runner.run import run_job

    job_id = make_job(dataset["id"], overrides={"scan": {"epochs": -3}})
    assert run_job(job_id) == "failed"
    row = _row(job_id)
    assert row.error.startswith("ConfigError: scan.epochs") and row.attempts == 1
    assert row.started_at is not None and row.finished_at is not None and row.duration_s >= 0


def test_missing_stored_image_fails_the_job(
    client: TestClient, dataset: dict[str, Any], make_job: Any, data_dir: Path
) -> None:
    from app.runner.run import run_job

    first = client.get(f"/api/v1/datasets/{dataset['id']}/images").json()["items"][0]
    stored = next((data_dir / "datasets" / dataset["id"] / "images").glob("000000.*"))
    stored.unlink()
    job_id = make_job(dataset["id"])
    assert run_job(job_id) == "failed"
    assert "1 stored images could not be read" in _row(job_id).error
    assert first["position"] == 0


def test_stop_flag_reads_cancel_and_shutdown(dataset: dict[str, Any], make_job: Any) -> None:
    from app.db.models import Job
    from app.db.session import get_sessionmaker, session_scope
    from app.runner.engine_callbacks import StopFlag

    job_id = make_job(dataset["id"], status="running")
    shutdown = threading.Event()
    flag = StopFlag(job_id, get_sessionmaker(), interval_s=3600, shutdown=shutdown)
    assert flag() is False
    with session_scope() as session:
        session.get(Job, job_id).cancel_requested = True  # type: ignore[union-attr]
    assert flag() is False  # throttled: the DB is not read again within the interval
    flag.interval_s = 0
    assert flag() is True and flag.cancelled

    other = StopFlag(make_job(dataset["id"], status="running"), get_sessionmaker(), 0, shutdown)
    assert other() is False
    shutdown.set()
    assert other() is True and not other.cancelled


def test_progress_writer_throttles_and_times_stages(dataset: dict[str, Any], make_job: Any) -> None:
    from app.db.session import get_sessionmaker
    from app.runner.engine_callbacks import ProgressWriter
    from scan_engine.results import ProgressEvent

    job_id = make_job(dataset["id"], status="running")
    writer = ProgressWriter(job_id, get_sessionmaker(), interval_s=3600)
    writer(ProgressEvent("pretext", 0.0, 0.0, None, "starting"))
    row = _row(job_id)
    assert (row.stage, row.progress, row.eta_s, row.message) == ("pretext", 0.0, None, "starting")
    writer(ProgressEvent("pretext", 0.5, 0.2, 40.0))
    assert _row(job_id).progress == 0.0  # throttled
    time.sleep(0.01)
    writer(ProgressEvent("mine", 0.0, 0.6, 12.5))  # a stage change is always written
    row = _row(job_id)
    assert (row.stage, row.progress, row.eta_s) == ("mine", 0.6, 12.5)
    assert set(row.timings) == {"pretext"} and row.timings["pretext"] > 0
    # The pipeline restarting a stage that sharded embedding already reported: never backwards.
    writer(ProgressEvent("features", 0.0, 0.1, None))
    assert (_row(job_id).stage, _row(job_id).progress) == ("features", 0.6)


def test_job_left_running_by_a_dead_worker_runs_again(
    dataset: dict[str, Any], make_job: Any
) -> None:
    from app.runner.run import run_job

    job_id = make_job(
        dataset["id"], status="running", attempts=1, overrides={"seed": -1.5}, lease_expires_at=None
    )
    assert run_job(job_id) == "failed"  # it was claimed again and got as far as the config
    row = _row(job_id)
    assert row.attempts == 2 and row.error.startswith("ConfigError: seed")


def test_shutdown_leaves_the_job_queued_for_the_next_start(
    dataset: dict[str, Any], make_job: Any
) -> None:
    from app.runner.run import run_job

    job_id = make_job(dataset["id"])
    shutdown = threading.Event()
    shutdown.set()  # the process is stopping: the pipeline stops at its first step
    assert run_job(job_id, shutdown=shutdown) == "queued"
    row = _row(job_id)
    assert row.status == "queued" and row.attempts == 0 and "shutdown" in row.message


def test_embedded_worker_resumes_unfinished_jobs_at_start(
    client: TestClient, dataset: dict[str, Any], make_job: Any
) -> None:
    from app.main import create_app

    job_id = make_job(dataset["id"], overrides={"scan": {"epochs": -1}})  # fails fast
    with TestClient(create_app()) as restarted:
        deadline = time.monotonic() + 30
        while restarted.get(f"{JOBS}/{job_id}").json()["status"] == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    job = client.get(f"{JOBS}/{job_id}").json()
    assert job["status"] == "failed" and "scan.epochs" in job["error"]


def test_pretrained_route_streams_files_with_the_datasets_feature_cache(
    dataset: dict[str, Any], make_job: Any, data_dir: Path
) -> None:
    """The pretrained route hands the engine a list of files (nothing decoded) and the server's
    folders; the scratch route still loads every image as pixels at its size."""
    from app.core.config import get_settings
    from app.db.session import get_sessionmaker
    from app.runner.claim import claim_job
    from app.runner.job_files import JobFiles
    from app.runner.run import _collection, job_config
    from app.storage import object_store
    from scan_engine.config import make_config
    from scan_engine.data import ImageCollection
    from scan_engine.sources import ImageSources

    settings = get_settings()
    store = object_store(settings)
    pretrained = make_job(
        dataset["id"],
        preset="pretrained",
        backbone="efficientnet_lite0",
        config=make_config("pretrained", num_clusters=3).to_json_dict(),
    )
    claimed = claim_job(pretrained, get_sessionmaker(), settings, "test:1:a")
    assert claimed is not None and claimed.backbone == "efficientnet_lite0"
    config = job_config(claimed, settings)
    assert config.pretrained_backbone == "efficientnet_lite0" and config.image_size == 224
    assert config.models_dir == str(data_dir / "models")
    assert config.feature_cache_dir == str(data_dir / "features" / dataset["id"])
    sources = _collection(claimed, config, JobFiles(store, settings, pretrained, dataset["id"]))
    assert isinstance(sources, ImageSources) and len(sources) == 36
    assert sources.ids == claimed.image_ids and sources.class_names == dataset["class_names"]
    assert isinstance(sources.read(0), Path)  # a file to decode while streaming, not pixels

    scratch_id = make_job(dataset["id"])
    scratch = claim_job(scratch_id, get_sessionmaker(), settings, "test:1:b")
    assert scratch is not None and scratch.backbone is None
    scratch_config = job_config(scratch, settings)
    assert scratch_config.pretrained_backbone is None and scratch_config.models_dir is None
    files = JobFiles(store, settings, scratch_id, dataset["id"])
    collection = _collection(scratch, scratch_config, files)
    assert isinstance(collection, ImageCollection)
    assert tuple(collection.images.shape) == (36, 3, 32, 32)
