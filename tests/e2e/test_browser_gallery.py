"""The web pages in a real headless browser (Debian's chromium, driven by Playwright).

A user's path: upload a zip on the start page, start a job, watch it finish on the job page, open
the gallery; then check that every cluster has a card whose prototype image loaded, that a card
opens its members, that the CSV download lists every image once, and that the overclustering can
be switched to. A screenshot of the gallery is saved to test-output/gallery.png.

In api_keys mode (production) the same person first signs in with a key on the sign-in page,
gets a session cookie, runs a job and sees the gallery's images through that cookie; after
signing out the gallery sends them back to sign in.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.browser import FINISHED, REPO, launch_chromium, run_server
from tests.e2e.browser import api_get as _api
from tests.service_support import create_api_key, use_settings

OUTPUT = REPO / "test-output"
# A few epochs of every stage: under a minute on an idle 2-core CPU, clusters worth looking at.
OVERRIDES = {"pretext": {"epochs": 3}, "scan": {"epochs": 3}, "selflabel": {"epochs": 1}}


@pytest.fixture
def live_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The service in a uvicorn subprocess, embedded mode (SQLite, in-process worker)."""
    data_dir = tmp_path / "data"
    env = {
        "DATA_DIR": str(data_dir),
        "PROGRESS_INTERVAL_S": "0.2",
        "CANCEL_CHECK_INTERVAL_S": "0.2",
        "LOG_FORMAT": "text",
    }
    use_settings(monkeypatch, **env)  # also clears the developer's own service variables
    log_path = tmp_path / "server.log"
    with run_server(env, log_path) as url:
        yield {"url": url, "data_dir": data_dir, "log": log_path}


