"""Helpers for the service tests (tests/app, tests/worker, tests/e2e).

Each test database is a fresh PostgreSQL database `scan_test_<random>` dropped afterwards, and
Celery uses its own Redis db number, so tests never touch anyone else's data. The service reads
its settings from the environment: `use_settings` sets variables, clears the cached settings and
forgets cached engines. Nothing from `app` is imported at module level (engine tests share the
session and may check what importing scan_engine loads).
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

PG_SERVER_URL = os.environ.get("SCAN_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("SCAN_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_TEST_DB = int(os.environ.get("SCAN_TEST_REDIS_DB", "11"))


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 1
        ):
            return True
    except OSError:
        return False


def require_postgres() -> None:
    if not _reachable(PG_SERVER_URL, 5432):
        pytest.fail(f"PostgreSQL not reachable at {PG_SERVER_URL}: run scripts/services.sh")


def require_redis() -> None:
    if not _reachable(REDIS_URL, 6379):
        pytest.fail(f"Redis not reachable at {REDIS_URL}: run scripts/services.sh")


@contextmanager
def postgres_database() -> Iterator[str]:
    """Create `scan_test_<random>`, yield its URL, drop it (even if connections linger)."""
    require_postgres()
    from sqlalchemy import create_engine, text

    name = f"scan_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(f"{PG_SERVER_URL}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_SERVER_URL}/{name}"
    finally:
        from app.db.session import dispose_engines

        dispose_engines()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def redis_test_url() -> str:
    return f"{REDIS_URL}/{REDIS_TEST_DB}"


def flush_redis_test_db() -> None:
    import redis

    client = redis.Redis.from_url(redis_test_url())
    client.flushdb()
    client.close()


def use_settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    """Point the service at `env` (and only that) for the rest of the test."""
    from app.core.config import Settings, get_settings
    from app.db.session import dispose_engines

    # Every variable the service reads is cleared first, so the developer's shell cannot leak in.
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    dispose_engines()


def png_bytes(
    size: tuple[int, int] = (24, 24), colour: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, payload in entries.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def upload_zip(
    client: Any,
    payload: bytes,
    filename: str = "upload.zip",
    headers: dict[str, str] | None = None,
    **fields: str,
) -> Any:
    """POST a zip to /api/v1/datasets through a TestClient (or any httpx-like client)."""
    return client.post(
        "/api/v1/datasets",
        files={"file": (filename, payload, "application/zip")},
        data=fields,
        headers=headers,
    )


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def create_api_key(owner: str) -> str:
    """A new API key for `owner` in the configured (migrated) database, as `scan-admin` makes."""
    from app.auth import create_key
    from app.db.session import session_scope

    with session_scope() as session:
        key, _ = create_key(session, owner)
    return key


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A private `redis-server` on its own port, to stop and start again ("Redis down") without
    touching the shared server."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: Any = None

    def start(self) -> RedisServer:
        import shutil
        import subprocess
        import time

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (scripts/services.sh installs it)")
        self._process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not _reachable(self.url, self.port):
            assert self._process.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)
        self._process = None


class TcpProxy:
    """A TCP forwarder on its own port to a real server (PostgreSQL): `down()` closes the port
    and cuts every open connection, `up()` listens again on the same port. An outage that the
    shared PostgreSQL never notices."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def up(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with suppress(OSError):  # wakes the accept() blocked in the other thread (Linux)
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, server}
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


REPO = Path(__file__).resolve().parents[1]


@contextmanager
def redis_test_settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> Iterator[None]:
    """`use_settings` with the test Redis db emptied before and after."""
    require_redis()
    use_settings(monkeypatch, **env)
    flush_redis_test_db()
    try:
        yield
    finally:
        flush_redis_test_db()


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def print_log_tails(paths: list[Path], chars: int = 5000) -> None:
    """The end of each worker log that exists, for a failing test's captured output."""
    for path in paths:
        if path.exists():
            print(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")


def insert_job(values: dict[str, Any]) -> str:
    """Insert one jobs row with these column values; its id."""
    from app.db.models import Job
    from app.db.session import session_scope

    with session_scope() as session:
        job = Job(**values)
        session.add(job)
        session.flush()
        return job.id


@contextmanager
def celery_service_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **extra: str
) -> Iterator[dict[str, str]]:
    """Settings of the production shape (a fresh PostgreSQL database, the test Redis db, jobs
    sent to Celery), set for this process; the same dict is the environment of its workers."""
    with postgres_database() as url:
        env = {
            "DATA_DIR": str(tmp_path / "data"),
            "DATABASE_URL": url,
            "CELERY_BROKER_URL": redis_test_url(),
            "JOB_RUNNER": "celery",
            "PROGRESS_INTERVAL_S": "0.2",
            "CANCEL_CHECK_INTERVAL_S": "0.2",
            "LOG_FORMAT": "json",
            **extra,
        }
        with redis_test_settings(monkeypatch, **env):
            yield env


def start_celery_worker(
    env: dict[str, str], log_path: Path, name: str = "test"
) -> subprocess.Popen[bytes]:
    """A real `celery worker` process on the gpu queue, one job at a time, logging to a file."""
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    command = [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "-Q", "gpu", "--concurrency", "1", "--hostname", f"{name}-{uuid.uuid4().hex[:8]}@%h",
        "--without-gossip", "--without-mingle", "--loglevel", "INFO",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        return subprocess.Popen(command, cwd=REPO, env=full_env, stdout=log, stderr=log)
