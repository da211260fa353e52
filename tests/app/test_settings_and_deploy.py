"""Settings resolution, and docker-compose.yml / Dockerfile lining up with them (read, not run)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from tests.service_support import use_settings

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_embedded_sqlite_under_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.core.config import get_settings

    monkeypatch.chdir(tmp_path)
    use_settings(monkeypatch)
    settings = get_settings()
    data_dir = tmp_path / "data"
    resolved = (settings.DATA_DIR, settings.DATABASE_URL)
    assert resolved == (data_dir, f"sqlite:///{data_dir / 'scan.db'}")
    assert settings.JOB_RUNNER == "embedded" and settings.DEFAULT_PRESET == "pretrained"
    assert settings.DEFAULT_BACKBONE == "efficientnet_lite0"  # its weights ship with the package
    assert data_dir / "models" == settings.MODELS_DIR  # scan-weights' folder, beside the data
    assert settings.AUTH_MODE == "single_user"  # a laptop: one implicit owner, no keys
    assert settings.JOB_HEARTBEAT_S == settings.JOB_LEASE_S / 4
    assert get_settings() is settings  # cached


def test_production_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.core.config import get_settings

    use_settings(
        monkeypatch,
        DATABASE_URL="postgres://u:p@db:5432/scan",
        CELERY_BROKER_URL="redis://redis:6379/0",
        JOB_SOFT_TIME_LIMIT_S="100",
    )
    settings = get_settings()
    assert settings.DATABASE_URL == "postgresql+psycopg://u:p@db:5432/scan"
    assert settings.JOB_RUNNER == "celery"
    assert settings.CELERY_RESULT_BACKEND == "redis://redis:6379/0"
    assert settings.JOB_HARD_TIME_LIMIT_S == 400
    assert settings.CELERY_VISIBILITY_TIMEOUT_S == 1000  # above the hard limit
    assert settings.AUTH_MODE == "api_keys"  # production: keys unless explicitly waived


def test_short_visibility_timeout_and_waived_keys_are_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A visibility timeout under the job length is safe with leases (a redelivery exits)."""
    from app.core.config import get_settings

    use_settings(
        monkeypatch,
        CELERY_BROKER_URL="redis://redis:6379/0",
        CELERY_VISIBILITY_TIMEOUT_S="5",
        AUTH_MODE="single_user",
        ALLOW_SINGLE_USER_IN_PRODUCTION="true",
    )
    settings = get_settings()
    assert settings.CELERY_VISIBILITY_TIMEOUT_S == 5 < settings.JOB_HARD_TIME_LIMIT_S
    assert settings.AUTH_MODE == "single_user"


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"JOB_RUNNER": "celery"}, "needs CELERY_BROKER_URL"),
        ({"JOB_SOFT_TIME_LIMIT_S": "100", "JOB_HARD_TIME_LIMIT_S": "50"}, "must exceed"),
        ({"JOB_LEASE_S": "10", "JOB_HEARTBEAT_S": "10"}, "shorter than JOB_LEASE_S"),
        (
            {"DATABASE_URL": "postgresql://db/scan", "AUTH_MODE": "single_user"},
            "ALLOW_SINGLE_USER_IN_PRODUCTION",
        ),
        ({"CELERY_BROKER_URL": "redis://r:6379/0", "AUTH_MODE": "single_user"}, "API keys"),
        ({"JOB_RUNNER": "threads"}, "JOB_RUNNER"),
    ],
)
def test_inconsistent_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], words: str
) -> None:
    from app.core.config import get_settings

    use_settings(monkeypatch, **env)
    with pytest.raises(ValidationError, match=words):
        get_settings()


