"""Injected dependencies: settings, a DB session per request, the owner the request acts for,
storage and the job dispatcher."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from app.auth import LOCAL_OWNER, AuthError, CurrentOwner, owner_for_key
from app.core.config import Settings
from app.db.session import get_sessionmaker
from app.runner.dispatch import CeleryDispatcher, EmbeddedDispatcher
from app.storage import ObjectStore, Storage, object_store

__all__ = [
    "SettingsDep",
    "SessionDep",
    "StorageDep",
    "ObjectStoreDep",
    "DispatcherDep",
    "OwnerDep",
    "api_key_of",
]


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_db(settings: SettingsDep) -> Iterator[Session]:
    with get_sessionmaker(settings.DATABASE_URL)() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]


def api_key_of(request: Request) -> str | None:
    """The key from `Authorization: Bearer <key>` or else `X-API-Key: <key>`."""
    authorization = request.headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.headers.get("x-api-key", "").strip() or None


def get_current_owner(request: Request, settings: SettingsDep) -> CurrentOwner:
    """The owner of the request's API key (api_keys mode), or the local owner (single_user).

    Its own short session: the lookup must not hold a connection for a long upload.
    """
    if settings.AUTH_MODE == "single_user":
        return LOCAL_OWNER
    key = api_key_of(request)
    try:
        with get_sessionmaker(settings.DATABASE_URL)() as session:
            return owner_for_key(session, key)
    except AuthError as error:
        raise HTTPException(401, str(error), headers={"WWW-Authenticate": "Bearer"}) from None


OwnerDep = Annotated[CurrentOwner, Depends(get_current_owner)]


def get_storage(settings: SettingsDep) -> Storage:
    return Storage(settings.DATA_DIR)


StorageDep = Annotated[Storage, Depends(get_storage)]


def get_object_store(settings: SettingsDep) -> ObjectStore:
    return object_store(settings)


ObjectStoreDep = Annotated[ObjectStore, Depends(get_object_store)]


def get_dispatcher(request: Request) -> EmbeddedDispatcher | CeleryDispatcher:
    dispatcher: EmbeddedDispatcher | CeleryDispatcher = request.app.state.dispatcher
    return dispatcher


DispatcherDep = Annotated[EmbeddedDispatcher | CeleryDispatcher, Depends(get_dispatcher)]
