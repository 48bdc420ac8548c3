"""``fedge db``: the coordinator's database.

``fedge db migrate --from fedge.db --to postgresql://USER:PASSWORD@HOST/DB`` copies every
record of one store into another that holds none yet (its schema is created on opening), in
one transaction, in the source's insertion order; either side may be SQLite (a path or
``sqlite:PATH``) or PostgreSQL. Stop the coordinator first: records written during the copy
would be missed. Blobs are files, not records: serve with ``--blobs`` pointing at the old
blob directory (``fedge.db.blobs``), or copy that directory where the replicas share it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedge.cli import CommandError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "db",
        help="copy the coordinator's records between databases",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = p.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    m = commands.add_parser("migrate", help="copy every record into another, empty database")
    m.add_argument("--from", dest="source", required=True, help="SQLite file or postgresql:// URL")
    m.add_argument("--to", dest="target", required=True, help="SQLite file or postgresql:// URL")
    m.set_defaults(func=migrate)


def migrate(args: argparse.Namespace) -> int:
    from coordinator.store import (
        StoreError,
        check_location,
        is_database_url,
        open_store,
        redacted,
        sqlite_path,
        tables_with_records,
    )
    from coordinator.store.sql import SQLStore

    for location in (args.source, args.target):
        try:
            check_location(location)
        except StoreError as e:
            raise CommandError(f"{redacted(location)}: {e}") from e
    if not is_database_url(args.source) and not Path(sqlite_path(args.source)).is_file():
        raise CommandError(f"no SQLite database at {args.source}")
    # Read, not opened, as the destination below: opening would create the coordinator's
    # tables in a mistyped source (a URL without the deployment's search_path, an empty
    # file), and copying its nothing would pass for a migration.
    try:
        records = tables_with_records(args.source)
    except Exception as e:  # unreachable server, bad credentials, not a database
        raise CommandError(redacted(args.source, f"cannot open {args.source}: {e}")) from e
    if not records:
        raise CommandError(redacted(args.source, f"{args.source} holds no records: nothing to "
                                    "copy (is it the deployment's database?); nothing was "
                                    "changed"))  # fmt: skip
    # Before either store is opened: opening migrates a database to this code's schema, and
    # a destination refused for its records must be left as it was (a deployment of an
    # older version refuses to start on a database migrated past it).
    try:
        filled = tables_with_records(args.target)
    except Exception as e:  # unreachable server, bad credentials, not a database
        raise CommandError(redacted(args.target, f"cannot open {args.target}: {e}")) from e
    if filled:
        raise CommandError(redacted(args.target, f"{args.target}: the destination already "
                                    f"holds records ({', '.join(filled)}); nothing was "
                                    "changed there"))  # fmt: skip
    stores: list[Any] = []
    try:
        for location in (args.source, args.target):
            try:
                stores.append(open_store(location))
            except Exception as e:  # unreachable server, bad credentials, newer schema
                raise CommandError(redacted(location, f"cannot open {location}: {e}")) from e
        source, target = stores
        assert isinstance(source, SQLStore) and isinstance(target, SQLStore)
        try:
            copied = target.copy_from(source)
        except StoreError as e:
            raise CommandError(redacted(args.target, f"{args.target}: {e}")) from e
        except Exception as e:  # the driver's: a constraint, a lost connection, a full disk
            message = (f"copying into {args.target} failed, nothing was kept there "
                       f"(one transaction, rolled back): {type(e).__name__}: {e}")  # fmt: skip
            raise CommandError(redacted(args.source, redacted(args.target, message))) from e
    finally:
        for s in stores:
            s.close()
    for table, rows in copied.items():
        print(f"{table}: {rows} rows")
    print(f"copied {sum(copied.values())} rows from {redacted(args.source)} "
          f"to {redacted(args.target)}")  # fmt: skip
    return 0
