"""A job's files on a worker (app.runner.job_files) over the real stores: on S3 a scratch folder
filled from the store (checkpoints yes, an earlier attempt's result files no), checkpoints
pushed when a stage begins, results published by key; on the local store the folders are the
store. A store that is down fails the job with a clear message and marks nothing succeeded."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.seaweedfs import SeaweedFS
from tests.service_support import upload_zip, use_settings


@pytest.fixture
def s3_settings(seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from app.core.config import get_settings

    prefix = f"files-{uuid.uuid4().hex[:10]}/"
    use_settings(
        monkeypatch, DATA_DIR=str(tmp_path / "data"), S3_PREFIX=prefix, **seaweedfs.settings_env()
    )
    return get_settings()


class _Event:
    def __init__(self, stage: str) -> None:
        self.stage = stage


def test_scratch_on_s3_restores_checkpoints_and_pushes_new_ones(s3_settings: Any) -> None:
    from app.runner.job_files import JobFiles
    from app.storage import Storage, object_store

    store = object_store(s3_settings)
    store.put_bytes("jobs/j1/work/pretext.pt", b"pretext checkpoint")
    store.put_bytes("jobs/j1/work/model.pt", b"model of a killed attempt")
    store.put_bytes("jobs/j1/work/report.json", b"{}")
    store.put_bytes("features/d1/abc.npz", b"cached features")
    files = JobFiles(store, s3_settings, "j1", "d1")
    assert files.scratch is not None
    (files.scratch / "work").mkdir(parents=True)
    (files.scratch / "work" / "scan.pt").write_bytes(b"stale, from an attempt killed here")
    dead = files.scratch.parent / "dead-job"  # a run on this host that was killed
    (dead / "work").mkdir(parents=True)
    (dead / ".lock").write_bytes(b"")
    os.utime(dead / ".lock", (time.time() - 60, time.time() - 60))
    alive = Storage.lock_folder(files.scratch.parent / "running-job")  # another run, here

    files.prepare()
    assert not dead.exists() and (files.scratch.parent / "running-job").is_dir()
    alive.close()
    assert sorted(p.name for p in files.work_dir.iterdir()) == ["pretext.pt"]
    assert (files.scratch / ".lock").is_file()  # held while the run lasts
    assert (files.feature_cache_dir / "abc.npz").read_bytes() == b"cached features"

    seen: list[str] = []
    progress = files.with_checkpoints(lambda event: seen.append(event.stage))
    progress(_Event("pretext"))
    (files.work_dir / "mine.pt").write_bytes(b"mine checkpoint")
    (files.work_dir / "scan.tmp").write_bytes(b"half written")
    progress(_Event("mine"))  # same stage again: nothing to push yet
    progress(_Event("scan"))
    assert seen == ["pretext", "mine", "scan"]
    assert store.get_bytes("jobs/j1/work/mine.pt") == b"mine checkpoint"
    assert not store.exists("jobs/j1/work/scan.tmp")

    (files.work_dir / "model.pt").write_bytes(b"the new model")
    with pytest.raises(ValueError, match="not a file of job j1"):
        files.publish(str(files.scratch.parent / "elsewhere.pt"))
    assert files.publish(str(files.work_dir / "model.pt")) == "jobs/j1/work/model.pt"
    assert store.get_bytes("jobs/j1/work/model.pt") == b"the new model"
    files.close()
    assert not files.scratch.exists()


def test_on_the_local_store_the_folders_are_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.core.config import get_settings
    from app.runner.job_files import JobFiles
    from app.storage import object_store

    use_settings(monkeypatch, DATA_DIR=str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    files = JobFiles(object_store(get_settings()), get_settings(), "j2", "d2")
    files.prepare()
    assert files.scratch is None
    assert files.work_dir == (tmp_path / "data" / "jobs" / "j2" / "work").resolve()
    assert files.feature_cache_dir == (tmp_path / "data" / "features" / "d2").resolve()
    assert files.image_paths(["datasets/d2/images/000000.png"]) == [
        (tmp_path / "data" / "datasets" / "d2" / "images" / "000000.png").resolve()
    ]
    (files.work_dir / "model.pt").write_bytes(b"m")
    assert files.publish(str(files.work_dir / "model.pt")) == "jobs/j2/work/model.pt"


def test_a_model_path_is_stored_only_as_a_key(s3_settings: Any) -> None:
    from app.runner.results import save_results
    from app.storage import object_store
    from scan_engine.results import PipelineResult

    result = PipelineResult([], {}, {}, {}, [], {}, model_path="/somewhere/model.pt")
    with pytest.raises(ValueError, match="by key"):
        save_results(None, "j3", [], result, object_store(s3_settings))  # type: ignore[arg-type]


def test_a_store_outage_fails_the_job_with_a_clear_message(
    private_seaweedfs: SeaweedFS,
    shapes_zip: Path,
    make_job: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.db.models import Job
    from app.db.session import session_scope
    from app.main import create_app
    from app.runner.run import run_job

    use_settings(
        monkeypatch,
        DATA_DIR=str(tmp_path / "data"),
        S3_TIMEOUT_S="2",
        S3_MAX_ATTEMPTS="1",
        **private_seaweedfs.settings_env(),
    )
    with TestClient(create_app()) as client:
        dataset = upload_zip(client, shapes_zip.read_bytes()).json()
    private_seaweedfs.stop()
    job_id = make_job(dataset["id"])
    assert run_job(job_id) == "failed"
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.model_path is None
        assert job.error.startswith("StorageUnavailable: the object store could not be reached")
        assert "resumes from its last stored checkpoint" in job.error
    assert not (tmp_path / "data" / "scratch" / "jobs" / job_id).exists()


def _png(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_on_s3_the_pretrained_route_fetches_images_only_when_it_reads_them(
    s3_settings: Any,
) -> None:
    from app.runner.job_files import JobFiles
    from app.storage import object_store
    from scan_engine.data import ImageDecodeError
    from scan_engine.feature_cache import content_key
    from scan_engine.sources import ImageSources

    store = object_store(s3_settings)
    keys = [f"datasets/d5/images/{i}.png" for i in range(300)]
    for i, key in enumerate(keys[:-1]):  # the last one was never stored
        store.put_bytes(key, _png(i))
    ids = [str(i) for i in range(300)]
    files = JobFiles(store, s3_settings, "j5", "d5")
    files.prepare()
    sources = files.image_sources(ids, keys, labels=[i % 3 for i in range(300)])
    images = files.scratch / "images"
    assert not images.exists()  # listed and signed, nothing fetched

    # Signed exactly as fetched copies sign: the feature cache key does not depend on a download.
    fetched = JobFiles(store, s3_settings, "j6", "d5")
    fetched.prepare()
    copies = ImageSources.from_files(
        list(zip(ids[:-1], fetched.image_paths(keys[:-1]), strict=True))
    )
    lazy = files.image_sources(ids[:-1], keys[:-1])
    assert content_key(lazy) == content_key(copies)
    assert content_key(sources) != content_key(lazy)  # the missing image is part of the key

    assert sources.read(3).read_bytes() == _png(3)
    assert len(list(images.rglob("*.png"))) == 256  # the first block, not the whole set
    with pytest.raises(ImageDecodeError, match="not in the store"):
        sources.read(299)
    assert len(list(images.rglob("*.png"))) == 299
    files.close()
    fetched.close()


def test_a_second_job_on_s3_reads_no_image_when_the_features_are_cached(
    seaweedfs: SeaweedFS, shapes_zip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.core.config import get_settings
    from app.main import create_app
    from app.storage import object_store
    from tests.e2e.flow import FINISHED, wait_for

    use_settings(
        monkeypatch,
        DATA_DIR=str(tmp_path / "data"),
        S3_PREFIX=f"cached-{uuid.uuid4().hex[:10]}/",
        **seaweedfs.settings_env(),
    )
    image_reads: list[str] = []

    def count(params: dict[str, Any], **_: Any) -> None:
        if "/images/" in params.get("Key", ""):
            image_reads.append(params["Key"])

    client_s3 = object_store(get_settings())._client()  # type: ignore[attr-defined]
    client_s3.meta.events.register("before-parameter-build.s3.GetObject", count)
    overrides = {"image_size": 64, "scan": {"epochs": 5, "num_heads": 2}}
    with TestClient(create_app()) as client:
        dataset = upload_zip(client, shapes_zip.read_bytes()).json()
        jobs = []
        for clusters in (3, 4):
            image_reads.clear()
            response = client.post(
                "/api/v1/jobs",
                json={
                    "dataset_id": dataset["id"],
                    "num_clusters": clusters,
                    "preset": "pretrained",
                    "overrides": overrides,
                },
            )
            assert response.status_code == 202, response.text
            job = wait_for(client, response.json()["id"], FINISHED, 120)
            assert job["status"] == "succeeded", job["error"]
            jobs.append((job, len(image_reads)))
    (first, first_reads), (second, second_reads) = jobs
    assert first["features_from_cache"] is False and first_reads == dataset["image_count"]
    assert second["features_from_cache"] is True and second_reads == 0
