"""How long the gallery of a larger job takes to load in a real browser (a script, not a test).

    .venv/bin/python -m tests.e2e.gallery_load_time --images 2000

Starts the embedded service on a temporary DATA_DIR, uploads a generated zip of `--images`
shapes, runs a short real job (K = 10 plus a 2x overclustering), then opens the gallery in
headless chromium several times: cold (fresh browser cache) and warm (reload). The number
reported is navigation start -> every prototype image on the cards loaded (the page's
"prototypes-loaded" performance mark). Also times opening the largest cluster's first page.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.browser import REPO, api_get, launch_chromium, run_server, wait_for_job

QUICK = {
    "pretext": {"epochs": 1},
    "scan": {"epochs": 1, "num_heads": 1},
    "selflabel": {"epochs": 1},
}
MEASURE = """() => {
    const mark = performance.getEntriesByName('prototypes-loaded')[0];
    const nav = performance.getEntriesByType('navigation')[0];
    const resources = performance.getEntriesByType('resource');
    return {
        prototypes_loaded_ms: mark ? mark.startTime : null,
        dom_content_loaded_ms: nav.domContentLoadedEventEnd,
        requests: resources.length + 1,
        transferred_kb: (nav.transferSize
            + resources.reduce((sum, r) => sum + r.transferSize, 0)) / 1024,
        cards: document.querySelectorAll('#cards .card').length,
    };
}"""


def _make_job(base: str, work: Path, images: int) -> tuple[str, float]:
    from scan_engine.sample_data import make_shapes_zip

    classes = 10
    zip_path = make_shapes_zip(
        work / "shapes.zip", classes=classes, per_class=images // classes, image_size=32
    )
    with zip_path.open("rb") as handle:
        response = httpx.post(
            f"{base}/api/v1/datasets",
            files={"file": (zip_path.name, handle, "application/zip")},
            data={"labels_from_folders": "true"},
            timeout=600,
        )
    response.raise_for_status()
    dataset = response.json()
    response = httpx.post(
        f"{base}/api/v1/jobs",
        json={
            "dataset_id": dataset["id"],
            "num_clusters": classes,
            "overcluster": 2,
            "preset": "tiny",
            "overrides": QUICK,
        },
        timeout=30,
    )
    response.raise_for_status()
    started = time.monotonic()
    job = wait_for_job(base, response.json()["id"], timeout_s=1800)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['status']}: {job['error']}")
    return job["id"], time.monotonic() - started


def _measure(base: str, job_id: str, runs: int, screenshot: Path) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    url = f"{base}/jobs/{job_id}/gallery"
    cold: list[dict[str, Any]] = []
    warm: list[dict[str, Any]] = []
    members_ms: list[float] = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        for run in range(runs):
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.goto(url)
            page.wait_for_selector("body[data-prototypes-loaded='true']", timeout=60_000)
            cold.append(page.evaluate(MEASURE))
            page.reload()
            page.wait_for_selector("body[data-prototypes-loaded='true']", timeout=60_000)
            warm.append(page.evaluate(MEASURE))
            if run == 0:
                page.wait_for_timeout(500)  # the map draws after the cards
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=True)
            # Open the largest cluster: first page of members, visible thumbnails loaded.
            started = page.evaluate("performance.now()")
            page.click("#cards .card >> nth=0")
            page.wait_for_function(
                """() => {
                    const imgs = [...document.querySelectorAll('#members-grid img')];
                    return imgs.length > 0 && imgs.slice(0, 12).every(i => i.complete);
                }"""
            )
            members_ms.append(page.evaluate("performance.now()") - started)
            context.close()
        browser.close()

    def median(rows: list[dict[str, Any]], key: str) -> float:
        return round(statistics.median(row[key] for row in rows), 1)

    return {
        "cards": cold[0]["cards"],
        "cold_prototypes_loaded_ms": [round(r["prototypes_loaded_ms"], 1) for r in cold],
        "cold_median_ms": median(cold, "prototypes_loaded_ms"),
        "warm_median_ms": median(warm, "prototypes_loaded_ms"),
        "cold_dom_content_loaded_ms": median(cold, "dom_content_loaded_ms"),
        "cold_requests": cold[0]["requests"],
        "cold_transferred_kb": round(cold[0]["transferred_kb"], 1),
        "open_largest_cluster_median_ms": round(statistics.median(members_ms), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="images in the generated zip")
    parser.add_argument("--runs", type=int, default=5, help="cold + warm page loads to time")
    parser.add_argument(
        "--screenshot", type=Path, default=REPO / "test-output" / "gallery-2000.png"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="keep the service's DATA_DIR here; a succeeded job found there is measured again "
        "instead of running a new one",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gallery-load-") as tmp:
        work = Path(tmp)
        data_dir = args.data_dir.resolve() if args.data_dir else work / "data"
        env = {"DATA_DIR": str(data_dir), "LOG_FORMAT": "text", "PROGRESS_INTERVAL_S": "1"}
        with run_server(env, work / "server.log") as base:
            done = api_get(base, "/jobs", status="succeeded", limit=1)["items"]
            if done:
                job_id, job_s = done[0]["id"], done[0]["duration_s"]
            else:
                job_id, job_s = _make_job(base, work, args.images)
            images = api_get(base, f"/jobs/{job_id}/assignments", limit=1)["total"]
            result = {"images": images, "job_s": round(job_s, 1)}
            result |= _measure(base, job_id, args.runs, args.screenshot)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
