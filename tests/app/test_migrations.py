"""The Alembic history upgrades and downgrades cleanly and matches the models (PG and SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from tests.service_support import postgres_database

TABLES = {
    "owners",
    "api_keys",
    "browser_sessions",
    "datasets",
    "images",
    "jobs",
    "result_sets",
    "clusters",
    "assignments",
    "feature_shards",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrate.db'}"
    else:
        with postgres_database() as url:
            yield url


def _differences(url: str) -> list[object]:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from app.db.base import Base

    engine = create_engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    engine.dispose()
    return list(diff)


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    names = set(inspect(engine).get_table_names())
    engine.dispose()
    return names


def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    from alembic import command

    from app.db.migrate import alembic_config, upgrade_to_head
    from app.db.session import dispose_engines, get_engine

    upgrade_to_head(database_url)
    assert _tables(database_url) == TABLES | {"alembic_version"}
    assert _differences(database_url) == []

    config = alembic_config()
    with get_engine(database_url).connect() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
        connection.commit()
    assert _tables(database_url) == {"alembic_version"}

    upgrade_to_head(database_url)  # and again, on the same database
    assert _differences(database_url) == []
    dispose_engines()


def test_alembic_cli_uses_the_app_settings(tmp_path: Path) -> None:
    """`DATABASE_URL=... alembic upgrade head` from the repo root migrates that database."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(repo)}
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=repo,
        env=env,
        check=True,
        capture_output=True,
    )
    assert _tables(url) == TABLES | {"alembic_version"}
    assert _differences(url) == []


