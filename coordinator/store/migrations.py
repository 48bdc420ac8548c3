"""Schema migrations: functions registered in order with :func:`migration`, applied once each,
on every backend.

A migration is written against :class:`Schema`, the part of sqlite-utils' table API that
migrations use (create a table, add a column or an index, run a statement). On SQLite it is
sqlite-utils' own ``Database``; on PostgreSQL :class:`~coordinator.store.postgres_schema.
PostgresSchema` translates the same calls (types, keys, identity columns), so one migration
serves both and the dialect lives in that one class. The ``schema_version`` table records
what has been applied::

    @migration(3)
    def add_round_notes(db: Schema) -> None:
        db.table("rounds").add_column("notes", str)

A database newer than this code (a version not registered here) is refused rather than
guessed at.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

__all__ = ["MIGRATIONS", "Schema", "SchemaTable", "SchemaTooNew", "apply_migrations", "migration"]


class SchemaTable(Protocol):
    """One table, as a migration may change it."""

    def create(self, columns: dict[str, Any], pk: Any = ..., foreign_keys: Any = ...) -> Any: ...
    def create_index(
        self, columns: Iterable[str], index_name: str | None = None, unique: bool = False
    ) -> Any: ...
    def add_column(self, col_name: str, col_type: Any | None = None) -> Any: ...
    def insert(self, record: dict[str, Any]) -> Any: ...
    @property
    def rows(self) -> Iterable[dict[str, Any]]: ...


class Schema(Protocol):
    """A database, as migrations see it (statements use ``?`` placeholders)."""

    def table(self, table_name: str) -> SchemaTable: ...
    def table_names(self) -> list[str]: ...
    def execute(self, sql: str, parameters: Any = None) -> Any: ...
    def atomic(self) -> AbstractContextManager[Any]: ...


Migration = Callable[[Schema], None]
MIGRATIONS: dict[int, Migration] = {}
M = TypeVar("M", bound=Callable[..., None])


class SchemaTooNew(RuntimeError):
    """The database was written by a newer coordinator."""


def migration(version: int) -> Callable[[M], M]:
    def register(fn: M) -> M:
        if version in MIGRATIONS:
            raise ValueError(f"migration {version} registered twice")
        MIGRATIONS[version] = fn
        return fn

    return register


def apply_migrations(db: Schema) -> int:
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
def initial_schema(db: Schema) -> None:
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


@migration(2)
def hot_path_indexes(db: Schema) -> None:
    """Indexes for lookups that otherwise scan a table growing with history.

    ``updates(payload_sha)``: whether a closing round's payload is shared with an open round
    (once per payload of every closed round). ``rounds(state)``: every tick's open rounds.
    ``rounds(task_id, base_version)``: an async task's staleness window, and retention.
    tests/coordinator/store/test_query_plans.py checks the hot queries use them.
    """
    db.table("updates").create_index(["payload_sha"])
    db.table("rounds").create_index(["state"])
    db.table("rounds").create_index(["task_id", "base_version"])


@migration(3)
def task_failure(db: Schema) -> None:
    """``tasks.failure``: why a task the coordinator marked ``failed`` cannot proceed."""
    db.table("tasks").add_column("failure", str)


@migration(4)
def device_last_seen(db: Schema) -> None:
    """``devices.last_seen_at``: when the device last checked in (coarse: written at most once
    per retention granularity), for retention's optional inactivity bound."""
    db.table("devices").add_column("last_seen_at", float)


@migration(5)
def secagg_events(db: Schema) -> None:
    """``secagg_events``: every message a round's secure aggregation accepted and every stage
    it closed, in order (``seq``), so that the session is rebuilt after a restart
    (:mod:`coordinator.secagg.rounds`). ``body`` holds public keys, share ciphertexts and
    opened shares (JSON, base64); a masked vector is a blob (``payload_sha``)."""
    db.table("secagg_events").create(
        {
            "round_id": int,
            "seq": int,
            "kind": str,
            "device_id": str,
            "body": str,
            "payload_sha": str,
            "at": float,
        },
        pk=("round_id", "seq"),
    )
    db.table("secagg_events").create_index(["payload_sha"])


