"""Reading a dataset, job or job result by id on behalf of an owner: another owner's ids
answer 404.

404 and not 403, so that ids tell nothing about other tenants. Ids that cannot be ours (wrong
characters or length) are 404 without a query: a NUL or a 10 kB path segment never reaches SQL.
"""

from __future__ import annotations

import re

from fastapi import HTTPException
from sqlalchemy.orm import Session

from app import crud
from app.auth import CurrentOwner
from app.db.models import Dataset, Job, JobStatus, ResultSet
from app.uploads import printable

__all__ = ["valid_id", "get_owned_dataset", "get_owned_job", "get_owned_result_set"]

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def valid_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


def get_owned_dataset(session: Session, owner: CurrentOwner, dataset_id: str) -> Dataset:
    dataset = session.get(Dataset, dataset_id) if valid_id(dataset_id) else None
    if dataset is None or dataset.owner_id != owner.id:
        raise HTTPException(404, f"dataset {printable(dataset_id, 80)} not found")
    return dataset


def get_owned_job(session: Session, owner: CurrentOwner, job_id: str) -> Job:
    job = session.get(Job, job_id) if valid_id(job_id) else None
    if job is None or job.owner_id != owner.id:
        raise HTTPException(404, f"job {printable(job_id, 80)} not found")
    return job


def get_owned_result_set(
    session: Session, owner: CurrentOwner, job_id: str, num_clusters: int | None
) -> ResultSet:
    """The result set of the owner's succeeded job for C = `num_clusters` (default K); 409 while
    the job has not succeeded, 404 for a C it has no result for (the answer lists those it has)."""
    job = get_owned_job(session, owner, job_id)
    if job.status != JobStatus.SUCCEEDED:
        raise HTTPException(409, f"job {job_id} is {job.status}; results exist once it succeeds")
    wanted = num_clusters if num_clusters is not None else job.num_clusters
    result_set = crud.get_result_set(session, job_id, wanted)
    if result_set is None:
        available = crud.result_set_counts(session, job_id)
        raise HTTPException(
            404, f"job {job_id} has no result for num_clusters={wanted}; available: {available}"
        )
    return result_set
