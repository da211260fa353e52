"""The Alembic history upgrades and downgrades cleanly and matches the models (PG and SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from tests.service_support import postgres_database

TABLES = {"datasets", "images", "jobs", "result_sets", "clusters", "assignments"}


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