@pytest.fixture
def browser_page() -> Iterator[Any]:
    """A Playwright page in Debian's chromium; fails (not skips) when chromium is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[dev]'")
    with sync_playwright() as playwright:
        try:
            browser = launch_chromium(playwright)
        except FileNotFoundError as error:
            missing = str(error)
        else:
            missing = ""
        if missing:
            pytest.fail(missing)  # CI installs chromium: a missing browser is a broken setup
        context = browser.new_context(
            viewport={"width": 1280, "height": 900}, accept_downloads=True
        )
        try:
            yield context.new_page()
        finally:
            context.close()
            browser.close()


def _watch_for_errors(page: Any) -> list[str]:
    """JS exceptions and failed requests seen by the page (the map may 404: reported apart)."""
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "response",
        lambda response: (
            problems.append(f"HTTP {response.status} {response.url}")
            if response.status >= 400 and "/map?" not in response.url
            else None
        ),
    )
    return problems


def _check_cards(
    page: Any, base: str, job_id: str, num_clusters: int, key: str | None = None
) -> list[dict[str, Any]]:
    """One card per non-empty cluster, largest first, each with a prototype that loaded."""
    page.wait_for_selector("body[data-prototypes-loaded='true']", timeout=30_000)
    path = f"/jobs/{job_id}/clusters"
    if key is None:
        clusters = _api(base, path, num_clusters=num_clusters)["clusters"]
    else:
        clusters = _keyed_get(base, path, key, num_clusters=num_clusters)["clusters"]
    non_empty = [c for c in clusters if c["size"] > 0]
    cards = page.eval_on_selector_all(
        "#cards .card",
        """cards => cards.map(card => {
            const img = card.querySelector('img.prototype');
            return {cluster: Number(card.dataset.cluster), size: Number(card.dataset.size),
                    complete: img.complete, naturalWidth: img.naturalWidth};
        })""",
    )
    assert len(cards) == len(non_empty), (cards, non_empty)
    assert {c["cluster"] for c in cards} == {c["index"] for c in non_empty}
    assert [c["size"] for c in cards] == sorted((c["size"] for c in non_empty), reverse=True)
    assert all(c["complete"] and c["naturalWidth"] > 0 for c in cards), cards
    return non_empty


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_gallery_in_a_browser(
    live_server: dict[str, Any], browser_page: Any, shapes_zip_e2e: Path
) -> None:
    page, base = browser_page, live_server["url"]
    problems = _watch_for_errors(page)

    # Start page: pick the zip, set K=3 with 2x overclustering, the tiny preset, start.
    page.goto(f"{base}/")
    page.set_input_files("#zip-file", str(shapes_zip_e2e))
    page.check("#labels-from-folders")
    page.fill("#num-clusters", "3")
    page.fill("#overcluster", "2")
    # The backbones are offered with the default chosen; a SimCLR preset takes none.
    assert page.input_value("#preset") == "pretrained"
    assert page.input_value("#backbone") == "efficientnet_lite0"
    assert page.is_enabled("#backbone")
    page.select_option("#preset", "tiny")
    assert page.is_disabled("#backbone")
    page.click(".advanced summary")
    page.fill("#overrides", json.dumps(OVERRIDES))
    page.click("#start")
    try:
        page.wait_for_url(f"{base}/jobs/*", timeout=120_000)
    except Exception:
        print("form error:", page.text_content("#form-error"))
        print("upload status:", page.text_content("#upload-status"))
        print(live_server["log"].read_text()[-4000:])
        raise
    job_id = page.url.rstrip("/").split("/")[-1]

    # Job page: live until the job ends; then the gallery link appears.
    finished = ", ".join(f"#status-badge[data-status='{s}']" for s in FINISHED)
    page.wait_for_selector(finished, timeout=300_000)
    job = _api(base, f"/jobs/{job_id}")
    if job["status"] != "succeeded":
        print(live_server["log"].read_text()[-6000:])
    assert job["status"] == "succeeded", job["error"]
    page.wait_for_selector("#open-gallery:not([hidden])")
    assert page.text_content("#progress-percent") == "100%"
    assert page.locator("#timings tr").count() >= 5  # five stages and the total
    assert page.is_hidden("#error-box") and page.is_hidden("#cancel")
    details = page.text_content("#details")
    assert "SimCLR from scratch" in details and "32 px" in details

    # Gallery, K = 3.
    started = time.monotonic()
    page.click("#open-gallery")
    page.wait_for_url(f"{base}/jobs/{job_id}/gallery*")
    non_empty = _check_cards(page, base, job_id, 3)
    assert "SimCLR from scratch · 32 px" in page.text_content("#gallery-summary")
    load_s = time.monotonic() - started
    print(f"gallery of {len(non_empty)} clusters: prototypes loaded {load_s:.2f} s after the click")

    # Labels came from the folders: ACC/NMI/ARI and a drawn confusion matrix.
    assert page.is_visible("#metrics")
    assert page.text_content("#metric-cards [data-metric='acc'] b").endswith("%")
    drawn = page.evaluate(
        """() => {
            const canvas = document.getElementById('confusion-canvas');
            const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height);
            return canvas.width > 0 && data.data.some((v, i) => i % 4 === 3 && v > 0);
        }"""
    )
    assert drawn, "the confusion matrix canvas is blank"

    # The map: drawn when the service stored the job's 2-D projection, else a clear note.
    page.wait_for_function(
        "() => !document.getElementById('map-canvas').hidden"
        " || !document.getElementById('map-note').hidden"
    )
    if (live_server["data_dir"] / "jobs" / job_id / "embedding_2d.npy").is_file():
        assert page.is_visible("#map-canvas")
    else:
        assert "No map" in page.text_content("#map-note")

    # A card opens its members, most confident first.
    largest = max(non_empty, key=lambda c: (c["size"], -c["index"]))
    page.click(f"#cards .card[data-cluster='{largest['index']}']")
    page.wait_for_selector("dialog#members[open] #members-grid figure")
    members = _api(
        base,
        f"/jobs/{job_id}/clusters/{largest['index']}/members",
        num_clusters=3,
        limit=60,
    )["items"]
    shown = page.eval_on_selector_all(
        "#members-grid figure", "figures => figures.map(f => f.dataset.imageId)"
    )
    assert shown == [m["image_id"] for m in members]
    assert len(shown) == min(60, largest["size"])
    confidences = [m["confidence"] for m in members]
    assert confidences == sorted(confidences, reverse=True)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#members-grid img')].slice(0, 8)"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )
    page.click("#members-close")

    # The downloads: every image exactly once.
    dataset_id = job["dataset_id"]
    image_ids = [
        item["id"] for item in _api(base, f"/datasets/{dataset_id}/images", limit=1000)["items"]
    ]
    with page.expect_download() as download_info:
        page.click("#download-csv")
    rows = list(csv.DictReader(io.StringIO(Path(download_info.value.path()).read_text())))
    assert sorted(row["image_id"] for row in rows) == sorted(image_ids)
    with page.expect_download() as download_info:
        page.click("#download-json")  # assembled in the page from the paged JSON API
    saved = json.loads(Path(download_info.value.path()).read_text())
    assert saved["num_clusters"] == 3
    assert sorted(item["image_id"] for item in saved["items"]) == sorted(image_ids)

    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "gallery.png"), full_page=True)

    # The overclustering result set, C = 6.
    page.click("#result-tabs .tab[data-num-clusters='6']")
    page.wait_for_url("**c=6")
    _check_cards(page, base, job_id, 6)
    page.screenshot(path=str(OUTPUT / "gallery-c6.png"), full_page=True)

    assert problems == []


def _keyed_get(base: str, path: str, key: str, **params: Any) -> Any:
    answer = httpx.get(
        f"{base}/api/v1{path}",
        params=params,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    answer.raise_for_status()
    return answer.json()


@pytest.fixture
def keyed_live_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The service in a uvicorn subprocess in api_keys mode (still SQLite and in-process jobs),
    with one owner's key made as `scan-admin create-key` makes it."""
    env = {
        "DATA_DIR": str(tmp_path / "data"),
        "AUTH_MODE": "api_keys",
        "PROGRESS_INTERVAL_S": "0.2",
        "CANCEL_CHECK_INTERVAL_S": "0.2",
        "LOG_FORMAT": "text",
    }
    use_settings(monkeypatch, **env)
    log_path = tmp_path / "server.log"
    with run_server(env, log_path) as url:  # ready: the database is migrated
        yield {"url": url, "log": log_path, "key": create_api_key("alice")}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sign_in_then_gallery_in_a_browser(
    keyed_live_server: dict[str, Any], browser_page: Any, shapes_zip_e2e: Path
) -> None:
    page, base, key = browser_page, keyed_live_server["url"], keyed_live_server["key"]

    # Without a session the start page sends the visitor to sign in; a wrong key is refused.
    page.goto(f"{base}/")
    assert page.url.startswith(f"{base}/sign-in")
    page.fill("#api-key", "scan_000000000000_not-a-key")
    page.click("#sign-in")
    page.wait_for_selector("#sign-in-error")
    assert "not valid" in page.text_content("#sign-in-error")
    assert page.context.cookies() == []

    problems = _watch_for_errors(page)  # from here on, nothing may fail
    page.fill("#api-key", key)
    page.click("#sign-in")
    page.wait_for_url(f"{base}/")
    (cookie,) = page.context.cookies()
    assert cookie["name"] == "scan_session" and cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    assert key not in cookie["value"] and cookie["expires"] > time.time()
    assert page.text_content("#signed-in-as") == "alice"

    # The same path as in single-user mode: upload, start, watch, open the gallery.
    page.set_input_files("#zip-file", str(shapes_zip_e2e))
    page.check("#labels-from-folders")
    page.fill("#num-clusters", "3")
    page.select_option("#preset", "tiny")
    page.click(".advanced summary")
    page.fill("#overrides", json.dumps(OVERRIDES))
    page.click("#start")
    try:
        page.wait_for_url(f"{base}/jobs/*", timeout=120_000)
    except Exception:
        print("form error:", page.text_content("#form-error"))
        print(keyed_live_server["log"].read_text()[-4000:])
        raise
    job_id = page.url.rstrip("/").split("/")[-1]
    finished = ", ".join(f"#status-badge[data-status='{s}']" for s in FINISHED)
    page.wait_for_selector(finished, timeout=300_000)
    job = _keyed_get(base, f"/jobs/{job_id}", key)
    if job["status"] != "succeeded":
        print(keyed_live_server["log"].read_text()[-6000:])
    assert job["status"] == "succeeded", job["error"]
    page.click("#open-gallery")
    page.wait_for_url(f"{base}/jobs/{job_id}/gallery*")
    non_empty = _check_cards(page, base, job_id, 3, key=key)  # prototypes loaded by cookie
    assert non_empty
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "gallery-signed-in.png"), full_page=True)

    # Without the cookie the same image is refused; sign-out ends the session.
    image = page.get_attribute("#cards .card img.prototype", "src")
    assert httpx.get(f"{base}{image}" if image.startswith("/") else image).status_code == 401
    page.click("#sign-out")
    page.wait_for_url(f"{base}/sign-in")
    assert page.context.cookies() == []
    page.goto(f"{base}/jobs/{job_id}/gallery")
    assert page.url.startswith(f"{base}/sign-in?next=")
    assert problems == []
