"""Upload + ingest of one zip of real JPEGs, local disk against an S3 store (a benchmark, not a
test): seconds per upload and object-store requests per image.

    PYTHONPATH=. .venv/bin/python -m benchmarks.upload_store --images 4000 --repeats 3

The JPEGs are the first N images of ../shared/datasets/cifar10_test.npz (32x32, in class
folders). Each run is a fresh embedded API (SQLite, its own DATA_DIR) answering POST
/api/v1/datasets in process; the S3 runs use a private SeaweedFS on loopback (tests/seaweedfs.py)
and count every request boto3 sends. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

DATASET = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10_test.npz"


def make_zip(path: Path, count: int) -> int:
    """A zip of `count` JPEGs in class folders; its size in bytes."""
    data = np.load(DATASET)
    images, labels, names = data["images"][:count], data["labels"][:count], data["class_names"]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for index, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            archive.writestr(f"{names[label]}/{index:05d}.jpg", buffer.getvalue())
    return path.stat().st_size


def _settings(env: dict[str, str]) -> None:
    from app.core.config import Settings, get_settings
    from app.db.session import dispose_engines

    for name in Settings.model_fields:
        os.environ.pop(name, None)
    os.environ.update(env)
    get_settings.cache_clear()
    dispose_engines()


def counted_store(env: dict[str, str]) -> tuple[Any, dict[str, int]]:
    """The settings of `env` in force, and this process's store with a tally of the requests
    boto3 sends through it, by operation (stays empty on the local store)."""
    from app.core.config import get_settings
    from app.storage import S3ObjectStore, object_store

    _settings(env)
    requests: dict[str, int] = {}

    def count(**kwargs: Any) -> None:
        name = kwargs["event_name"].split(".")[-1]
        requests[name] = requests.get(name, 0) + 1

    store = object_store(get_settings())
    if isinstance(store, S3ObjectStore):
        store._client().meta.events.register("before-send.s3", count)
    return store, requests


def one_upload(zip_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """Seconds of one POST /api/v1/datasets on a fresh service, and the S3 requests it sent."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    _, requests = counted_store(env)
    with TestClient(create_app()) as client, zip_path.open("rb") as handle:
        started = time.perf_counter()
        response = client.post(
            "/api/v1/datasets",
            files={"file": (zip_path.name, handle, "application/zip")},
            data={"labels_from_folders": "true"},
        )
        seconds = time.perf_counter() - started
    assert response.status_code == 201, response.text
    return {"seconds": seconds, "images": response.json()["image_count"], "requests": requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from tests.seaweedfs import SeaweedFS

    with tempfile.TemporaryDirectory(prefix="upload-bench-") as scratch:
        root = Path(scratch)
        zip_path = root / "cifar.zip"
        zip_bytes = make_zip(zip_path, args.images)
        server = SeaweedFS(root / "weed").start()
        try:
            figures: dict[str, Any] = {}
            for backend in ("local", "s3"):
                runs = []
                for _ in range(args.repeats):
                    env = {"DATA_DIR": str(root / f"data-{uuid.uuid4().hex[:8]}")}
                    if backend == "s3":
                        env |= server.settings_env() | {"S3_PREFIX": f"{uuid.uuid4().hex[:8]}/"}
                    runs.append(one_upload(zip_path, env))
                images = runs[0]["images"]
                requests = runs[-1]["requests"]
                figures[backend] = {
                    "seconds_median": round(statistics.median(r["seconds"] for r in runs), 2),
                    "seconds": [round(r["seconds"], 2) for r in runs],
                    "images_per_s": round(
                        images / statistics.median(r["seconds"] for r in runs), 1
                    ),
                    "store_requests": requests,
                    "store_requests_per_image": round(sum(requests.values()) / images, 3),
                }
        finally:
            server.stop()
    print(
        json.dumps(
            {
                "benchmark": "upload_store",
                "images": images,
                "zip_bytes": zip_bytes,
                "repeats": args.repeats,
                **figures,
            }
        )
    )


if __name__ == "__main__":
    main()
