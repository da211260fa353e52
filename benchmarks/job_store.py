"""One job's storage overhead, local disk against an S3 store (a benchmark, not a test): the
job's wall time, the object-store requests it sends and the bytes it leaves, for a first job
(embeds the features, caches them in the store) and for later jobs on the same dataset (features
from the cache).

    PYTHONPATH=. .venv/bin/python -m benchmarks.job_store --images 2000 --repeats 3

Each backend gets a fresh embedded API (SQLite, its own DATA_DIR, jobs run in process) with the
same zip of JPEGs (benchmarks.upload_store.make_zip: the first N CIFAR-10 test images). Per
backend: one upload, one job with K=10 (pretrained preset, the bundled backbone), then
`repeats` jobs with K=5 from the cache. The S3 runs use a private SeaweedFS on loopback
(tests/seaweedfs.py) and count every request boto3 sends while each job runs. A 50-image job
runs first, unmeasured, so that neither backend pays for loading the engine. Prints one JSON
line: medians, the requests per job by type, requests per image, and stored bytes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.upload_store import counted_store, make_zip


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _run_job(client: Any, dataset_id: str, clusters: int, requests: dict[str, int]) -> dict:
    requests.clear()
    started = time.perf_counter()
    response = client.post(
        "/api/v1/jobs",
        json={"dataset_id": dataset_id, "num_clusters": clusters, "preset": "pretrained"},
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.2)
    wall = time.perf_counter() - started
    assert job["status"] == "succeeded", job["error"]
    return {
        "wall_s": wall,
        "duration_s": job["duration_s"],
        "features_from_cache": job["features_from_cache"],
        "timings": job["timings"],
        "requests": dict(requests),
    }


def _stored_bytes(root: Path | None, store: Any, prefix: str) -> int:
    if root is not None:
        return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())
    return sum(info.size for info in store.list(prefix))


def one_backend(zip_path: Path, env: dict[str, str], repeats: int) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.storage import S3ObjectStore

    store, requests = counted_store(env)
    on_s3 = isinstance(store, S3ObjectStore)
    with TestClient(create_app()) as client, zip_path.open("rb") as handle:
        response = client.post(
            "/api/v1/datasets",
            files={"file": (zip_path.name, handle, "application/zip")},
            data={"labels_from_folders": "true"},
        )
        assert response.status_code == 201, response.text
        dataset = response.json()
        after_upload = _stored_bytes(None if on_s3 else Path(env["DATA_DIR"]), store, "")
        first = _run_job(client, dataset["id"], 10, requests)
        later = [_run_job(client, dataset["id"], 5, requests) for _ in range(repeats)]
        stored = _stored_bytes(None if on_s3 else Path(env["DATA_DIR"]), store, "")
    assert first["features_from_cache"] is False
    assert all(job["features_from_cache"] for job in later)
    images = dataset["image_count"]
    return {
        "images": images,
        "first_job": {
            "wall_s": round(first["wall_s"], 2),
            "duration_s": first["duration_s"],
            "timings": first["timings"],
            "store_requests": first["requests"],
            "store_requests_per_image": round(sum(first["requests"].values()) / images, 3),
        },
        "cached_jobs": {
            "wall_s_median": round(statistics.median(job["wall_s"] for job in later), 2),
            "wall_s": [round(job["wall_s"], 2) for job in later],
            "duration_s": [job["duration_s"] for job in later],
            "store_requests": later[-1]["requests"],
        },
        "stored_bytes_after_upload": after_upload,
        "stored_bytes_after_jobs": stored,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from tests.seaweedfs import SeaweedFS

    with tempfile.TemporaryDirectory(prefix="job-store-bench-") as scratch:
        root = Path(scratch)
        zip_path = root / "cifar.zip"
        make_zip(zip_path, args.images)
        warm_up = root / "warm-up.zip"
        make_zip(warm_up, 50)
        server = SeaweedFS(root / "weed").start()
        try:
            # Loads torch, the backbone and the engine once, so that no backend pays for it.
            one_backend(warm_up, {"DATA_DIR": str(root / "data-warm-up")}, 1)
            figures: dict[str, Any] = {}
            for backend in ("local", "s3"):
                env = {"DATA_DIR": str(root / f"data-{backend}")}
                if backend == "s3":
                    env |= server.settings_env() | {"S3_PREFIX": f"{uuid.uuid4().hex[:8]}/"}
                figures[backend] = one_backend(zip_path, env, args.repeats)
        finally:
            server.stop()
    print(
        json.dumps(
            {
                "benchmark": "job_store",
                "repeats": args.repeats,
                **figures,
                "cpu": f"{_cpu()}, 2 cores",
                "date": time.strftime("%Y-%m-%d"),
            }
        )
    )


if __name__ == "__main__":
    main()
