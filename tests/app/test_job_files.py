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
