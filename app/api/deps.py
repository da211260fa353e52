"""Injected dependencies: settings, a DB session per request, the owner the request acts for
(by API key header, or by browser session cookie with its CSRF token), storage and the job
dispatcher."""

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
from app.web_sessions import CSRF_HEADER, SESSION_COOKIE, csrf_matches, owner_for_session

__all__ = [
    "SettingsDep",
    "SessionDep",
    "StorageDep",
    "ObjectStoreDep",
    "DispatcherDep",
    "OwnerDep",
    "PageOwnerDep",
    "SignInRequired",
    "api_key_of",
]

# Methods that change nothing: a cookie alone may authorise them (no CSRF token needed).
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


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
    """The owner of the request's API key or, without a key, of its browser session cookie
    (api_keys mode), or the local owner (single_user).

    A cookie-authenticated request that changes state must carry the session's CSRF token: a
    cookie is sent along with another site's forms, a token is not. Its own short DB session:
    the lookup must not hold a connection for a long upload.
    """
    if settings.AUTH_MODE == "single_user":
        return LOCAL_OWNER
    key = api_key_of(request)
    token = request.cookies.get(SESSION_COOKIE)
    try:
        with get_sessionmaker(settings.DATABASE_URL)() as session:
            if key is not None or not token:
                return owner_for_key(session, key)
            owner = owner_for_session(session, token)
    except AuthError as error:
        raise HTTPException(401, str(error), headers={"WWW-Authenticate": "Bearer"}) from None
    if owner is None:
        raise HTTPException(
            401,
            "the browser session has ended: sign in again",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if request.method not in _SAFE_METHODS and not csrf_matches(
        token, request.headers.get(CSRF_HEADER)
    ):
        raise HTTPException(403, "this request needs the page's CSRF token (X-CSRF-Token)")
    request.state.session_owner = owner  # the pages show who is signed in
    return owner


OwnerDep = Annotated[CurrentOwner, Depends(get_current_owner)]


class SignInRequired(Exception):
    """A page asked for without a usable key or session (-> redirect to the sign-in page)."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def get_page_owner(request: Request, settings: SettingsDep) -> CurrentOwner:
    """As get_current_owner, but a person without a session is sent to sign in."""
    try:
        return get_current_owner(request, settings)
    except HTTPException as error:
        if error.status_code != 401:
            raise
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(path) from None


PageOwnerDep = Annotated[CurrentOwner, Depends(get_page_owner)]


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
