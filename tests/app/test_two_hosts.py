"""Two hosts that share nothing but PostgreSQL, Redis and the object store (a real SeaweedFS):
the API (this process) with its own DATA_DIR, and a real `celery worker` process with another,
empty one. A job runs end to end; the gallery's images come from the store through presigned
redirects; prediction loads the model from the store; deleting the job, then the dataset,
removes their objects.
A worker killed with SIGKILL mid-job is replaced by one on a third, empty DATA_DIR, which
resumes from the checkpoint the first one left in the store.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.e2e.flow import FAST_OVERRIDES, FINISHED, upload_shapes, wait_for
from tests.seaweedfs import SeaweedFS
from tests.service_support import (
    celery_service_env,
    create_api_key,
    files_under,
    png_bytes,
    print_log_tails,
    start_celery_worker,
    stop_process,
    upload_zip,
)


@contextmanager
def _hosts(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **extra: str
) -> Iterator[dict[str, Any]]:
    store = seaweedfs.settings_env() | {"S3_PREFIX": f"two-hosts-{uuid.uuid4().hex[:10]}/"}
    api_data = tmp_path / "api-data"
    with celery_service_env(tmp_path, monkeypatch, DATA_DIR=str(api_data), **store, **extra) as env:
        worker_data = tmp_path / "worker-data"
        worker_data.mkdir()
        yield {
            "api_data": api_data,
            "worker_data": worker_data,
            "worker_env": env | {"DATA_DIR": str(worker_data)},
            "prefix": store["S3_PREFIX"],
        }


@pytest.fixture
def hosts(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, Any]]:
    """The API's settings (set for this process) and the worker's environment."""
    with _hosts(seaweedfs, tmp_path, monkeypatch) as hosts:
        yield hosts


def _keys(server: SeaweedFS, prefix: str) -> set[str]:
    pages = (
        server.client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=server.bucket, Prefix=prefix)
    )
    return {item["Key"][len(prefix) :] for page in pages for item in page.get("Contents", [])}


def _follow(response: httpx.Response) -> httpx.Response:
    """The presigned redirect, followed outside the API (as a browser does)."""
    assert response.status_code == 307, response.text
    assert "X-Amz-Signature=" in response.headers["location"]
    return httpx.get(response.headers["location"], timeout=10)


@pytest.mark.timeout(180)
def test_a_job_runs_on_a_worker_that_shares_only_db_broker_and_store(
    hosts: dict[str, Any], seaweedfs: SeaweedFS, shapes_zip: Path, tmp_path: Path
) -> None:
    from app.main import create_app

    log_path = tmp_path / "worker.log"
    with TestClient(create_app()) as client:
        client.headers["Authorization"] = f"Bearer {create_api_key('two-hosts')}"
        assert client.get("/readyz").json()["storage_backend"] == "s3"
        dataset = upload_shapes(client, shapes_zip)
        worker = start_celery_worker(hosts["worker_env"], log_path, name="other-host")
        try:
            response = client.post(
                "/api/v1/jobs",
                json={
                    "dataset_id": dataset["id"],
                    "num_clusters": 3,
                    "preset": "tiny",
                    "overrides": FAST_OVERRIDES,
                },
            )
            assert response.status_code == 202, response.text
            job = wait_for(client, response.json()["id"], FINISHED, timeout_s=150)
        except BaseException:
            print(log_path.read_text()[-6000:])
            raise
        finally:
            stop_process(worker)
        assert job["status"] == "succeeded", job["error"]

        # Everything the run made is in the store, under the job's prefix.
        stored = _keys(seaweedfs, hosts["prefix"])
        job_keys = {key for key in stored if key.startswith(f"jobs/{job['id']}/")}
        assert {
            f"jobs/{job['id']}/work/model.pt",
            f"jobs/{job['id']}/work/report.json",
            f"jobs/{job['id']}/work/pretext.pt",  # the checkpoints a new worker resumes from
            f"jobs/{job['id']}/embedding_2d.npy",
        } <= job_keys
        # Neither host keeps a copy: the API's disk holds no dataset, the worker's no scratch.
        for root in (hosts["api_data"], hosts["worker_data"]):
            assert not (root / "datasets").exists() and not (root / "jobs").exists()
        assert files_under(hosts["worker_data"] / "scratch") == []

        # The gallery: the owner is checked by the API, the bytes come from the store.
        clusters = client.get(f"/api/v1/jobs/{job['id']}/clusters").json()["clusters"]
        biggest = max(clusters, key=lambda c: c["size"])["index"]
        members = client.get(f"/api/v1/jobs/{job['id']}/clusters/{biggest}/members").json()
        image_id = members["items"][0]["image_id"]
        base = f"/api/v1/datasets/{dataset['id']}/images/{image_id}"
        thumbnail = _follow(client.get(base, params={"thumbnail": "true"}, follow_redirects=False))
        assert thumbnail.status_code == 200 and thumbnail.content[:3] == b"\xff\xd8\xff"  # JPEG
        original = _follow(client.get(base, follow_redirects=False))
        assert original.status_code == 200 and len(original.content) > 0
        prototype = client.get(
            f"/api/v1/jobs/{job['id']}/clusters/{biggest}/prototype", follow_redirects=False
        )
        assert _follow(prototype).status_code == 200
        other = TestClient(client.app)
        other.headers["Authorization"] = f"Bearer {create_api_key('someone-else')}"
        assert other.get(base, follow_redirects=False).status_code == 404  # no URL for others
        assert client.get(f"/api/v1/jobs/{job['id']}/map").json()["total"] == 36

        predicted = client.post(
            f"/api/v1/jobs/{job['id']}/predict",
            files=[("file", ("new.png", png_bytes((32, 32)), "image/png"))],
        )
        assert predicted.status_code == 200, predicted.text
        assert len(predicted.json()["items"]) == 1
        model_copy = hosts["api_data"] / "scratch" / "models" / job["id"]
        assert [p.suffix for p in model_copy.iterdir()] == [".pt"]  # fetched once, kept

        assert client.delete(f"/api/v1/jobs/{job['id']}").status_code == 204
        left = _keys(seaweedfs, hosts["prefix"])
        assert left and not any(key.startswith(f"jobs/{job['id']}/") for key in left)
        assert not model_copy.exists()
        assert client.delete(f"/api/v1/datasets/{dataset['id']}").status_code == 204
        assert _keys(seaweedfs, hosts["prefix"]) == set()
    assert "job finished" in log_path.read_text()


def _lease_pid(job_id: str) -> int:
    from app.db.models import Job
    from app.db.session import session_scope

    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.lease_owner, "the running job holds no lease"
        return int(job.lease_owner.split(":")[1])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_worker_on_another_host_resumes_from_the_checkpoint_in_the_store(
    seaweedfs: SeaweedFS,
    shapes_zip: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.main import create_app

    quick_takeover = {
        "CELERY_VISIBILITY_TIMEOUT_S": "3",
        "JOB_LEASE_S": "6",
        "JOB_HEARTBEAT_S": "1",
        "REAPER_INTERVAL_S": "2",
    }
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    with (
        _hosts(seaweedfs, tmp_path, monkeypatch, **quick_takeover) as hosts,
        TestClient(create_app()) as client,
    ):
        client.headers["Authorization"] = f"Bearer {create_api_key('two-hosts')}"
        dataset = upload_shapes(client, shapes_zip)
        first = start_celery_worker(hosts["worker_env"], logs[0], name="host-a")
        second = None
        try:
            response = client.post(
                "/api/v1/jobs",
                json={
                    "dataset_id": dataset["id"],
                    "num_clusters": 3,
                    "preset": "tiny",
                    # SCAN long enough (~6 s) that the job still runs when the checkpoint is
                    # seen in the store: with 2 epochs a quiet CPU finishes within a second.
                    "overrides": FAST_OVERRIDES | {"scan": {"epochs": 40, "num_heads": 1}},
                },
            )
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            checkpoint = f"{hosts['prefix']}jobs/{job_id}/work/pretext.pt"
            raw = seaweedfs.client()
            deadline = time.monotonic() + 120
            while f"jobs/{job_id}/work/pretext.pt" not in _keys(seaweedfs, hosts["prefix"]):
                job = client.get(f"/api/v1/jobs/{job_id}").json()
                assert job["status"] not in FINISHED, job
                assert time.monotonic() < deadline, "the pretext checkpoint never reached the store"
                time.sleep(0.2)
            written = raw.head_object(Bucket=seaweedfs.bucket, Key=checkpoint)["ETag"]
            os.kill(_lease_pid(job_id), signal.SIGKILL)  # the pool process running the job
            first.kill()  # and the whole worker: that host is gone
            first.wait()

            other_host = tmp_path / "worker-b-data"
            other_host.mkdir()
            second_env = hosts["worker_env"] | {"DATA_DIR": str(other_host)}
            second = start_celery_worker(second_env, logs[1], name="host-b")
            job = wait_for(client, job_id, FINISHED, 180)
            assert job["status"] == "succeeded", job["error"]
            assert job["attempts"] == 2
            log = logs[1].read_text(errors="replace")
            assert "resuming: stage pretext loaded" in log  # not trained again
            assert raw.head_object(Bucket=seaweedfs.bucket, Key=checkpoint)["ETag"] == written
            assert client.get(f"/api/v1/jobs/{job_id}/assignments").json()["total"] == 36
        except BaseException:
            print_log_tails(logs)
            raise
        finally:
            for worker in (first, second):
                if worker is not None:
                    stop_process(worker)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_feature_cache_serves_a_worker_on_another_host(
    seaweedfs: SeaweedFS, shapes_zip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pretrained route (the default): the first job's features, cached in the store under
    the dataset, spare a second job on another host (empty DATA_DIR) the backbone pass."""
    from app.main import create_app

    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    with (
        _hosts(seaweedfs, tmp_path, monkeypatch) as hosts,
        TestClient(create_app()) as client,
    ):
        client.headers["Authorization"] = f"Bearer {create_api_key('two-hosts')}"
        dataset = upload_shapes(client, shapes_zip)
        jobs = []
        for index, log in enumerate(logs):
            data_dir = tmp_path / f"worker-{index}-data"
            data_dir.mkdir()
            worker = start_celery_worker(
                hosts["worker_env"] | {"DATA_DIR": str(data_dir)}, log, name=f"host-{index}"
            )
            try:
                response = client.post(
                    "/api/v1/jobs", json={"dataset_id": dataset["id"], "num_clusters": 3 + index}
                )
                assert response.status_code == 202, response.text
                jobs.append(wait_for(client, response.json()["id"], FINISHED, timeout_s=180))
            except BaseException:
                print(log.read_text(errors="replace")[-5000:])
                raise
            finally:
                stop_process(worker)
            assert jobs[-1]["status"] == "succeeded", jobs[-1]["error"]
            assert jobs[-1]["route"] == "pretrained"
            if index == 0:
                cached = {
                    key
                    for key in _keys(seaweedfs, hosts["prefix"])
                    if key.startswith(f"features/{dataset['id']}/")
                }
                assert cached, "the first job left no features in the store"
        assert [job["features_from_cache"] for job in jobs] == [False, True]


