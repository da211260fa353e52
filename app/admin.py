"""`scan-admin` (python -m app.admin): manage owners and API keys from the command line.

    scan-admin create-key --owner alice [--name laptop]   # prints the key, once
    scan-admin list-keys [--owner alice]
    scan-admin revoke-key <prefix>
    scan-admin remove-orphans [--older-than-s 3600] [--dry-run]   # objects no row names

It uses the service's settings (DATABASE_URL...) and migrates the database first, so it also
works before the API has ever started. Keys are stored only as their sha256.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sqlalchemy import select

from app.auth import create_key, revoke_key
from app.core.config import get_settings
from app.db.migrate import upgrade_to_head
from app.db.models import ApiKey, Owner
from app.db.session import session_scope

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scan-admin", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create-key", help="create an API key (and its owner if new)")
    create.add_argument("--owner", required=True, help="owner name; created when new")
    create.add_argument("--name", default=None, help="a label for the key, e.g. the machine")
    listing = commands.add_parser("list-keys", help="list keys by prefix (never the key itself)")
    listing.add_argument("--owner", default=None, help="only this owner's keys")
    revoke = commands.add_parser("revoke-key", help="revoke a key; requests with it get 401")
    revoke.add_argument("prefix", help="the key's prefix, as list-keys shows it")
    orphans = commands.add_parser(
        "remove-orphans",
        help="delete stored objects of datasets and jobs that have no row (left by a crash "
        "between writing objects and committing rows, or by a store down during a deletion)",
    )
    orphans.add_argument(
        "--older-than-s",
        type=float,
        default=3600.0,
        help="only folders untouched this long (an upload in progress has no row yet)",
    )
    orphans.add_argument("--dry-run", action="store_true", help="list them, delete nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one admin command; the process exit status."""
    args = _parser().parse_args(argv)
    settings = get_settings()
    if settings.MIGRATE_ON_START:
        upgrade_to_head(settings.DATABASE_URL)
    out = sys.stdout
    if args.command == "create-key":
        owner = args.owner.strip()
        if not owner or len(owner) > 255:
            print("scan-admin: --owner must be 1 to 255 characters", file=sys.stderr)
            return 2
        with session_scope() as session:
            key, row = create_key(session, owner, args.name)
            out.write(f"{key}\n")
            print(
                f"created key {row.prefix} for owner {owner!r}; it is shown only this once",
                file=sys.stderr,
            )
        return 0
    if args.command == "remove-orphans":
        from app.db.session import get_sessionmaker
        from app.storage import object_store
        from app.storage.orphans import find_orphans, remove_orphans

        act = find_orphans if args.dry_run else remove_orphans
        for prefix in act(object_store(settings), get_sessionmaker(), args.older_than_s):
            out.write(f"{prefix}\n")
        return 0
    if args.command == "list-keys":
        with session_scope() as session:
            query = select(
                ApiKey.prefix, Owner.name, ApiKey.name, ApiKey.created_at, ApiKey.revoked_at
            ).join(Owner, Owner.id == ApiKey.owner_id)
            if args.owner:
                query = query.where(Owner.name == args.owner)
            for prefix, owner_name, label, created, revoked in session.execute(
                query.order_by(Owner.name, ApiKey.created_at)
            ):
                state = f"revoked {revoked:%Y-%m-%d}" if revoked else "active"
                out.write(f"{prefix}\t{owner_name}\t{label or '-'}\t{created:%Y-%m-%d}\t{state}\n")
        return 0
    with session_scope() as session:
        if not revoke_key(session, args.prefix):
            print(f"scan-admin: no active key with prefix {args.prefix!r}", file=sys.stderr)
            return 1
    print(f"revoked key {args.prefix}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
