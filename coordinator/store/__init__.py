"""Persistence behind one interface (:class:`~coordinator.store.base.Store`).

Owns the records the coordinator keeps (devices, bundles, tasks, model versions, rounds,
candidates, assignments, updates, evaluation reports) and their backends: SQLite through
sqlite-utils (a file, or ``:memory:`` for tests). Must not import aiohttp or the service.
"""

from __future__ import annotations

from coordinator.store.base import (
    Assignment,
    Device,
    EvalReport,
    Round,
    Store,
    StoreError,
    Task,
    Update,
    UpdateTotals,
    Version,
)
from coordinator.store.sqlite import SQLiteStore

__all__ = [
    "Assignment",
    "Device",
    "EvalReport",
    "Round",
    "SQLiteStore",
    "Store",
    "StoreError",
    "Task",
    "Update",
    "UpdateTotals",
    "Version",
]
