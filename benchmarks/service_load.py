"""End-to-end service figures (a benchmark, not a test): upload + clustering of a 2,000-image zip
with per-stage times, then GET /jobs/{id} and assignments latency under concurrent clients.

    .venv/bin/python -m benchmarks.service_load --images 2000 --clients 50 --budget-s 300

Starts the embedded service (SQLite, in-process worker) on a temporary DATA_DIR over loopback and
prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.browser import run_server, wait_for_job


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _load(base: str, paths: list[str], clients: int, requests_each: int) -> dict[str, Any]:
    timings: dict[str, list[float]] = {path: [] for path in paths}
    errors = 0

    async def client(index: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            for request in range(requests_each):
                path = paths[(index + request) % len(paths)]
                started = time.perf_counter()
                response = await http.get(path)
                timings[path].append(time.perf_counter() - started)
                errors += response.status_code != 200

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": sum(len(v) for v in timings.values()),
        "errors": errors,
        "requests_per_s": round(sum(len(v) for v in timings.values()) / wall, 1),
        "latency_ms": {
            path: {
                "p50": round(1000 * statistics.median(v), 1),
                "p99": round(1000 * _percentile(v, 0.99), 1),
            }
            for path, v in timings.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests-each", type=int, default=40)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--budget-s", type=float, default=300, help="the job's time budget")
    args = parser.parse_args()
    from scan_engine.sample_data import make_shapes_zip

    with tempfile.TemporaryDirectory(prefix="scan-load-") as tmp:
        work = Path(tmp)
        env = {"DATA_DIR": str(work / "data"), "LOG_LEVEL": "WARNING"}
        with run_server(env, work / "server.log") as base:
            zip_path = make_shapes_zip(
                work / "shapes.zip",
                classes=args.clusters,
                per_class=args.images // args.clusters,
                image_size=64,
            )
            zip_mb = round(zip_path.stat().st_size / 2**20, 1)
            started = time.perf_counter()
            with zip_path.open("rb") as handle:
                response = httpx.post(
                    f"{base}/api/v1/datasets",
                    timeout=600,
                    files={"file": ("shapes.zip", handle, "application/zip")},
                    data={"labels_from_folders": "true"},
                )
            response.raise_for_status()
            upload_s = time.perf_counter() - started
            dataset = response.json()
            started = time.perf_counter()
            response = httpx.post(
                f"{base}/api/v1/jobs",
                timeout=60,
                json={
                    "dataset_id": dataset["id"],
                    "num_clusters": args.clusters,
                    "preset": args.preset,
                    "overrides": {"time_budget_s": args.budget_s},
                },
            )
            response.raise_for_status()
            job = wait_for_job(base, response.json()["id"], timeout_s=args.budget_s * 4 + 600)
            job_s = time.perf_counter() - started
            paths = [f"/api/v1/jobs/{job['id']}", f"/api/v1/jobs/{job['id']}/assignments?limit=100"]
            load = asyncio.run(_load(base, paths, args.clients, args.requests_each))
    print(
        json.dumps(
            {
                "images": dataset.get("image_count"),
                "zip_mb": zip_mb,
                "upload_s": round(upload_s, 2),
                "job_status": job["status"],
                "job_wall_s": round(job_s, 1),
                "stage_timings_s": job.get("timings"),
                "metrics": job.get("metrics"),
                "load": load,
            }
        )
    )


if __name__ == "__main__":
    main()