# Sharded embedding: the 36 shapes in shards of 8 (5 shards), heads trained briefly.
SHARDED = {"EMBED_SHARD_IMAGES": "8", "JOB_LEASE_S": "6", "JOB_HEARTBEAT_S": "1"}
SHARDED_JOB = {
    "num_clusters": 3,
    "overrides": {"image_size": 32, "scan": {"epochs": 5}, "selflabel": {"epochs": 2}},
}


def _wait_until_ready(logs: list[Path], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() and " ready." in p.read_text(errors="replace") for p in logs):
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.2)


def _shard_rows(job_id: str) -> list[Any]:
    from sqlalchemy import select

    from app.db.models import FeatureShard
    from app.db.session import session_scope

    with session_scope() as session:
        rows = session.scalars(select(FeatureShard).where(FeatureShard.job_id == job_id)).all()
        session.expunge_all()
        return list(rows)


def _check_sharded_job(
    client: TestClient, seaweedfs: SeaweedFS, prefix: str, job: dict[str, Any], dataset_id: str
) -> dict[str, Any]:
    """What every sharded job leaves: all images clustered, the cache entry, no shard left."""
    assert job["status"] == "succeeded", job["error"]
    shards = job["run_report"]["feature_shards"]
    assert shards["shards"] == 5 and shards["images"] == 36
    assert sum(shards["shards_by_worker"].values()) == 5
    assert job["features_from_cache"] is False  # this job embedded them, in shards
    workers = "1 worker" if shards["workers"] == 1 else f"{shards['workers']} workers"
    assert f"features embedded in 5 shards by {workers}" in job["notes"]
    assert client.get(f"/api/v1/jobs/{job['id']}/assignments").json()["total"] == 36
    stored = _keys(seaweedfs, prefix)
    assert [key for key in stored if key.startswith(f"features/{dataset_id}/")], "no cache entry"
    assert not [key for key in stored if "feature_shards" in key]
    assert _shard_rows(job["id"]) == []
    return shards