@migration(6)
def replica_partial_sums(db: Schema) -> None:
    """``partial_sums``: each coordinator replica's durable share of an open round's aggregate
    (:mod:`coordinator.replicas`), written in the transaction that stores the updates it
    folds; a commit adds up the round's rows."""
    db.table("partial_sums").create(
        {
            "round_id": int,
            "replica_id": str,
            "count": int,
            "weight": float,
            "examples": int,
            "staleness_sum": int,
            "staleness_max": int,
            "total": bytes,
            "updated_at": float,
        },
        pk=("round_id", "replica_id"),
    )


@migration(7)
def retired_updates(db: Schema) -> None:
    """``tasks.updates_retired``: how many of the task's update rows retention deleted with
    their rounds, added in the transaction that deletes them (NULL: none), so that the
    updates ever accepted (the rows stored plus these) do not shrink with history."""
    db.table("tasks").add_column("updates_retired", int)


@migration(8)
def replica_update_numbers(db: Schema) -> None:
    """``updates.replica_id`` and ``updates.replica_seq``: which replica stored an update and
    its number among that replica's updates of the round, so that a partial sum need not be
    written with every batch (:mod:`coordinator.replicas`): a commit folds, from their
    payloads, the updates numbered past their replica's partial sum."""
    db.table("updates").add_column("replica_id", str)
    db.table("updates").add_column("replica_seq", int)


@migration(9)
def store_identity(db: Schema) -> None:
    """``store_identity``: one row naming this database (``store_id``, random), counting the
    coordinator starts on it (``generation``), and naming the database ``fedge db migrate``
    copied its records from with that one's count at the copy (``predecessor``,
    ``predecessor_generation``), so that a blob directory can name the database it belongs
    to: a coordinator started on another database would otherwise take the directory for
    its own and, as it starts, delete every blob its records do not name
    (:meth:`coordinator.blobs.BlobStore.claim`)."""
    db.table("store_identity").create(
        {
            "store_id": str,
            "generation": int,
            "predecessor": str,
            "predecessor_generation": int,
            "created_at": float,
        },
        pk="store_id",
    )
    db.table("store_identity").insert(
        {
            "store_id": uuid.uuid4().hex,
            "generation": 0,
            "predecessor": None,
            "predecessor_generation": None,
            "created_at": time.time(),
        }
    )


@migration(10)
def retired_update_bytes(db: Schema) -> None:
    """``tasks.update_bytes_retired``: the payload bytes of the update rows counted in
    ``updates_retired`` (NULL: none), so that the bytes of the updates ever accepted do not
    shrink with history either: ``/metrics`` reads both from the store, and every process
    and replica of a node reports them alike, whatever it saw before retention ran."""
    db.table("tasks").add_column("update_bytes_retired", int)


@migration(11)
def retired_round_durations(db: Schema) -> None:
    """``retired_round_durations``: the closed rounds retention deleted, counted per task and
    outcome under the bound (``le``, seconds) their duration fell under, with the durations'
    sum, added in the transaction that deletes them, so that the round-duration histogram
    ``/metrics`` reads from the store does not shrink with history either."""
    db.table("retired_round_durations").create(
        {"task_id": str, "outcome": str, "le": float, "rounds": int, "seconds": float},
        pk=("task_id", "outcome", "le"),
    )


@migration(12)
def version_blob_indexes(db: Schema) -> None:
    """``versions(params_sha)``, ``versions(optimizer_sha)``: whether a blob is named by a
    version (:meth:`~coordinator.store.base.Store.blob_referenced`), asked under each blob's
    lock by retention for every blob a pass deletes and by the replicas' orphan sweep; without
    them each lookup scans the versions: long, while retention catches up with a history."""
    db.table("versions").create_index(["params_sha"])
    db.table("versions").create_index(["optimizer_sha"])
