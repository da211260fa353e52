"""Apply Alembic migrations from code (`scan-service` start-up, tests).

On PostgreSQL an advisory lock serialises concurrent upgrades (several API replicas starting
together); SQLite needs none (one file, one embedded process). On SQLite, foreign-key enforcement
is off while migrating: Alembic's batch mode rebuilds a table by copying it and dropping the old
one, and with enforcement on that drop would cascade-delete the rows of its child tables.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from app.db.session import get_engine

__all__ = ["alembic_config", "upgrade_to_head", "MIGRATIONS_DIR"]

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
_ADVISORY_LOCK_ID = 0x5CA11  # any constant shared by all replicas


def alembic_config() -> Config:
    """An Alembic config pointing at migrations/, without alembic.ini (no logging setup)."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        # A built wheel carries app/ but not the top-level migrations/ folder.
        raise RuntimeError(
            f"no database migrations at {MIGRATIONS_DIR}: run from a checkout installed with "
            "`pip install -e .` (as `make setup` and the Docker image do), not from a built wheel"
        )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade_to_head(url: str | None = None, revision: str = "head") -> None:
    """Upgrade the database at `url` (default: settings) to `revision`."""
    engine = get_engine(url)
    config = alembic_config()
    with engine.connect() as connection:
        is_postgres = connection.dialect.name == "postgresql"
        is_sqlite = connection.dialect.name == "sqlite"
        if is_postgres:
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _ADVISORY_LOCK_ID})
            connection.commit()
        if is_sqlite:  # a no-op inside a transaction: set between commits
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
            connection.commit()
        finally:
            if is_postgres:
                connection.execute(
                    text("SELECT pg_advisory_unlock(:id)"), {"id": _ADVISORY_LOCK_ID}
                )
                connection.commit()
            if is_sqlite:  # this pooled connection serves requests next
                connection.rollback()
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()
    logger.info("database schema at %s", revision)
