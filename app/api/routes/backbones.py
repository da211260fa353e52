"""/api/v1/backbones: the pretrained backbones a job may name and whether their weights are here."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from app.api.deps import OwnerDep, SettingsDep
from app.backbones import backbone_offers
from app.schemas import BackbonePublic, BackbonesPublic, Message

__all__ = ["router"]

router = APIRouter(prefix="/backbones", tags=["backbones"])

_ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": Message}}


@router.get("", response_model=BackbonesPublic, responses=_ERRORS)
async def list_backbones(settings: SettingsDep, owner: OwnerDep) -> BackbonesPublic:
    """Every backbone: feature size, input size, weights present or not (with the command that
    imports them when not), which one is the default."""
    # In a thread: the first call imports the engine, and the hub-cache lookups touch the disk.
    offers = await run_in_threadpool(backbone_offers, settings)
    return BackbonesPublic(
        items=[BackbonePublic(**offer.__dict__) for offer in offers],
        default=settings.DEFAULT_BACKBONE,
    )
