"""Tenants and job leases: owners and API keys; every dataset and job gets an owner (existing
rows go to the single-user `local` owner); repeated-upload detection on datasets; the lease
columns on jobs (lease_owner, lease_expires_at, heartbeat_at).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LOCAL_OWNER_ID = "local"  # app.db.models.LOCAL_OWNER_ID, spelled out: migrations stay frozen


def upgrade() -> None:
    op.create_table(
        "owners",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_owners")),
        sa.UniqueConstraint("name", name=op.f("uq_owners_name")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("owner_id", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["owner_id"],
            ["owners.id"],
            name=op.f("fk_api_keys_owner_id_owners"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("prefix", name=op.f("uq_api_keys_prefix")),
    )
    op.create_index(op.f("ix_api_keys_owner_id"), "api_keys", ["owner_id"])

    owners = sa.table(
        "owners",
        sa.column("id", sa.String()),
        sa.column("name", sa.String()),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    op.bulk_insert(
        owners, [{"id": LOCAL_OWNER_ID, "name": LOCAL_OWNER_ID, "created_at": datetime.now(UTC)}]
    )
    for name in ("datasets", "jobs"):
        table = sa.table(name, sa.column("owner_id", sa.String()))
        op.execute(table.update().where(table.c.owner_id.is_(None)).values(owner_id=LOCAL_OWNER_ID))

    # SQLite rebuilds these tables ("move and copy"); app.db.migrate turns foreign-key
    # enforcement off meanwhile, or dropping the old table would cascade into its children.
    with op.batch_alter_table("datasets") as batch:
        batch.alter_column("owner_id", existing_type=sa.String(length=64), nullable=False)
        batch.add_column(sa.Column("content_sha256", sa.String(length=64), nullable=True))
        batch.add_column(
            sa.Column(
                "labels_from_folders", sa.Boolean(), server_default=sa.false(), nullable=False
            )
        )
        batch.create_foreign_key(
            op.f("fk_datasets_owner_id_owners"), "owners", ["owner_id"], ["id"]
        )
        batch.create_index(
            "uq_datasets_owner_content",
            ["owner_id", "content_sha256", "labels_from_folders"],
            unique=True,
        )
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("owner_id", existing_type=sa.String(length=64), nullable=False)
        batch.add_column(sa.Column("lease_owner", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_foreign_key(op.f("fk_jobs_owner_id_owners"), "owners", ["owner_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("fk_jobs_owner_id_owners"), type_="foreignkey")
        batch.drop_column("heartbeat_at")
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_owner")
        batch.alter_column("owner_id", existing_type=sa.String(length=64), nullable=True)
    with op.batch_alter_table("datasets") as batch:
        batch.drop_index("uq_datasets_owner_content")
        batch.drop_constraint(op.f("fk_datasets_owner_id_owners"), type_="foreignkey")
        batch.drop_column("labels_from_folders")
        batch.drop_column("content_sha256")
        batch.alter_column("owner_id", existing_type=sa.String(length=64), nullable=True)
    op.drop_index(op.f("ix_api_keys_owner_id"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("owners")
