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

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from coordinator.store.base import (
    Assignment,
    Device,
    DeviceAuth,
    EvalReport,
    PartialSum,
    Round,
    SecAggEvent,
    Store,
    StoreError,
    Task,
    TransactionLost,
    Update,
    UpdateTotals,
    Version,
)
from coordinator.store.sqlite import SQLiteStore

__all__ = [
    "Assignment",
    "Device",
    "DeviceAuth",
    "EvalReport",
    "PartialSum",
    "Round",
    "SQLiteStore",
    "SecAggEvent",
    "Store",
    "StoreError",
    "Task",
    "TransactionLost",
    "Update",
    "UpdateTotals",
    "Version",
    "is_database_url",
    "open_store",
    "redacted",
    "sqlite_path",
]

_URL_SCHEMES = ("postgresql://", "postgres://")


def is_database_url(location: str | Path) -> bool:
    """Whether ``location`` names a PostgreSQL database rather than a SQLite file."""
    return str(location).startswith(_URL_SCHEMES)


def sqlite_path(location: str | Path) -> str:
    """The SQLite file a location names: a path, ``sqlite:PATH`` or ``sqlite:///ABSPATH``."""
    text = str(location)
    if text.startswith("sqlite:"):
        text = text.removeprefix("sqlite:")
        text = text[2:] if text.startswith("//") else text
    return text


def redacted(location: str | Path) -> str:
    """A location fit for messages and logs: a URL's password replaced by ``***``."""
    text = str(location)
    parts = urlsplit(text)
    if not is_database_url(text) or parts.password is None:
        return text
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def open_store(location: str | Path) -> Store:
    """The store at ``location``: a ``postgresql://`` URL, else a SQLite file (see
    :func:`sqlite_path`; ``:memory:`` for tests). Migrations are applied before it is
    returned."""
    if is_database_url(location):
        # psycopg is an optional extra: imported only by those who use PostgreSQL.
        from coordinator.store.postgres import PostgresStore

        return PostgresStore(str(location))
    return SQLiteStore(sqlite_path(location))
