"""Signing in from a browser (api_keys mode): `/sign-in` takes an API key once and answers with
a session cookie (app.web_sessions); `/sign-out` ends the session. In single_user mode there is
no one to sign in and both pages send the browser to the start page.

The cookie is HttpOnly (no script reads it), SameSite=Lax (other sites' forms and fetches go
without it), Secure over https, and expires with the session. The sign-in form itself is
refused when another site posts it (Origin / Sec-Fetch-Site), so no page can sign a visitor in
under someone else's key.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app.api.deps import SettingsDep
from app.api.templating import templates
from app.auth import AuthError
from app.core.config import Settings
from app.db.session import get_sessionmaker
from app.web_sessions import SESSION_COOKIE, csrf_matches, end_session, open_session

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)


def _safe_next(next_path: str | None) -> str:
    """Only a path on this site (never `//other.host` or `https://...`): no open redirect."""
    if not next_path or not next_path.startswith("/") or next_path.startswith(("//", "/\\")):
        return "/"
    return next_path


def _same_site(request: Request) -> bool:
    """False for a form another site's page submitted (browsers send these headers)."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True  # an older browser or a script: SameSite and the key itself still guard
    parts = urlsplit(origin)
    return parts.netloc == request.headers.get("host", request.url.netloc)


def _form(request: Request, next_path: str, error: str | None, status_code: int) -> HTMLResponse:
    return templates.TemplateResponse(
        request,
        "sign_in.html",
        {"api": "/api/v1", "next": next_path, "error": error},
        status_code=status_code,
        headers={"Cache-Control": "no-store"},
    )


def _secure(request: Request, settings: Settings) -> bool:
    return settings.SESSION_COOKIE_SECURE or request.url.scheme == "https"


@router.get("/sign-in", response_class=HTMLResponse)
def sign_in_page(
    request: Request, settings: SettingsDep, next_path: str = Query("/", alias="next")
) -> Response:
    """The form: one field for the API key."""
    if settings.AUTH_MODE == "single_user":
        return RedirectResponse("/", status_code=303)
    return _form(request, _safe_next(next_path), None, 200)


@router.post("/sign-in", response_class=HTMLResponse)
def sign_in(
    request: Request,
    settings: SettingsDep,
    key: str = Form(""),
    next_path: str = Form("/", alias="next"),
) -> Response:
    """Check the key; a good one opens a session and sends the browser on to `next`."""
    if settings.AUTH_MODE == "single_user":
        return RedirectResponse("/", status_code=303)
    if not _same_site(request):
        raise HTTPException(403, "sign-in forms from other sites are refused")
    target = _safe_next(next_path)
    try:
        with get_sessionmaker(settings.DATABASE_URL)() as session:
            token, _ = open_session(session, key.strip() or None, settings.SESSION_TTL_S)
            session.commit()
    except AuthError:
        return _form(request, target, "That key is not valid (or was revoked).", 401)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=settings.SESSION_TTL_S,
        path="/",
        httponly=True,
        samesite="lax",
        secure=_secure(request, settings),
    )
    return response


@router.post("/sign-out")
def sign_out(request: Request, settings: SettingsDep, csrf_token: str = Form("")) -> Response:
    """End the browser's session (also any copy of its cookie) and forget the cookie."""
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        if not csrf_matches(token, csrf_token):
            raise HTTPException(403, "sign-out needs the page's CSRF token")
        with get_sessionmaker(settings.DATABASE_URL)() as session:
            end_session(session, token)
            session.commit()
    response = RedirectResponse("/sign-in", status_code=303)
    response.delete_cookie(
        SESSION_COOKIE, path="/", httponly=True, samesite="lax", secure=_secure(request, settings)
    )
    return response