def _pid_of_helper_holding_a_shard(job_id: str, timeout_s: float = 60) -> int:
    """The pool process of a worker, not the job's own, while it holds a shard of the job."""
    from sqlalchemy import select

    from app.db.models import Job
    from app.db.session import session_scope

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with session_scope() as session:
            coordinator = session.scalar(select(Job.lease_owner).where(Job.id == job_id))
        for row in _shard_rows(job_id) if coordinator else []:
            if row.status == "running" and row.lease_owner:
                pid = int(row.lease_owner.split(":")[1])
                if pid != int(coordinator.split(":")[1]):
                    return pid
        time.sleep(0.02)
    raise AssertionError("no other worker ever held a shard")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_workers_embed_in_shards_and_a_killed_workers_shard_is_taken_over(
    seaweedfs: SeaweedFS, shapes_zip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMBED_SHARD_IMAGES=8: a job's 36 images are embedded in 5 shards by both workers, the
    other one's heads train on the gathered features. Then a second dataset's job, whose
    helper is killed (SIGKILL) while it holds a shard: the job's worker takes it over."""
    from app.main import create_app

    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    workers = []
    with (
        _hosts(seaweedfs, tmp_path, monkeypatch, **SHARDED) as hosts,
        TestClient(create_app()) as client,
    ):
        client.headers["Authorization"] = f"Bearer {create_api_key('two-hosts')}"
        dataset = upload_shapes(client, shapes_zip)
        try:
            for index, log in enumerate(logs):
                data_dir = tmp_path / f"worker-{index}-data"
                data_dir.mkdir()
                env = hosts["worker_env"] | {"DATA_DIR": str(data_dir)}
                workers.append(start_celery_worker(env, log, name=f"host-{index}"))
            _wait_until_ready(logs)
            response = client.post(
                "/api/v1/jobs", json={"dataset_id": dataset["id"], **SHARDED_JOB}
            )
            assert response.status_code == 202, response.text
            job = wait_for(client, response.json()["id"], FINISHED, timeout_s=180)
            shards = _check_sharded_job(client, seaweedfs, hosts["prefix"], job, dataset["id"])
            assert shards["workers"] == 2
            for log in logs:  # both embedded at least one shard
                assert "embedded shard" in log.read_text(errors="replace"), log.name

            # The same images without labels: another dataset, so nothing cached for it.
            other = upload_zip(client, shapes_zip.read_bytes(), labels_from_folders="false")
            assert other.status_code == 201 and other.json()["id"] != dataset["id"]
            response = client.post(
                "/api/v1/jobs", json={"dataset_id": other.json()["id"], **SHARDED_JOB}
            )
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            victim = _pid_of_helper_holding_a_shard(job_id)
            # "pid (name) S ppid ...": the helper's worker process is its pool's parent.
            parent = int(Path(f"/proc/{victim}/stat").read_text().rpartition(")")[2].split()[1])
            helper = next(worker for worker in workers if worker.pid == parent)
            os.kill(victim, signal.SIGKILL)
            helper.kill()  # and the whole worker: that host is gone
            helper.wait()
            job = wait_for(client, job_id, FINISHED, timeout_s=180)
            _check_sharded_job(client, seaweedfs, hosts["prefix"], job, other.json()["id"])
            assert job["attempts"] == 1  # the job's own worker went on
            survivor = logs[1 - workers.index(helper)].read_text(errors="replace")
            assert "taking over shard" in survivor
        except BaseException:
            print_log_tails(logs)
            raise
        finally:
            for worker in workers:
                stop_process(worker)
