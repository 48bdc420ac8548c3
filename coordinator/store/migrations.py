"""Schema migrations: functions registered in order with :func:`migration`, applied once each.

The ``schema_version`` table records what has been applied::

    @migration(3)
    def add_round_notes(db: Database) -> None:
        db.table("rounds").add_column("notes", str)

A database newer than this code (a version not registered here) is refused rather than
guessed at.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlite_utils import Database

__all__ = ["MIGRATIONS", "SchemaTooNew", "apply_migrations", "migration"]

Migration = Callable[[Database], None]
MIGRATIONS: dict[int, Migration] = {}


class SchemaTooNew(RuntimeError):
    """The database was written by a newer coordinator."""


def migration(version: int) -> Callable[[Migration], Migration]:
    def register(fn: Migration) -> Migration:
        if version in MIGRATIONS:
            raise ValueError(f"migration {version} registered twice")
        MIGRATIONS[version] = fn
        return fn

    return register


def apply_migrations(db: Database) -> int:
    """Apply pending migrations, each in its own transaction; returns the schema version."""
    if "schema_version" not in db.table_names():
        db.table("schema_version").create({"version": int, "applied_at": float}, pk="version")
    applied = {row["version"] for row in db.table("schema_version").rows}
    newest = max(applied, default=0)
    if newest > max(MIGRATIONS, default=0):
        raise SchemaTooNew(f"database schema version {newest} is newer than this coordinator")
    for version in sorted(MIGRATIONS):
        if version in applied:
            continue
        with db.atomic():
            MIGRATIONS[version](db)
            db.table("schema_version").insert({"version": version, "applied_at": time.time()})
    return max(MIGRATIONS, default=0)


@migration(1)
def initial_schema(db: Database) -> None:
    db.table("devices").create(
        {
            "device_id": str,
            "secret_salt": str,
            "secret_hash": str,
            "platform": str,
            "arch": str,
            "runtimes": str,
            "population": str,
            "registered_at": float,
        },
        pk="device_id",
    )
    db.table("bundles").create(
        {"bundle_id": str, "manifest": str, "num_parameters": int, "created_at": float},
        pk="bundle_id",
    )
    db.table("tasks").create(
        {
            "task_id": str,
            "name": str,
            "bundle_id": str,
            "mode": str,
            "population": str,
            "plan": str,
            "state": str,
            "model_version": int,
            "rounds_completed": int,
            "pending_evaluations": int,
            "created_at": float,
        },
        pk="task_id",
        foreign_keys=[("bundle_id", "bundles", "bundle_id")],
    )
    db.table("versions").create(
        {
            "task_id": str,
            "version": int,
            "params_sha": str,
            "optimizer_sha": str,
            "round_id": int,
            "created_at": float,
        },
        pk=("task_id", "version"),
    )
    db.table("rounds").create(
        {
            "round_id": int,
            "task_id": str,
            "number": int,
            "kind": str,
            "state": str,
            "base_version": int,
            "goal": int,
            "target": int,
            "min_reports": int,
            "opened_at": float,
            "window_ends_at": float,
            "selected_at": float,
            "deadline_at": float,
            "closed_at": float,
            "metrics": str,
        },
        pk="round_id",
    )
    db.table("rounds").create_index(["task_id", "state"])
    db.table("candidates").create(
        {"round_id": int, "device_id": str, "checked_in_at": float},
        pk=("round_id", "device_id"),
    )
    db.table("assignments").create(
        {
            "assignment_id": str,
            "round_id": int,
            "task_id": str,
            "device_id": str,
            "action": str,
            "state": str,
            "created_at": float,
            "delivered_at": float,
            "closed_at": float,
            "abort_reason": str,
        },
        pk="assignment_id",
    )
    db.table("assignments").create_index(["round_id", "device_id"], unique=True)
    db.table("updates").create(
        {
            "assignment_id": str,
            "round_id": int,
            "task_id": str,
            "device_id": str,
            "idempotency_key": str,
            "payload_sha": str,
            "payload_bytes": int,
            "num_examples": int,
            "loss": float,
            "report": str,
            "accepted_at": float,
            "response": str,
        },
        pk="assignment_id",
    )
    db.table("updates").create_index(["round_id"])
    db.table("eval_reports").create(
        {
            "assignment_id": str,
            "round_id": int,
            "task_id": str,
            "device_id": str,
            "num_examples": int,
            "loss": float,
            "accuracy": float,
            "reported_at": float,
            "response": str,
        },
        pk="assignment_id",
    )
    db.table("eval_reports").create_index(["round_id"])