def test_compose_services_and_variables_match_the_settings() -> None:
    from app.core.config import Settings

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"api", "worker", "postgres", "redis", "objectstore"}
    for name in services:
        assert "healthcheck" in services[name], name
    known = set(Settings.model_fields)
    celery_own = {"REMAP_SIGTERM"}  # read by Celery itself, not by the service settings
    for name in ("api", "worker"):
        env = {k: v for k, v in services[name]["environment"].items() if k not in celery_own}
        assert set(env) <= known, set(env) - known
        settings = Settings(**{key: str(value) for key, value in env.items()})
        assert settings.JOB_RUNNER == "celery" and settings.DATABASE_URL.startswith("postgresql")
        assert settings.CELERY_BROKER_URL.startswith("redis://redis:")
        assert env["DATA_DIR"] == "/data"
        # The object store is all they share: their own /data, the store's endpoint and keys.
        assert settings.STORAGE_BACKEND == "s3" and settings.S3_BUCKET == "scan"
        assert settings.S3_ENDPOINT_URL == "http://objectstore:8333"
        assert settings.S3_PUBLIC_ENDPOINT_URL.startswith("http://localhost:")
    api_volume, worker_volume = services["api"]["volumes"][0], services["worker"]["volumes"][0]
    assert api_volume.endswith(":/data") and worker_volume.endswith(":/data")
    assert api_volume.split(":")[0] != worker_volume.split(":")[0]
    assert services["api"]["environment"]["S3_CREATE_BUCKET"] == "true"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["objectstore"]["condition"] == "service_healthy"
    store = services["objectstore"]
    assert "-s3" in store["command"] and "objectstore-data:/data" in store["volumes"]
    identities = json.loads(compose["configs"]["objectstore-identities"]["content"])
    credentials = identities["identities"][0]["credentials"][0]
    env = services["api"]["environment"]
    assert credentials == {
        "accessKey": env["S3_ACCESS_KEY_ID"],
        "secretKey": env["S3_SECRET_ACCESS_KEY"],
    }
    assert store["ports"] == ["8333:8333"] and env["S3_PUBLIC_ENDPOINT_URL"].endswith(":8333")
    assert "postgres:5432" in services["api"]["environment"]["DATABASE_URL"]
    assert (
        services["api"]["environment"]["DATABASE_URL"]
        .split("@")[0]
        .endswith(services["postgres"]["environment"]["POSTGRES_PASSWORD"])
    )
    worker = services["worker"]
    command = worker["command"]
    assert command[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert command[command.index("-Q") + 1] == "gpu"
    assert command[command.index("--concurrency") + 1] == "1"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert worker["depends_on"]["api"]["condition"] == "service_healthy"
    assert worker["environment"]["REMAP_SIGTERM"] == "SIGQUIT"
    grace_s = int(worker["stop_grace_period"].rstrip("s"))
    assert grace_s > float(worker["environment"]["CELERY_SOFT_SHUTDOWN_TIMEOUT_S"])
    assert services["api"]["command"] == ["scan-service"]
    assert set(compose["volumes"]) == {
        "postgres-data",
        "redis-data",
        "objectstore-data",
        "api-data",
        "worker-scratch",
    }


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, as Docker reads them: comment lines dropped (also
    inside a continued instruction), lines ending in a backslash joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def test_dockerfile_installs_the_project_and_runs_the_service() -> None:
    instructions = _dockerfile_instructions((REPO / "Dockerfile").read_text())
    copy_at = {}  # source -> index of the COPY instruction
    for index, (keyword, arguments) in enumerate(instructions):
        if keyword == "COPY":
            for source in shlex.split(arguments)[:-1]:  # the last one is the destination
                copy_at[source] = index
    needed = ("scan_engine", "app", "worker", "migrations", "alembic.ini", "pyproject.toml")
    assert set(needed) <= set(copy_at), set(needed) - set(copy_at)
    install_at = [
        index
        for index, (keyword, arguments) in enumerate(instructions)
        if keyword == "RUN"
        and any(
            command.split() == ["pip", "install", "-e", "."] for command in arguments.split("&&")
        )
    ]
    assert install_at, "no RUN pip install -e ."
    assert all(copy_at[source] < install_at[0] for source in needed)  # installed once copied
    commands = [arguments for keyword, arguments in instructions if keyword == "CMD"]
    assert commands and commands[-1] == '["scan-service"]'  # the last CMD is the one that runs
    environment = dict(
        pair.split("=", 1)
        for keyword, arguments in instructions
        if keyword == "ENV"
        for pair in shlex.split(arguments)
    )
    assert environment["DATA_DIR"] == "/data"
