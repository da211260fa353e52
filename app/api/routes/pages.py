"""Web pages for people: upload and lists at `/`, job progress at `/jobs/{id}`, the cluster
gallery at `/jobs/{id}/gallery`.

The pages are Jinja2 shells; small hand-written scripts in app/static fill them from the REST API
(/api/v1) with fetch. Everything is served by this app: no CDN, nothing from the internet.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from app.api.deps import PageOwnerDep, SessionDep, SettingsDep
from app.api.templating import APP_DIR, templates
from app.backbones import backbone_offers, preset_is_pretrained
from app.db.models import Dataset, Job
from scan_engine.config import PRESETS
from scan_engine.stages import STAGE_NAMES

__all__ = ["router", "install"]

logger = logging.getLogger(__name__)

API_BASE = "/api/v1"

router = APIRouter(include_in_schema=False)


def install(app: FastAPI) -> None:
    """Add the pages and their static files (CSS, JS) to `app`."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=APP_DIR / "static"), name="static")


def _not_found(request: Request, what: str) -> HTMLResponse:
    return templates.TemplateResponse(
        request, "not_found.html", {"api": API_BASE, "what": what}, status_code=404
    )


@router.get("/", response_class=HTMLResponse)
def index_page(request: Request, settings: SettingsDep, owner: PageOwnerDep) -> HTMLResponse:
    """Upload a zip and start a job; the lists of datasets and jobs."""
    return templates.TemplateResponse(
        request,
        "index.html",
        {
            "api": API_BASE,
            "presets": list(PRESETS),
            "default_preset": settings.DEFAULT_PRESET,
            "pretrained_presets": [name for name in PRESETS if preset_is_pretrained(name)],
            "backbones": backbone_offers(settings),
            "max_upload_bytes": settings.MAX_UPLOAD_BYTES,
        },
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(
    request: Request, session: SessionDep, owner: PageOwnerDep, job_id: str
) -> HTMLResponse:
    """Live progress of one job: stage, progress bar, ETA, timings, error, cancel."""
    return _job_template(request, session, owner, job_id, "job.html", stages=STAGE_NAMES)


@router.get("/jobs/{job_id}/gallery", response_class=HTMLResponse)
def gallery_page(
    request: Request, session: SessionDep, owner: PageOwnerDep, job_id: str
) -> HTMLResponse:
    """The clusters of a finished job: cards, members, metrics, the map, downloads."""
    return _job_template(request, session, owner, job_id, "gallery.html")


def _job_template(
    request: Request,
    session: SessionDep,
    owner: PageOwnerDep,
    job_id: str,
    template: str,
    **context: object,
) -> HTMLResponse:
    """A page about one of the owner's jobs; another owner's job is not found either."""
    job = session.get(Job, job_id)
    if job is None or job.owner_id != owner.id:
        return _not_found(request, f"job {job_id}")
    dataset = session.get(Dataset, job.dataset_id)
    return templates.TemplateResponse(
        request,
        template,
        {
            "api": API_BASE,
            "job": job,
            "dataset": dataset,
            "route_summary": route_summary(job),
            **context,
        },
    )


def route_summary(job: Job) -> str:
    """ "backbone efficientnet_lite0 · 224 px · features from the cache", "SimCLR from scratch ·
    32 px": what ran, as far as the job row (and, once run, the engine's report) says."""
    report = job.run_report or {}
    size = report.get("image_size", (job.config or {}).get("image_size"))
    if job.backbone:
        parts = [f"backbone {job.backbone}"]
    elif (job.config or {}).get("backbone_weights"):
        parts = ["ResNet weights from a file"]
    else:
        parts = ["SimCLR from scratch"]
    if isinstance(size, int):
        parts.append(f"{size} px")
    cached = report.get("features_from_cache")
    if isinstance(cached, bool):
        parts.append("features from the cache" if cached else "features computed")
    return " · ".join(parts)
