"""The Jinja2 templates of the pages, with what every page shows: who is signed in (browser
session) and the CSRF token its scripts send back with each request that changes state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.templating import Jinja2Templates

from app.web_sessions import SESSION_COOKIE, csrf_token

__all__ = ["templates", "APP_DIR"]

APP_DIR = Path(__file__).resolve().parents[1]


def _session_context(request: Request) -> dict[str, Any]:
    owner = getattr(request.state, "session_owner", None)  # set when a cookie authenticated
    token = request.cookies.get(SESSION_COOKIE)
    if owner is None or not token:
        return {"csrf_token": "", "signed_in_as": None}
    return {"csrf_token": csrf_token(token), "signed_in_as": owner.name}


templates = Jinja2Templates(directory=APP_DIR / "templates", context_processors=[_session_context])
