"""API keys and owners: key creation (shown once), hashing at rest, lookup, revocation.

A key reads `scan_<prefix>_<secret>`: the 12-hex-digit prefix is stored in clear to find the row
(and to name the key in listings), the whole key only as its sha256. A leaked database therefore
leaks no usable key; the secret carries 256 bits, so a plain hash (no slow KDF) is enough.
In single-user mode no key is read and every request acts as the `local` owner.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import LOCAL_OWNER_ID, ApiKey, Owner, utcnow

__all__ = [
    "KEY_PREFIX",
    "AuthError",
    "CurrentOwner",
    "LOCAL_OWNER",
    "hash_key",
    "create_key",
    "revoke_key",
    "owner_for_key",
    "key_and_owner_for",
    "get_or_create_owner",
]

logger = logging.getLogger(__name__)

KEY_PREFIX = "scan"
_PREFIX_HEX = 12
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


class AuthError(Exception):
    """The request carries no usable key (-> 401 with this message)."""


@dataclass(frozen=True)
class CurrentOwner:
    """Who a request acts for."""

    id: str
    name: str


LOCAL_OWNER = CurrentOwner(LOCAL_OWNER_ID, LOCAL_OWNER_ID)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _split(key: str) -> str | None:
    """The lookup prefix of a well-formed key, else None."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != _PREFIX_HEX or not parts[2]:
        return None
    return parts[1]


def get_or_create_owner(session: Session, name: str) -> Owner:
    owner = session.scalar(select(Owner).where(Owner.name == name))
    if owner is None:
        owner = Owner(id=LOCAL_OWNER_ID, name=name) if name == LOCAL_OWNER_ID else Owner(name=name)
        session.add(owner)
        session.flush()
    return owner


def create_key(session: Session, owner_name: str, label: str | None = None) -> tuple[str, ApiKey]:
    """A new key for `owner_name` (the owner is created if new): (the key itself, its row).

    The key is returned once and never stored; the caller shows it to the admin.
    """
    owner = get_or_create_owner(session, owner_name)
    prefix = secrets.token_hex(_PREFIX_HEX // 2)
    key = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(owner_id=owner.id, prefix=prefix, key_hash=hash_key(key), name=label)
    session.add(row)
    session.flush()
    logger.info("api key created", extra={"owner": owner_name, "prefix": prefix})
    return key, row


def revoke_key(session: Session, prefix: str) -> bool:
    """Revoke the key with this prefix; False when there is no such (unrevoked) key."""
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    logger.info("api key revoked", extra={"prefix": prefix})
    return True


def owner_for_key(session: Session, key: str | None) -> CurrentOwner:
    """The owner of a valid, unrevoked key; AuthError otherwise."""
    return key_and_owner_for(session, key)[1]


def key_and_owner_for(session: Session, key: str | None) -> tuple[str, CurrentOwner]:
    """(the id of the key's row, its owner) for a valid, unrevoked key; AuthError otherwise."""
    if not key:
        raise AuthError(
            "an API key is required: send `Authorization: Bearer <key>` or `X-API-Key: <key>`"
        )
    prefix = _split(key)
    found = None
    if prefix is not None:
        found = session.execute(
            select(ApiKey.id, ApiKey.key_hash, ApiKey.revoked_at, Owner.id, Owner.name)
            .join(Owner, Owner.id == ApiKey.owner_id)
            .where(ApiKey.prefix == prefix)
        ).one_or_none()
    # Compared in constant time, and also when nothing was found, so timing tells nothing.
    matches = hmac.compare_digest(found.key_hash if found else _DUMMY_HASH, hash_key(key))
    if found is None or not matches or found.revoked_at is not None:
        raise AuthError("invalid or revoked API key")
    return found[0], CurrentOwner(found[3], found[4])
