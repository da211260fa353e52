"""The pretrained route on jobs: `backbone` (the named backbone a job ran with; null for SimCLR
from scratch and for every job made before this revision) and `run_report` (what the engine
reported about the route it ran: backbone, image size, whether features came from the cache).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable additions: SQLite adds them in place, existing rows read null.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("backbone", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("run_report", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("run_report")
        batch.drop_column("backbone")
