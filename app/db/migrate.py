"""Apply Alembic migrations from code (`scan-service` start-up, tests).

On PostgreSQL an advisory lock serialises concurrent upgrades (several API replicas starting
together); SQLite needs none (one file, one embedded process).
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
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade_to_head(url: str | None = None, revision: str = "head") -> None:
    """Upgrade the database at `url` (default: settings) to `revision`."""
    engine = get_engine(url)
    config = alembic_config()
    with engine.connect() as connection:
        is_postgres = connection.dialect.name == "postgresql"
        if is_postgres:
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _ADVISORY_LOCK_ID})
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
    logger.info("database schema at %s", revision)
