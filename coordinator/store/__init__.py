"""Persistence behind one interface (:class:`~coordinator.store.base.Store`).

Owns the records the coordinator keeps (devices, bundles, tasks, model versions, rounds,
candidates, assignments, updates, evaluation reports) and their backends, both on the
portable SQL of :mod:`coordinator.store.sql`: SQLite through sqlite-utils (a file, or
``:memory:`` for tests) and PostgreSQL through psycopg 3 (the ``postgres`` extra), which
several coordinator processes can share. Must not import aiohttp or the service.

::

    store = open_store("fedge.db")                          # SQLite file (or sqlite:fedge.db)
    store = open_store("postgresql://fedge@db/fedge")       # PostgreSQL
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote, unquote

from coordinator.store.base import (
    ROUND_DURATION_BOUNDS,
    Assignment,
    DatabaseInUse,
    Device,
    DeviceAuth,
    EvalReport,
    PartialSum,
    Round,
    RoundDurations,
    SecAggEvent,
    Store,
    StoreError,
    Task,
    TransactionLost,
    Update,
    UpdateTotals,
    Version,
)
from coordinator.store.sql import _OWN_TABLES
from coordinator.store.sqlite import SQLiteStore
from coordinator.store.sqlite import tables_with_rows as _sqlite_tables_with_rows

__all__ = [
    "ROUND_DURATION_BOUNDS",
    "Assignment",
    "DatabaseInUse",
    "Device",
    "DeviceAuth",
    "EvalReport",
    "PartialSum",
    "Round",
    "RoundDurations",
    "SQLiteStore",
    "SecAggEvent",
    "Store",
    "StoreError",
    "Task",
    "TransactionLost",
    "Update",
    "UpdateTotals",
    "Version",
    "check_location",
    "is_database_url",
    "open_store",
    "redacted",
    "sqlite_path",
    "tables_with_records",
]

_URL_SCHEMES = ("postgresql://", "postgres://")
# The start of a libpq keyword string ("host=db user=fedge ..."), which is not a file name.
_KEYWORDS = re.compile(r"\s*[A-Za-z_]+\s*=")
# A password given as a parameter: "password=..." in a URL's query or a keyword string.
_PASSWORD_PARAM = re.compile(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]*)")


def is_database_url(location: str | Path) -> bool:
    """Whether ``location`` names a PostgreSQL database rather than a SQLite file."""
    return str(location).startswith(_URL_SCHEMES)


def check_location(location: str | Path) -> None:
    """Refuse, with a :class:`StoreError` saying how to write it, a location that is meant
    for a database server but is not a ``postgresql://`` URL: another scheme
    (``postgresql+psycopg://``, ``mysql://``) or a libpq keyword string. Taken for a
    file name, it would become an empty SQLite database of that name. ``sqlite:NAME``
    names any file."""
    text = str(location)
    if is_database_url(text) or text.startswith("sqlite:"):
        return
    if "://" in text or _KEYWORDS.match(text):
        raise StoreError(
            "neither a SQLite file nor a postgresql:// URL: write a "
            "PostgreSQL database as postgresql://USER:PASSWORD@HOST:PORT/DATABASE (and a "
            "file whose name looks like this as sqlite:NAME)"
        )


def sqlite_path(location: str | Path) -> str:
    """The SQLite file a location names: a path, ``sqlite:PATH`` or ``sqlite:///ABSPATH``."""
    text = str(location)
    if text.startswith("sqlite:"):
        text = text.removeprefix("sqlite:")
        text = text[2:] if text.startswith("//") else text
    return text


def _passwords(text: str) -> list[str]:
    """The passwords ``text`` carries: the user information's after its first ``:`` (up to
    the last ``@`` before the host, so that ``/`` or ``@`` in it change nothing) and any
    ``password=`` parameter's, each also percent-decoded and percent-encoded."""
    found = [m.group(2).strip("'") for m in _PASSWORD_PARAM.finditer(text)]
    _, scheme_sep, rest = text.partition("://")
    if scheme_sep:
        authority = rest.split("?", 1)[0]
        user_info, at, _ = authority.rpartition("@")
        if at and ":" in user_info:
            found.append(user_info.split(":", 1)[1])
    return [v for p in found if p for v in {p, unquote(p), quote(unquote(p), safe="")} if v]


def redacted(location: str | Path, message: str | None = None) -> str:
    """``message`` (by default the location itself) fit for messages and logs: every
    password that ``location`` carries replaced by ``***``, also where a driver's error
    quotes it."""
    text = str(location)
    out = text if message is None else message
    for secret in sorted(_passwords(text), key=len, reverse=True):
        out = out.replace(secret, "***")
    return out


def open_store(location: str | Path) -> Store:
    """The store at ``location``: a ``postgresql://`` URL, else a SQLite file (see
    :func:`sqlite_path`; ``:memory:`` for tests). Migrations are applied before it is
    returned. A location meant for a server but not written as such is refused
    (:func:`check_location`)."""
    check_location(location)
    if is_database_url(location):
        # psycopg is an optional extra: imported only by those who use PostgreSQL.
        from coordinator.store.postgres import PostgresStore

        return PostgresStore(str(location))
    return SQLiteStore(sqlite_path(location))


def tables_with_records(location: str | Path) -> list[str]:
    """The tables of the database at ``location`` that hold records (the database's own
    bookkeeping, its schema version and identity, left out), read without opening a store:
    :func:`open_store` would first migrate the database to this code's schema, which a
    coordinator of an older version then refuses to start on."""
    check_location(location)
    if is_database_url(location):
        from coordinator.store.postgres import tables_with_rows

        filled = tables_with_rows(str(location))
    else:
        filled = _sqlite_tables_with_rows(sqlite_path(location))
    return [t for t in filled if t not in _OWN_TABLES]
