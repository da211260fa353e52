"""Sharded embedding: `feature_shards`, one row per range of a job's images that one worker
embeds (taken with a lease like a job); rows live only while the job's features are being
embedded and go with their job.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "feature_shards",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("cache_key", sa.String(length=160), nullable=False),
        sa.Column("content_key", sa.String(length=64), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("start", sa.Integer(), nullable=False),
        sa.Column("stop", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("object_key", sa.String(length=255), nullable=True),
        sa.Column("embedded_by", sa.String(length=128), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name=op.f("fk_feature_shards_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feature_shards")),
        sa.UniqueConstraint("job_id", "index", name=op.f("uq_feature_shards_job_id_index")),
    )
    op.create_index(op.f("ix_feature_shards_job_id"), "feature_shards", ["job_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_feature_shards_job_id"), table_name="feature_shards")
    op.drop_table("feature_shards")
