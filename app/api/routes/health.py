"""Operator endpoints: /healthz (process up), /readyz (DB, queue and file store reachable),
/metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import case, func, select, text

from app.api.deps import ObjectStoreDep, SessionDep, SettingsDep
from app.db.models import Dataset, Image, Job, JobStatus
from app.db.session import get_engine

router = APIRouter(tags=["operations"])
logger = logging.getLogger(__name__)

# Job durations span seconds (tiny runs) to hours (the paper schedule).
DURATION_BUCKETS_S = (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up (no dependency checked)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "A dependency is unreachable."}})
def readyz(request: Request, settings: SettingsDep, store: ObjectStoreDep) -> JSONResponse:
    """Ready when the database answers, jobs can be dispatched (broker or embedded worker) and
    the file store (DATA_DIR or the S3 bucket) answers."""
    checks: dict[str, str] = {}
    try:
        with get_engine(settings.DATABASE_URL).connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as error:
        checks["database"] = f"unreachable: {type(error).__name__}"
    dispatcher = request.app.state.dispatcher
    try:
        dispatcher.check(settings.READY_TIMEOUT_S)
        checks["queue"] = "ok"
    except Exception as error:
        checks["queue"] = f"unreachable: {type(error).__name__}: {error}"
    try:
        store.check(settings.READY_TIMEOUT_S)
        checks["storage"] = "ok"
    except Exception as error:
        checks["storage"] = f"unreachable: {type(error).__name__}: {error}"
    ready = all(value == "ok" for value in checks.values())
    if not ready:
        logger.warning("not ready", extra={"checks": checks})
    return JSONResponse(
        {
            "status": "ready" if ready else "unavailable",
            "runner": dispatcher.kind,
            "storage_backend": store.kind,
            **checks,
        },
        status_code=200 if ready else 503,
        headers=None if ready else {"Retry-After": str(settings.DB_RETRY_AFTER_S)},
    )


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(session: SessionDep) -> PlainTextResponse:
    """Prometheus text format: jobs by status, finished-job durations, datasets and images."""
    lines: list[str] = []
    counts = dict.fromkeys(JobStatus.ALL, 0)
    for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status)):
        counts[status] = count
    lines += ["# HELP scan_jobs Jobs by status.", "# TYPE scan_jobs gauge"]
    lines += [f'scan_jobs{{status="{_escape(s)}"}} {n}' for s, n in sorted(counts.items())]

    bucket_columns = [
        func.sum(case((Job.duration_s <= bound, 1), else_=0)) for bound in DURATION_BUCKETS_S
    ]
    rows = session.execute(
        select(
            Job.status, func.count(), func.coalesce(func.sum(Job.duration_s), 0.0), *bucket_columns
        )
        .where(Job.status.in_(JobStatus.FINISHED), Job.duration_s.is_not(None))
        .group_by(Job.status)
    ).all()
    lines += [
        "# HELP scan_job_duration_seconds Wall time from start to end of finished jobs.",
        "# TYPE scan_job_duration_seconds histogram",
    ]
    for status, count, total, *buckets in sorted(rows, key=lambda r: str(r[0])):
        label = f'status="{_escape(status)}"'
        for bound, n in zip(DURATION_BUCKETS_S, buckets, strict=True):
            lines.append(f'scan_job_duration_seconds_bucket{{{label},le="{bound}"}} {n or 0}')
        lines.append(f'scan_job_duration_seconds_bucket{{{label},le="+Inf"}} {count}')
        lines.append(f"scan_job_duration_seconds_sum{{{label}}} {float(total)}")
        lines.append(f"scan_job_duration_seconds_count{{{label}}} {count}")

    datasets = session.scalar(select(func.count()).select_from(Dataset)) or 0
    images = session.scalar(select(func.count()).select_from(Image)) or 0
    lines += ["# HELP scan_datasets Stored datasets.", "# TYPE scan_datasets gauge"]
    lines.append(f"scan_datasets {datasets}")
    lines += ["# HELP scan_images Stored images.", "# TYPE scan_images gauge"]
    lines.append(f"scan_images {images}")
    return PlainTextResponse(
        "\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8"
    )