def test_upgrade_to_0002_keeps_rows_and_gives_them_the_local_owner(database_url: str) -> None:
    """Existing data survives the owners/leases migration (SQLite rebuilds the tables)."""
    from sqlalchemy import text

    from app.db.migrate import upgrade_to_head
    from app.db.session import dispose_engines, get_engine

    upgrade_to_head(database_url, revision="0001")
    engine = get_engine(database_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO datasets (id, name, created_at, storage_path, image_count, "
                "total_bytes, has_labels, skipped, skipped_count) VALUES "
                "('d1', 'old', '2026-01-01', 'datasets/d1', 1, 10, false, '[]', 0)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO images (id, dataset_id, position, original_path, stored_path, "
                "thumbnail_path, media_type, size_bytes, sha256, width, height) VALUES "
                "('i1', 'd1', 0, 'a.png', 'x', 'y', 'image/png', 10, 'h', 8, 8)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO jobs (id, dataset_id, status, cancel_requested, num_clusters, "
                "cluster_counts, preset, overrides, config, progress, attempts, timings, notes, "
                "created_at, updated_at) VALUES ('j1', 'd1', 'succeeded', false, 2, '[2]', "
                "'tiny', '{}', '{}', 1.0, 1, '{}', '[]', '2026-01-01', '2026-01-01')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO result_sets (id, job_id, num_clusters, head, stage) "
                "VALUES (1, 'j1', 2, 0, 'scan')"
            )
        )
    upgrade_to_head(database_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT owner_id FROM datasets")).scalar() == "local"
        assert connection.execute(text("SELECT owner_id FROM jobs")).scalar() == "local"
        assert connection.execute(text("SELECT count(*) FROM images")).scalar() == 1
        assert connection.execute(text("SELECT count(*) FROM result_sets")).scalar() == 1
        assert connection.execute(text("SELECT name FROM owners")).scalar() == "local"
        if connection.dialect.name == "sqlite":  # enforcement is back on for requests
            assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    assert _differences(database_url) == []
    dispose_engines()


def test_missing_migrations_folder_is_a_clear_error(monkeypatch, tmp_path: Path) -> None:
    from app.db import migrate

    monkeypatch.setattr(migrate, "MIGRATIONS_DIR", tmp_path / "migrations")
    with pytest.raises(RuntimeError, match=r"no database migrations at .*pip install -e"):
        migrate.upgrade_to_head(f"sqlite:///{tmp_path / 'never.db'}")
    assert not (tmp_path / "never.db").exists()  # refused before touching the database


def _job_columns(url: str) -> set[str]:
    engine = create_engine(url)
    names = {column["name"] for column in inspect(engine).get_columns("jobs")}
    engine.dispose()
    return names


def test_0003_adds_the_backbone_null_on_existing_jobs_and_downgrades(database_url: str) -> None:
    from alembic import command
    from sqlalchemy import text

    from app.db.migrate import alembic_config, upgrade_to_head
    from app.db.session import dispose_engines, get_engine

    upgrade_to_head(database_url, revision="0002")
    assert not {"backbone", "run_report"} & _job_columns(database_url)
    engine = get_engine(database_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO datasets (id, owner_id, name, created_at, storage_path, image_count, "
                "total_bytes, has_labels, skipped, skipped_count, labels_from_folders) VALUES "
                "('d1', 'local', 'old', '2026-01-01', 'datasets/d1', 1, 10, false, '[]', 0, "
                "false)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO jobs (id, owner_id, dataset_id, status, cancel_requested, "
                "num_clusters, cluster_counts, preset, overrides, config, progress, attempts, "
                "timings, notes, created_at, updated_at) VALUES ('j1', 'local', 'd1', "
                "'succeeded', false, 2, '[2]', 'cpu', '{}', '{}', 1.0, 1, '{}', '[]', "
                "'2026-01-01', '2026-01-01')"
            )
        )
    upgrade_to_head(database_url)
    with engine.connect() as connection:
        row = connection.execute(text("SELECT id, backbone, run_report FROM jobs")).one()
    assert tuple(row) == ("j1", None, None)
    assert _differences(database_url) == []

    config = alembic_config()
    with get_engine(database_url).connect() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0002")
        connection.commit()
    assert not {"backbone", "run_report"} & _job_columns(database_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT id FROM jobs")).scalar() == "j1"  # kept
    dispose_engines()


def test_0005_turns_absolute_model_paths_into_keys(database_url: str) -> None:
    from sqlalchemy import text

    from app.db.migrate import upgrade_to_head
    from app.db.session import dispose_engines, get_engine

    upgrade_to_head(database_url, revision="0004")
    engine = get_engine(database_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO datasets (id, owner_id, name, created_at, storage_path, image_count, "
                "total_bytes, has_labels, skipped, skipped_count, labels_from_folders) VALUES "
                "('d1', 'local', 'old', '2026-01-01', 'datasets/d1', 1, 10, false, '[]', 0, "
                "false)"
            )
        )
        for job_id, model_path in (
            ("j1", "/srv/scan/data/jobs/j1/work/model.pt"),  # absolute, inside the job
            ("j2", "jobs/j2/work/model.pt"),  # already a key
            ("j3", "/tmp/elsewhere/model.pt"),  # no file of the job: unusable
            ("j4", None),
        ):
            connection.execute(
                text(
                    "INSERT INTO jobs (id, owner_id, dataset_id, status, cancel_requested, "
                    "num_clusters, cluster_counts, preset, overrides, config, progress, "
                    "attempts, timings, notes, created_at, updated_at, model_path) VALUES "
                    "(:id, 'local', 'd1', 'succeeded', false, 2, '[2]', 'cpu', '{}', '{}', 1.0, "
                    "1, '{}', '[]', '2026-01-01', '2026-01-01', :path)"
                ),
                {"id": job_id, "path": model_path},
            )
    upgrade_to_head(database_url)
    with engine.connect() as connection:
        rows = dict(connection.execute(text("SELECT id, model_path FROM jobs")).all())
    assert rows == {
        "j1": "jobs/j1/work/model.pt",
        "j2": "jobs/j2/work/model.pt",
        "j3": None,
        "j4": None,
    }
    assert _differences(database_url) == []
    dispose_engines()
