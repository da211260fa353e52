"""Browser sessions in api_keys mode: a person signs in with an API key once and the browser
then carries a session cookie, since pages and their <img> tags cannot send a key header.

The cookie holds a random 256-bit token, never the key; the database keeps only its sha256
(as for keys), so a leaked table opens no session. A session ends at its expiry, at sign-out,
or when the key it was opened with is revoked. Requests that change state with a cookie must
also carry the session's CSRF token (`X-CSRF-Token`, or a `csrf_token` form field): an HMAC of
the cookie's token, which another site's page can neither read nor compute.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.auth import CurrentOwner, key_and_owner_for
from app.db.models import ApiKey, BrowserSession, Owner, utcnow

__all__ = [
    "SESSION_COOKIE",
    "CSRF_HEADER",
    "CSRF_FIELD",
    "open_session",
    "owner_for_session",
    "end_session",
    "csrf_token",
    "csrf_matches",
]

logger = logging.getLogger(__name__)

SESSION_COOKIE = "scan_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
_TOKEN_PREFIX = "scans_"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; every stored time is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def open_session(session: Session, key: str | None, ttl_s: int) -> tuple[str, CurrentOwner]:
    """A new browser session for a valid key: (the cookie's token, its owner); AuthError for
    a wrong or revoked key."""
    key_id, owner = key_and_owner_for(session, key)
    token = _TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(
        BrowserSession(
            token_hash=_hash(token),
            api_key_id=key_id,
            owner_id=owner.id,
            expires_at=utcnow() + timedelta(seconds=ttl_s),
        )
    )
    session.flush()
    logger.info("browser signed in", extra={"owner": owner.name})
    return token, owner


def owner_for_session(session: Session, token: str | None) -> CurrentOwner | None:
    """The owner of a live session (not expired, not ended, its key not revoked), else None."""
    if not token or not token.startswith(_TOKEN_PREFIX):
        return None
    found = session.execute(
        select(BrowserSession.expires_at, BrowserSession.ended_at, ApiKey.revoked_at, Owner.id)
        .add_columns(Owner.name)
        .join(ApiKey, ApiKey.id == BrowserSession.api_key_id)
        .join(Owner, Owner.id == BrowserSession.owner_id)
        .where(BrowserSession.token_hash == _hash(token))
    ).one_or_none()
    if found is None or found.ended_at is not None or found.revoked_at is not None:
        return None
    if _aware(found.expires_at) <= utcnow():
        return None
    return CurrentOwner(found[3], found[4])


def end_session(session: Session, token: str | None) -> bool:
    """Sign-out: the session stops working at once (also for a copy of the cookie)."""
    if not token:
        return False
    ended = session.execute(
        update(BrowserSession)
        .where(BrowserSession.token_hash == _hash(token), BrowserSession.ended_at.is_(None))
        .values(ended_at=utcnow())
        .returning(BrowserSession.id)
    ).first()
    return ended is not None


def csrf_token(token: str) -> str:
    """The CSRF token of the session whose cookie holds `token`."""
    return hmac.new(token.encode("utf-8"), b"scan-csrf", hashlib.sha256).hexdigest()


def csrf_matches(token: str, candidate: str | None) -> bool:
    return bool(candidate) and hmac.compare_digest(csrf_token(token), str(candidate))
