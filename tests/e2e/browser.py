"""Helpers for driving the web pages in a real browser: the service in a uvicorn subprocess and
Debian's chromium through Playwright. Used by test_browser_gallery.py and gallery_load_time.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.service_support import stop_process

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("SCAN_TEST_CHROMIUM", "/usr/bin/chromium"))
# No GPU, no sandbox (root in CI), and nothing fetched from the internet behind our back.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
FINISHED = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def run_server(env: dict[str, str], log_path: Path, ready_timeout_s: float = 60) -> Iterator[str]:
    """`uvicorn app.main:create_app` on a free port, configured by `env`; yields its base URL."""
    port = free_port()
    command = [
        sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    from app.core.config import Settings

    # Only `env` configures the service: none of the caller's own service variables leak in.
    inherited = {k: v for k, v in os.environ.items() if k.upper() not in Settings.model_fields}
    full_env = {**inherited, **env, "PYTHONPATH": str(REPO)}
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not ready within {ready_timeout_s} s")
            time.sleep(0.2)
        yield base
    finally:
        stop_process(server)


def launch_chromium(playwright: Any) -> Any:
    """Debian's chromium (never a browser Playwright downloads)."""
    if not CHROMIUM.is_file():
        raise FileNotFoundError(
            f"chromium not found at {CHROMIUM}: install Debian's browser with "
            "`apt-get install -y chromium` (.ci/run does) or set SCAN_TEST_CHROMIUM"
        )
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
    )


def api_get(base: str, path: str, **params: Any) -> Any:
    response = httpx.get(f"{base}/api/v1{path}", params=params, timeout=30)
    response.raise_for_status()
    return response.json()


def wait_for_job(base: str, job_id: str, timeout_s: float) -> dict[str, Any]:
    """Poll until the job has finished; its last JSON."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = api_get(base, f"/jobs/{job_id}")
        if job["status"] in FINISHED:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
        time.sleep(0.5)
