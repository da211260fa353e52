"""The embedded service as a real uvicorn process, killed with SIGKILL in the middle of an upload
and of a job, then started again on the same data folder.

- Over-size uploads are refused while the body streams in, not after it has all arrived.
- A client that goes away mid-upload leaves nothing behind; so does a server killed mid-upload
  (the half upload is removed at the next start: its folder lock died with the process).
- Completed uploads and results survive the restarts byte for byte.
- A job running when the server was killed is taken up again at start (the dead process's
  lease is recognised) and resumes from its last stage checkpoint (the pretext checkpoint is
  not rewritten); a job resumed like this can still be cancelled.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service_support import files_under, free_port, stop_process, use_settings

REPO = Path(__file__).resolve().parents[2]
FINISHED = ("succeeded", "failed", "cancelled")
# Pretext finishes (and is checkpointed) in seconds; the SCAN step then runs long enough to be
# interrupted, and short enough to run again within the test.
OVERRIDES = {
    "pretext": {"epochs": 1},
    "scan": {"epochs": 2, "num_heads": 1},
    "selflabel": {"epochs": 1},
}


class Server:
    """`uvicorn app.main:create_app` on a fixed port (the same one after a restart)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        from app.core.config import Settings

        inherited = {k: v for k, v in os.environ.items() if k.upper() not in Settings.model_fields}
        self.env = {**inherited, **env, "PYTHONPATH": str(REPO)}
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        command = [
            sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def get(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.url}/api/v1{path}", params=params, timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/api/v1{path}", timeout=60, **kwargs)

    def wait_for(self, job_id: str, done: Any, timeout_s: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get(f"/jobs/{job_id}")
            if done(job):
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.2)


def _open_upload(server: Server, declared_bytes: int, chunked: bool = False) -> socket.socket:
    """Start a multipart upload by hand; the caller sends (part of) the body."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {declared_bytes}"
    sock.sendall(
        (
            "POST /api/v1/datasets HTTP/1.1\r\nHost: test\r\n"
            f"Content-Type: multipart/form-data; boundary=xyz\r\n{length}\r\n\r\n"
        ).encode()
    )
    part = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n\r\n'
    sock.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
    return sock


def _refused_while_streaming(server: Server, limit: int) -> None:
    sock = _open_upload(server, 0, chunked=True)
    sent = 0
    chunk = bytes(16384)
    try:
        while sent < 20 * limit:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:  # the server stopped reading and closed: the answer is waiting
                break
            sent += len(chunk)
            time.sleep(0.002)
        sock.settimeout(10)
        answer = sock.recv(4096)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 4 * limit, f"{sent} bytes were taken in for a {limit}-byte limit"


def _upload_folders(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "tmp").glob("upload-*"))


def _wait(condition: Any, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.fixture
def server_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    env = {
        "DATA_DIR": str(tmp_path / "data"),
        "PROGRESS_INTERVAL_S": "0.2",
        "CANCEL_CHECK_INTERVAL_S": "0.2",
        "MAX_UPLOAD_BYTES": "400000",
        "LOG_FORMAT": "text",
    }
    use_settings(monkeypatch, **env)
    yield env


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_kill_and_restart_during_uploads_and_jobs(
    server_env: dict[str, str], tmp_path: Path
) -> None:
    from scan_engine.sample_data import make_shapes_zip

    data_dir = Path(server_env["DATA_DIR"])
    shapes = make_shapes_zip(tmp_path / "shapes.zip", classes=3, per_class=10, image_size=32)
    server = Server(server_env, tmp_path / "server.log").start()
    try:
        _refused_while_streaming(server, 400_000)

        with shapes.open("rb") as handle:
            upload = server.post("/datasets", files={"file": ("shapes.zip", handle)})
        assert upload.status_code == 201, upload.text
        dataset = upload.json()
        stored = {p: p.read_bytes() for p in files_under(data_dir / "datasets")}

        # A client that goes away mid-upload: its half upload is removed at once.
        gone = _open_upload(server, 390_000)
        gone.sendall(bytes(100_000))
        _wait(lambda: len(_upload_folders(data_dir)) == 1)
        gone.close()
        _wait(lambda: _upload_folders(data_dir) == [])

        # And an upload in flight when the process dies (begun first: its folder ages meanwhile).
        half = _open_upload(server, 390_000)
        half.sendall(bytes(100_000))
        _wait(lambda: len(_upload_folders(data_dir)) == 1)
        upload_started = time.monotonic()
        body = {"dataset_id": dataset["id"], "num_clusters": 3, "preset": "tiny"}
        # SCAN long enough that the job is still running when the process is killed after the
        # pretext (with 2 epochs, a quiet CPU finished the whole job within the wait below).
        overrides = {**OVERRIDES, "scan": {**OVERRIDES["scan"], "epochs": 60}}
        job = server.post("/jobs", json={**body, "overrides": overrides}).json()
        work = data_dir / "jobs" / job["id"] / "work"
        running = server.wait_for(
            job["id"], lambda j: (work / "pretext.pt").exists() or j["status"] in FINISHED
        )
        assert running["status"] == "running", running  # killed after pretext, before the end
        pretext_written = (work / "pretext.pt").stat().st_mtime_ns
        # Older than the grace a just-created upload folder gets (usually long since).
        time.sleep(max(0.0, 2.5 - (time.monotonic() - upload_started)))
        assert server.get(f"/jobs/{job['id']}")["status"] == "running"
        server.kill()
        half.close()
        assert len(_upload_folders(data_dir)) == 1  # left behind by the killed process

        server.start()
        assert _upload_folders(data_dir) == []  # the half upload is gone
        assert {p: p.read_bytes() for p in files_under(data_dir / "datasets")} == stored
        assert server.get(f"/datasets/{dataset['id']}") == dataset
        resumed = server.wait_for(job["id"], lambda j: j["status"] in FINISHED)
        assert resumed["status"] == "succeeded", resumed["error"]
        assert resumed["attempts"] == 2  # taken up again once, at start
        assert (work / "pretext.pt").stat().st_mtime_ns == pretext_written  # not retrained
        results = server.get(f"/jobs/{job['id']}/assignments", limit=1000)
        assert results["total"] == 30

        # Killed again during a second job: the finished results are intact, and the second
        # job, taken up again at start, can still be cancelled.
        second = server.post("/jobs", json={**body, "overrides": {"pretext": {"epochs": 300}}})
        second_id = second.json()["id"]
        server.wait_for(second_id, lambda j: j["status"] == "running")
        server.kill()
        server.start()
        assert server.get(f"/jobs/{job['id']}/assignments", limit=1000) == results
        server.wait_for(second_id, lambda j: j["status"] == "running" and j["attempts"] == 2)
        assert server.post(f"/jobs/{second_id}/cancel").status_code == 202
        cancelled = server.wait_for(second_id, lambda j: j["status"] in FINISHED, 60)
        assert cancelled["status"] == "cancelled"
    except BaseException:
        print(server.log_path.read_text()[-6000:])
        raise
    finally:
        server.stop()
