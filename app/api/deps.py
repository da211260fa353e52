"""Injected dependencies: settings, a DB session per request, storage and the job dispatcher."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.session import get_sessionmaker
from app.dispatch import CeleryDispatcher, EmbeddedDispatcher
from app.storage import Storage

__all__ = ["SettingsDep", "SessionDep", "StorageDep", "DispatcherDep"]


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_db(settings: SettingsDep) -> Iterator[Session]:
    with get_sessionmaker(settings.DATABASE_URL)() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]


def get_storage(settings: SettingsDep) -> Storage:
    return Storage(settings.DATA_DIR)


StorageDep = Annotated[Storage, Depends(get_storage)]


def get_dispatcher(request: Request) -> EmbeddedDispatcher | CeleryDispatcher:
    dispatcher: EmbeddedDispatcher | CeleryDispatcher = request.app.state.dispatcher
    return dispatcher


DispatcherDep = Annotated[EmbeddedDispatcher | CeleryDispatcher, Depends(get_dispatcher)]
