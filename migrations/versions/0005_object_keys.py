"""Object keys only: a job's `model_path` that holds an absolute path (stored when the model file
lay outside DATA_DIR) becomes the key from `jobs/<job id>/` on, or NULL when it names no file of
the job (the job then answers 409 to predictions, as a job without a model does). Every other
stored path (images, thumbnails, dataset folders) was already relative to DATA_DIR, which is
its key.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def model_key(job_id: str, path: str) -> str | None:
    """The object key of a stored absolute model path of job `job_id`, or None."""
    marker = f"/jobs/{job_id}/"
    at = path.rfind(marker)
    if at < 0:
        return None
    key = path[at + 1 :]
    parts = key.split("/")
    return None if any(part in ("", ".", "..") for part in parts) else key


def upgrade() -> None:
    connection = op.get_bind()
    jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("model_path", sa.String))
    rows = connection.execute(
        sa.select(jobs.c.id, jobs.c.model_path).where(jobs.c.model_path.like("/%"))
    ).all()
    for job_id, path in rows:
        connection.execute(
            jobs.update().where(jobs.c.id == job_id).values(model_path=model_key(job_id, path))
        )


def downgrade() -> None:
    pass  # keys are what every earlier revision read too (relative to DATA_DIR)
