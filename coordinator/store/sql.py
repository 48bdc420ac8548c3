"""Every :class:`~coordinator.store.base.Store` method written once, in SQL that SQLite and
PostgreSQL both run.

A backend subclasses :class:`SQLStore` and supplies its connection (``_execute``,
``_execute_many``, ``_query``, ``atomic``), its catalogue (``_table_names``, ``_columns``),
the exceptions its driver raises for a broken constraint, and the few expressions the two
dialects spell differently (reading a member of a JSON text column). Statements use ``?``
placeholders and double-quoted identifiers; a driver with another parameter style
translates them. Insertion order is ``rowid`` in both: SQLite's own, a hidden identity
column on PostgreSQL (see :mod:`coordinator.store.postgres_schema`).

What every check-in reads and rarely changes (a population's tasks, a task's open round, a
round's assignment count) is cached while the database is unchanged, where the backend can
tell (``_change_marker``: SQLite's ``PRAGMA data_version`` and the connection's own change
count, which see commits of every connection and process; never inside a transaction).
"""

from __future__ import annotations

import json
from abc import abstractmethod
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import fields
from typing import Any, Protocol, TypeVar

from coordinator.store.base import (
    ROUND_DURATION_BOUNDS,
    Assignment,
    Device,
    DeviceAuth,
    EvalReport,
    PartialSum,
    Round,
    RoundDurations,
    SecAggEvent,
    Store,
    StoreError,
    StoreIdentity,
    Task,
    Update,
    UpdateTotals,
    Version,
)
from coordinator.store.migrations import Schema

__all__ = ["Cursor", "SQLStore"]

R = TypeVar("R")
# Record fields stored as JSON text.
_JSON_FIELDS = {"runtimes", "plan", "metrics", "report", "response", "body"}
_OPEN = "('selecting', 'reporting')"
_IN_FLIGHT_STATES = ("selected", "delivered")
_IN_FLIGHT = "('selected', 'delivered')"
_PARTIAL_KEY = ("round_id", "replica_id")
# Tables that describe the database itself, not its records: never copied.
_OWN_TABLES = ("schema_version", "store_identity")
# Entries of the read cache (SQLStore._cached); past it the cache starts again, empty.
_CACHE_MAX = 4096


class _NotInFlight(Exception):
    """Rolls back a report whose assignment is no longer in flight (``_add_report``)."""


class Cursor(Protocol):
    """What both drivers' cursors offer (``sqlite3.Cursor``, ``psycopg.Cursor``)."""

    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def fetchmany(self, size: int = ...) -> list[Any]: ...


def _to_row(record: Any) -> dict[str, Any]:
    # Shallow: the JSON fields are serialised right here, so asdict()'s deep copy of them
    # (a tenth of an accepted upload's CPU) would be thrown away.
    row = {name: getattr(record, name) for name in _field_order(type(record))}
    for k in _JSON_FIELDS & row.keys():
        row[k] = json.dumps(row[k], sort_keys=True)
    return row


_FIELD_ORDER: dict[type, tuple[str, ...]] = {}


def _field_order(cls: type) -> tuple[str, ...]:
    names = _FIELD_ORDER.get(cls)
    if names is None:
        names = _FIELD_ORDER[cls] = tuple(f.name for f in fields(cls))
    return names


_FIELD_NAMES: dict[type, frozenset[str]] = {}


def _field_names(cls: type) -> frozenset[str]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = frozenset(f.name for f in fields(cls))
    return names


def _from_row(cls: type[R], row: dict[str, Any]) -> R:
    names = _field_names(cls)
    values = {k: v for k, v in row.items() if k in names}
    for k in _JSON_FIELDS & values.keys():
        values[k] = json.loads(values[k]) if values[k] is not None else None
    if "runtimes" in values:
        values["runtimes"] = tuple(values["runtimes"])
    if "metrics" in values and values["metrics"] is None:
        values["metrics"] = {}
    return cls(**values)


def _chunks(values: Sequence[int], size: int = 500) -> Iterator[list[int]]:
    """Id lists in pieces that stay below SQLite's limit on bound parameters."""
    ids = [int(v) for v in values]
    for i in range(0, len(ids), size):
        yield ids[i : i + size]


def _marks(n: int) -> str:
    return ", ".join("?" * n)


# A closed round's duration, and the bound of ROUND_DURATION_BOUNDS it is counted under:
# the smallest at or above it, else the unbounded bucket's, infinity, which the dialects
# spell differently and so is the statement's last parameter (NULL: no duration).
_DURATION = "closed_at - opened_at"
_DURATION_BOUND = (
    f"case when {_DURATION} is null then null "
    + " ".join(f"when {_DURATION} <= {b!r} then {b!r}" for b in ROUND_DURATION_BOUNDS)
    + " else ? end"
)


class SQLStore(Store):
    schema: Schema  # what migrations run against
    schema_version: int
    # The driver's exceptions for a broken unique, primary or foreign key.
    _integrity_errors: tuple[type[Exception], ...] = ()
    # (change marker, {key: value}): see _cached.
    _read_cache: tuple[Hashable, dict[tuple[Any, ...], Any]] | None = None
    # {(table, primary key): record}: see _txn_row. None outside a write transaction that
    # excludes every other writer.
    _txn_rows: dict[tuple[str, Any], Any] | None = None

    # -- what a backend supplies ------------------------------------------------------------

    @abstractmethod
    def _execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        """Run one statement; rows come back as tuples."""

    @abstractmethod
    def _execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    @abstractmethod
    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run one query; rows come back as dicts keyed by column name."""

    @abstractmethod
    def _table_names(self) -> list[str]: ...

    @abstractmethod
    def _columns(self, table: str) -> list[str]:
        """The table's columns in order, without hidden bookkeeping ones."""

    def _guarded(self) -> AbstractContextManager[Any]:
        """Around one statement whose failure a caller may catch (a duplicate key): keeps an
        enclosing transaction usable after it. SQLite undoes just the failed statement on
        its own; PostgreSQL needs a savepoint."""
        return nullcontext()

    def _for_update(self, skip_locked: bool) -> str:
        """The clause that locks the rows a select reads until the transaction ends; none
        where one writer at a time holds the whole database (SQLite)."""
        return ""

    def _records_copied(self) -> None:
        """Called after :meth:`copy_from` wrote explicit keys (e.g. to move sequences on)."""

    @abstractmethod
    def _read_snapshot(self) -> AbstractContextManager[None]:
        """A read-only transaction whose reads all see the database as it was at its first
        one, whatever other connections commit meanwhile (:meth:`copy_from`'s source)."""

    @abstractmethod
    def _json_text(self, expr: str, key: str) -> str:
        """SQL for member ``key`` of the JSON text ``expr``, as SQL text (null if absent)."""

    @abstractmethod
    def _json_number(self, expr: str, key: str) -> str:
        """The same member as an SQL number."""

    @abstractmethod
    def _json_members(self, expr: str, key: str) -> str:
        """A table-valued expression over member ``key`` (an object) of the JSON text
        ``expr``: one row per entry, its JSON in column ``value``."""

    # -- helpers ----------------------------------------------------------------------------

    def _insert_row(self, table: str, row: dict[str, Any], returning: str | None = None) -> Any:
        cols = ", ".join(f'"{k}"' for k in row)
        sql = f'insert into "{table}" ({cols}) values ({_marks(len(row))})'
        if returning is not None:
            sql += f' returning "{returning}"'
        try:
            with self._guarded():
                cur = self._execute(sql, list(row.values()))
                # SQLite finishes (and commits) a RETURNING statement once its rows are read.
                rows = cur.fetchall() if returning is not None else []
        except self._integrity_errors as e:
            raise StoreError(f"{table}: {e}") from e
        return rows[0][0] if rows else None

    def _insert(self, table: str, record: Any) -> None:
        self._insert_row(table, _to_row(record))

    def _rows(
        self,
        table: str,
        where: str,
        args: Sequence[Any] = (),
        *,
        order_by: str | None = None,
        select: str = "*",
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        sql = f'select {select} from "{table}" where {where}'
        if order_by is not None:
            sql += f" order by {order_by}"
        if limit is not None:
            sql += f" limit {int(limit)}"
        return self._query(sql, args)

    def _get(self, cls: type[R], table: str, where: str, args: Sequence[Any]) -> R | None:
        rows = self._rows(table, where, args, limit=1)
        return _from_row(cls, rows[0]) if rows else None

    def _list(
        self, cls: type[R], table: str, where: str, args: Sequence[Any], order: str
    ) -> list[R]:
        return [_from_row(cls, r) for r in self._rows(table, where, args, order_by=order)]

    def _update(
        self, table: str, key: dict[str, Any], values: dict[str, Any],
        states: Sequence[str] | None = None,
    ) -> bool:  # fmt: skip
        """Set columns of the record with primary ``key`` (column -> value); a record that is
        not there is a :class:`StoreError`. With ``states``, only a record whose ``state`` is
        one of them changes: False if it is in another."""
        if not values:
            return True
        sets = ", ".join(f'"{k}" = ?' for k in values)
        keyed = " and ".join(f'"{k}" = ?' for k in key)
        args = [json.dumps(v, sort_keys=True) if k in _JSON_FIELDS else v
                for k, v in values.items()]  # fmt: skip
        guard = [] if states is None else list(states)
        if states is not None and not guard:
            raise ValueError("no state to move from")
        where = f"{keyed} and state in ({_marks(len(guard))})" if guard else keyed
        sql = f'update "{table}" set {sets} where {where}'
        if self._execute(sql, [*args, *key.values(), *guard]).rowcount == 1:
            return True
        if not guard or not self._rows(table, keyed, list(key.values()), select="1"):
            raise StoreError(f"{table}: no record {key}")
        return False

    def _count(self, sql: str, args: Sequence[Any] = ()) -> int:
        return int(self._execute(sql, args).fetchone()[0])

    # -- rows read again and again inside one write transaction --------------------------

    def _txn_row(self, table: str, key: Any, load: Callable[[], R | None]) -> R | None:
        """``load()`` (a record of ``table``, or None), kept for the rest of the write
        transaction while the backend keeps :attr:`_txn_rows`: a batch of uploads reads its
        round and task several times per upload, and nothing but this transaction can
        change them. :meth:`_may_write` forgets a table's records before any statement that
        may write it; the backend forgets all of them when a savepoint rolls back."""
        rows = self._txn_rows
        if rows is None:
            return load()
        k = (table, key)
        if k in rows:
            return rows[k]
        value = rows[k] = load()
        return value

    def _may_write(self, sql: str) -> None:
        """Before the backend runs ``sql`` while it keeps :attr:`_txn_rows`: anything but a
        read that names a kept table (a join or subquery included) forgets that table. A
        statement writing a table it does not name (through a trigger or a cascading key:
        the schema has neither) would have to forget it too."""
        rows = self._txn_rows
        if not rows:
            return
        lowered = sql.lower()  # SQL keywords and names are case-blind: UPDATE TASKS writes tasks
        if lowered.lstrip()[:6] in ("select", "pragma"):
            return
        for table in {k[0] for k in rows}:
            if table in lowered:
                for k in [k for k in rows if k[0] == table]:
                    del rows[k]

    # -- reads every check-in makes, cached while the database is unchanged ----------------

    def _change_marker(self) -> Hashable | None:
        """A value that moves whenever the database may have changed since it was taken: a
        commit by this connection or by any other, in any process. None when the backend
        cannot tell, or inside a transaction (its reads may be rolled back, and what it
        locks must be read from the database): nothing is then served from the cache, or
        put in it."""
        return None

    def _cached(self, key: tuple[Any, ...], load: Callable[[], R]) -> R:
        """``load()``, or what it returned last time for ``key`` if the database has not
        changed since. Records are frozen; callers must not mutate what they get."""
        marker = self._change_marker()
        if marker is None:
            return load()
        # Taken before loading: a commit landing in between makes the entry look older
        # than it is (re-read next time), never newer.
        cache = self._read_cache
        if cache is None or cache[0] != marker or len(cache[1]) >= _CACHE_MAX:
            cache = self._read_cache = (marker, {})
        entries = cache[1]
        if key in entries:
            return entries[key]
        value = entries[key] = load()
        return value

    # -- devices ----------------------------------------------------------------------------

    def add_device(self, device: Device) -> None:
        self._insert("devices", device)

    def get_device(self, device_id: str) -> Device | None:
        return self._get(Device, "devices", "device_id = ?", [device_id])

    def device_auth(self, device_id: str) -> DeviceAuth | None:
        # Every device call reads this: five columns, no JSON, no full record.
        cols = ("device_id, secret_salt, secret_hash, population, "
                "coalesce(last_seen_at, registered_at) as seen")  # fmt: skip
        rows = self._rows("devices", "device_id = ?", [device_id], select=cols, limit=1)
        if not rows:
            return None
        r = rows[0]
        return DeviceAuth(
            r["device_id"], r["secret_salt"], r["secret_hash"], r["population"], float(r["seen"])
        )

    def count_devices(self) -> int:
        return self._count("select count(*) from devices")

    def update_device(self, device_id: str, **values: Any) -> None:
        self._update("devices", {"device_id": device_id}, values)

    def delete_devices(self, seen_before: float) -> int:
        cur = self._execute(
            "delete from devices where coalesce(last_seen_at, registered_at) < ? and device_id "
            f"not in (select device_id from assignments where state in {_IN_FLIGHT})",
            [seen_before],
        )
        return cur.rowcount

    # -- bundles ----------------------------------------------------------------------------

    def add_bundle(self, bundle_id: str, manifest: dict[str, Any], created_at: float) -> bool:
        cur = self._execute(
            "insert into bundles (bundle_id, manifest, num_parameters, created_at) "
            "values (?, ?, ?, ?) on conflict do nothing",
            [bundle_id, json.dumps(manifest, sort_keys=True), int(manifest["num_parameters"]),
             created_at],
        )  # fmt: skip
        return cur.rowcount == 1

    def get_bundle(self, bundle_id: str) -> dict[str, Any] | None:
        rows = self._rows("bundles", "bundle_id = ?", [bundle_id], limit=1)
        return json.loads(rows[0]["manifest"]) if rows else None

    # -- tasks ------------------------------------------------------------------------------

    def add_task(self, task: Task) -> None:
        self._insert("tasks", task)

    def get_task(self, task_id: str) -> Task | None:
        return self._txn_row(
            "tasks", task_id, lambda: self._get(Task, "tasks", "task_id = ?", [task_id])
        )

    def list_tasks(self, population: str | None = None, state: str | None = None) -> list[Task]:
        # A copy of the cached list (each check-in reads its population's tasks).
        return list(self._cached(("tasks", population, state),
                                 lambda: self._list_tasks(population, state)))  # fmt: skip

    def _list_tasks(self, population: str | None, state: str | None) -> list[Task]:
        where, args = ["1 = 1"], []
        if population is not None:
            where.append("population = ?")
            args.append(population)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        return self._list(Task, "tasks", " and ".join(where), args, "created_at, rowid")

    def update_task(self, task_id: str, **values: Any) -> None:
        self._update("tasks", {"task_id": task_id}, values)

    # -- versions ---------------------------------------------------------------------------

    def add_version(self, version: Version) -> None:
        self._insert("versions", version)

    def get_version(self, task_id: str, version: int) -> Version | None:
        return self._get(Version, "versions", "task_id = ? and version = ?", [task_id, version])

    def update_version(self, task_id: str, version: int, **values: Any) -> None:
        self._update("versions", {"task_id": task_id, "version": version}, values)

    def list_versions(self, task_id: str) -> list[Version]:
        return self._list(Version, "versions", "task_id = ?", [task_id], "version")

    def delete_versions(self, task_id: str, versions: Sequence[int]) -> int:
        deleted = 0
        with self.atomic():
            task = self.get_task(task_id)
            if task is not None and task.model_version in versions:
                raise StoreError(f"version {task.model_version} is task {task_id}'s current one")
            for chunk in _chunks(versions):
                deleted += self._execute(
                    f"delete from versions where task_id = ? and version in ({_marks(len(chunk))})",
                    [task_id, *chunk],
                ).rowcount
        return deleted

    def delete_optimizer_states(self, task_id: str, versions: Sequence[int]) -> int:
        cleared = 0
        for chunk in _chunks(versions):
            cleared += self._execute(
                "update versions set optimizer_sha = null where task_id = ? and version in "
                f"({_marks(len(chunk))}) and optimizer_sha is not null",
                [task_id, *chunk],
            ).rowcount
        return cleared

    # -- rounds -----------------------------------------------------------------------------

    def add_round(self, rnd: Round) -> Round:
        row = _to_row(rnd)
        del row["round_id"]
        stored = self.get_round(int(self._insert_row("rounds", row, returning="round_id")))
        assert stored is not None
        return stored

    def get_round(self, round_id: int) -> Round | None:
        return self._txn_row(
            "rounds", round_id, lambda: self._get(Round, "rounds", "round_id = ?", [round_id])
        )

    def open_round(self, task_id: str) -> Round | None:
        return self._cached(
            ("open_round", task_id),
            lambda: self._get(Round, "rounds", f"task_id = ? and state in {_OPEN}", [task_id]),
        )

    def open_rounds(self) -> list[Round]:
        return self._list(Round, "rounds", f"state in {_OPEN}", [], "round_id")

    def list_rounds(self, task_id: str, min_base_version: int = 0) -> list[Round]:
        where, args = "task_id = ? and base_version >= ?", [task_id, min_base_version]
        return self._list(Round, "rounds", where, args, "round_id")

    def update_round(self, round_id: int, **values: Any) -> None:
        self._update("rounds", {"round_id": round_id}, values)

    def delete_rounds(self, round_ids: Sequence[int]) -> int:
        retired: dict[str, tuple[int, int]] = {}  # task -> update rows deleted, their bytes
        # (task, outcome, bound) -> rounds deleted, their durations' sum
        durations: dict[tuple[str, str, float], tuple[int, float]] = {}
        deleted = 0
        with self.atomic():
            for chunk in _chunks(round_ids):
                marks = _marks(len(chunk))
                still_open = self._execute(
                    f"select round_id from rounds where round_id in ({marks}) "
                    f"and state in {_OPEN}",
                    chunk,
                ).fetchall()
                if still_open:
                    raise StoreError(f"round {still_open[0][0]} is open: not deleted")
                # The rows this statement deleted, not a count read before it: a replica's
                # concurrent pass over the same rounds counts each row once.
                gone = self._execute(
                    f"delete from updates where round_id in ({marks}) "
                    "returning task_id, payload_bytes",
                    chunk,
                ).fetchall()
                for task_id, payload_bytes in gone:
                    n, size = retired.get(task_id, (0, 0))
                    retired[task_id] = (n + 1, size + int(payload_bytes or 0))
                for table in ("candidates", "eval_reports", "assignments", "secagg_events",
                              "partial_sums"):  # fmt: skip
                    self._execute(f'delete from "{table}" where round_id in ({marks})', chunk)
                # The rows this statement deleted, like the updates: a concurrent pass counts
                # each round, and its duration, once.
                for task_id, outcome, le, duration in self._execute(
                    f"delete from rounds where round_id in ({marks}) "
                    f"returning task_id, state, {_DURATION_BOUND}, {_DURATION}",
                    [*chunk, float("inf")],
                ).fetchall():
                    deleted += 1
                    if duration is not None:
                        n, total = durations.get((task_id, outcome, le), (0, 0.0))
                        durations[(task_id, outcome, le)] = (n + 1, total + float(duration))
            # Last, after the rounds' rows: an upload batch locks rounds before the task.
            for task_id, (n, size) in sorted(retired.items()):
                self._execute(
                    "update tasks set updates_retired = coalesce(updates_retired, 0) + ?, "
                    "update_bytes_retired = coalesce(update_bytes_retired, 0) + ? "
                    "where task_id = ?",
                    [n, size, task_id],
                )
            # In key order: two replicas' passes at once take these rows' locks alike.
            for (task_id, outcome, le), (n, total) in sorted(durations.items()):
                self._execute(
                    "insert into retired_round_durations (task_id, outcome, le, rounds, seconds) "
                    "values (?, ?, ?, ?, ?) on conflict (task_id, outcome, le) do update set "
                    "rounds = retired_round_durations.rounds + excluded.rounds, "
                    "seconds = retired_round_durations.seconds + excluded.seconds",
                    [task_id, outcome, le, n, total],
                )
        return deleted

    def round_durations(self) -> dict[tuple[str, str], RoundDurations]:
        # One statement: one snapshot of the rounds and of the retired counts retention
        # moves them into. A retired bound no longer among ROUND_DURATION_BOUNDS (written
        # by another version) counts under the next one up.
        rows = self._execute(
            "select t.mode, r.outcome, r.le, sum(r.n), sum(r.s) from ("
            f"select task_id, state as outcome, {_DURATION_BOUND} as le, 1 as n, "
            f"{_DURATION} as s from rounds where closed_at is not null "
            f"and state not in {_OPEN} "
            "union all select task_id, outcome, le, rounds, seconds "
            "from retired_round_durations"
            ") as r join tasks as t on t.task_id = r.task_id group by t.mode, r.outcome, r.le",
            [float("inf")],
        ).fetchall()
        counts: dict[tuple[str, str], list[int]] = {}
        seconds: dict[tuple[str, str], float] = {}
        for mode, outcome, le, n, total in rows:
            key = (mode, outcome)
            bucket = counts.setdefault(key, [0] * (len(ROUND_DURATION_BOUNDS) + 1))
            bucket[bisect_left(ROUND_DURATION_BOUNDS, float(le))] += int(n)
            seconds[key] = seconds.get(key, 0.0) + float(total)
        return {key: RoundDurations(tuple(c), seconds[key]) for key, c in counts.items()}

    # -- candidates -------------------------------------------------------------------------

    def add_candidate(self, round_id: int, device_id: str, at: float) -> bool:
        cur = self._execute(
            "insert into candidates (round_id, device_id, checked_in_at) values (?, ?, ?) "
            "on conflict do nothing",
            [round_id, device_id, at],
        )
        return cur.rowcount == 1

    def candidates(self, round_id: int) -> list[str]:
        rows = self._rows(
            "candidates",
            "round_id = ?",
            [round_id],
            order_by="checked_in_at, rowid",
            select="device_id",
        )
        return [r["device_id"] for r in rows]

    def count_candidates(self, round_id: int) -> int:
        return self._count("select count(*) from candidates where round_id = ?", [round_id])

    # -- assignments ------------------------------------------------------------------------

    def add_assignments(self, assignments: Sequence[Assignment]) -> None:
        if not assignments:
            return
        rows = [_to_row(a) for a in assignments]
        cols = ", ".join(f'"{k}"' for k in rows[0])
        sql = f"insert into assignments ({cols}) values ({_marks(len(rows[0]))})"
        try:
            with self.atomic():
                self._execute_many(sql, [list(r.values()) for r in rows])
        except self._integrity_errors as e:
            raise StoreError(f"assignments: {e}") from e

    def get_assignment(self, assignment_id: str) -> Assignment | None:
        return self._get(Assignment, "assignments", "assignment_id = ?", [assignment_id])

    def assignment_for(self, round_id: int, device_id: str) -> Assignment | None:
        return self._get(
            Assignment, "assignments", "round_id = ? and device_id = ?", [round_id, device_id]
        )

    def round_assignments(self, round_id: int) -> list[Assignment]:
        return self._list(Assignment, "assignments", "round_id = ?", [round_id], "rowid")

    def count_assignments(self, round_id: int) -> int:
        return self._cached(
            ("assignments", round_id),
            lambda: self._count("select count(*) from assignments where round_id = ?", [round_id]),
        )

    def update_assignment(
        self, assignment_id: str, *, only_from: Sequence[str] | None = None, **values: Any
    ) -> bool:
        return self._update("assignments", {"assignment_id": assignment_id}, values, only_from)

    def expire_assignments(self, round_id: int, at: float) -> int:
        cur = self._execute(
            "update assignments set state = 'expired', closed_at = ? "
            f"where round_id = ? and state in {_IN_FLIGHT}",
            [at, round_id],
        )
        return cur.rowcount

    def open_assignments(self, round_ids: Sequence[int]) -> list[Assignment]:
        if not round_ids:
            return []
        where = f"round_id in ({_marks(len(round_ids))}) and state in {_IN_FLIGHT}"
        ids = [int(r) for r in round_ids]
        return self._list(Assignment, "assignments", where, ids, "created_at, rowid")

    # -- updates and evaluation reports -----------------------------------------------------

    def _add_report(self, table: str, report: Update | EvalReport, at: float) -> bool:
        """Store a report and close its assignment as reported, in one transaction; a second
        report of the assignment is a :class:`StoreError`. Only from in flight: an abort or
        expiry committed since the caller read the assignment (among replicas, by another
        one) stands, and nothing is stored (False)."""
        try:
            with self.atomic():
                self._insert(table, report)
                key = {"assignment_id": report.assignment_id}
                values = {"state": "reported", "closed_at": at}
                if not self._update("assignments", key, values, _IN_FLIGHT_STATES):
                    raise _NotInFlight
        except _NotInFlight:
            return False
        return True

    def add_update(self, update: Update) -> bool:
        return self._add_report("updates", update, update.accepted_at)

    def get_update(self, assignment_id: str) -> Update | None:
        return self._get(Update, "updates", "assignment_id = ?", [assignment_id])

    def round_updates(self, round_id: int) -> Iterator[Update]:
        return iter(self._list(Update, "updates", "round_id = ?", [round_id], "rowid"))

    def count_updates(self, round_id: int | None = None, device_id: str | None = None) -> int:
        where, args = ["1 = 1"], []
        for column, value in (("round_id", round_id), ("device_id", device_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        return self._count(f"select count(*) from updates where {' and '.join(where)}", args)

    def accepted_updates(self) -> tuple[int, int]:
        # One statement: one snapshot of both tables (retention moves rows from one to the
        # other in a transaction), and one pass over the updates.
        row = self._execute(
            "select u.n + t.n, u.size + t.size from "
            "(select count(*) as n, coalesce(sum(payload_bytes), 0) as size from updates) u, "
            "(select coalesce(sum(updates_retired), 0) as n, "
            "coalesce(sum(update_bytes_retired), 0) as size from tasks) t"
        ).fetchone()
        return int(row[0]), int(row[1])

    def update_totals(self, round_id: int, example_cap: float | None = None) -> UpdateTotals:
        # The accuracy is read out of each report once (PostgreSQL parses the JSON per read).
        acc = self._json_number("report", "accuracy")
        weight = "num_examples"
        params: list[Any] = [round_id]
        if example_cap is not None:
            weight = "case when num_examples > ? then ? else num_examples end"
            params = [example_cap, example_cap, round_id]
        row = self._execute(
            "select count(*), coalesce(sum(num_examples), 0), coalesce(sum(payload_bytes), 0), "
            "coalesce(sum(loss * w), 0), "
            "coalesce(sum(case when loss is null then 0 else w end), 0), "
            "coalesce(sum(acc * w), 0), coalesce(sum(case when acc is null then 0 else w end), 0) "
            f"from (select num_examples, {weight} as w, payload_bytes, loss, {acc} as acc "
            "from updates where round_id = ?) as u",
            params,
        ).fetchone()
        return UpdateTotals(int(row[0]), int(row[1]), int(row[2]), float(row[3]), float(row[4]),
                            float(row[5]), float(row[6]))  # fmt: skip

    def round_payloads(self, round_id: int) -> list[str]:
        rows = self._execute(
            "select payload_sha from updates where round_id = ? union all select payload_sha "
            "from secagg_events where round_id = ? and payload_sha is not null",
            [round_id, round_id],
        )
        return [r[0] for r in rows.fetchall()]

    def payload_in_open_round(self, payload_sha: str) -> bool:
        row = self._execute(
            "select 1 from updates u join rounds r on r.round_id = u.round_id "
            f"where u.payload_sha = ? and r.state in {_OPEN} limit 1",
            [payload_sha],
        ).fetchone()
        return row is not None

    def _blob_references(self, closed_round_payloads: bool = True) -> list[tuple[str, str]]:
        """Every place a blob hash is named, as (``from`` clause, hash expression): bundle
        files, versions, and the payloads of updates and SecAgg messages, which belong to a
        round (without ``closed_round_payloads``: only those of open rounds)."""
        files = self._json_members("b.manifest", "files")
        refs = [(f"bundles b, {files} f", self._json_text("f.value", "sha256")),
                ("versions v", "v.params_sha"), ("versions v", "v.optimizer_sha")]  # fmt: skip
        for table in ("updates", "secagg_events"):
            if closed_round_payloads:
                refs.append((f"{table} p", "p.payload_sha"))
            else:
                on = f"r.round_id = p.round_id and r.state in {_OPEN}"
                refs.append((f"{table} p join rounds r on {on}", "p.payload_sha"))
        return refs

    def blob_referenced(self, sha: str) -> bool:
        refs = self._blob_references()
        # One indexed lookup per place, stopping at the first hit.
        sql = " union all ".join(f"select 1 from {src} where {col} = ?" for src, col in refs)
        return self._execute(f"{sql} limit 1", [sha] * len(refs)).fetchone() is not None

    def referenced_blobs(self, *, closed_round_payloads: bool) -> set[str]:
        refs = self._blob_references(closed_round_payloads)
        rows = self._execute(" union ".join(f"select {col} from {src}" for src, col in refs))
        return {r[0] for r in rows.fetchall() if r[0] is not None}

    def assignment_counts(self, round_id: int) -> dict[str, int]:
        rows = self._execute(
            "select state, count(*) from assignments where round_id = ? group by state", [round_id]
        )
        return {state: int(n) for state, n in rows.fetchall()}

    def add_eval_report(self, report: EvalReport) -> bool:
        return self._add_report("eval_reports", report, report.reported_at)

    def get_eval_report(self, assignment_id: str) -> EvalReport | None:
        return self._get(EvalReport, "eval_reports", "assignment_id = ?", [assignment_id])

    def round_eval_reports(self, round_id: int) -> list[EvalReport]:
        return self._list(EvalReport, "eval_reports", "round_id = ?", [round_id], "rowid")

    # -- secure aggregation -----------------------------------------------------------------

    def add_secagg_event(self, event: SecAggEvent) -> None:
        self._insert("secagg_events", event)

    def secagg_events(self, round_id: int, since: int = 0) -> list[SecAggEvent]:
        where, args = "round_id = ? and seq >= ?", [round_id, since]
        return self._list(SecAggEvent, "secagg_events", where, args, "seq")

    # -- replicas ---------------------------------------------------------------------------

    def _locked(self, cls: type[R], table: str, where: str, value: Any, skip: bool) -> R | None:
        sql = f'select * from "{table}" where {where}{self._for_update(skip)}'
        rows = self._query(sql, [value])
        return _from_row(cls, rows[0]) if rows else None

    def lock_round(self, round_id: int, *, skip_locked: bool = False) -> Round | None:
        # Kept like get_round only where a transaction locks the whole database (SQLite):
        # PostgreSQL keeps no _txn_rows, and its row lock is taken here.
        return self._txn_row(
            "rounds",
            round_id,
            lambda: self._locked(Round, "rounds", "round_id = ?", round_id, skip_locked),
        )

    def lock_task(self, task_id: str) -> Task | None:
        return self._locked(Task, "tasks", "task_id = ?", task_id, False)

    def lock_round_of(self, assignment_id: str) -> Round | None:
        where = "round_id = (select round_id from assignments where assignment_id = ?)"
        return self._locked(Round, "rounds", where, assignment_id, False)

    def claim_round(self, round_id: int, *, closing: bool = False) -> bool:
        return True

    def lock_blob(self, sha: str, *, shared: bool = False, wait: bool = True) -> bool:
        return True

    def put_partial(self, partial: PartialSum) -> None:
        row = _to_row(partial)
        cols = ", ".join(f'"{k}"' for k in row)
        sets = ", ".join(f'"{k}" = excluded."{k}"' for k in row if k not in _PARTIAL_KEY)
        self._execute(
            f"insert into partial_sums ({cols}) values ({_marks(len(row))}) "
            f"on conflict (round_id, replica_id) do update set {sets}",
            list(row.values()),
        )

    def get_partial(self, round_id: int, replica_id: str) -> PartialSum | None:
        where = "round_id = ? and replica_id = ?"
        return self._get(PartialSum, "partial_sums", where, [round_id, replica_id])

    def round_partials(self, round_id: int) -> list[PartialSum]:
        return self._list(PartialSum, "partial_sums", "round_id = ?", [round_id], "replica_id")

    def delete_partials(self, round_id: int) -> None:
        self._execute("delete from partial_sums where round_id = ?", [round_id])

    def uncovered_updates(self, round_id: int, replica_id: str | None = None) -> list[Update]:
        where = (
            "round_id = ? and not exists (select 1 from partial_sums p where "
            "p.round_id = updates.round_id and p.replica_id = updates.replica_id "
            'and updates.replica_seq <= p."count")'
        )
        args: list[Any] = [round_id]
        if replica_id is not None:
            where += " and replica_id = ?"
            args.append(replica_id)
        return self._list(Update, "updates", where, args, "rowid")

    # -- inspection and copying -------------------------------------------------------------

    def copy_from(self, source: SQLStore, batch: int = 1000) -> dict[str, int]:
        """Copy every record of ``source`` (another backend, or the same) into this store,
        which must be empty, in one transaction; returns the rows copied per table.

        Rows go in the source's insertion order, so "oldest first" answers stay the same.
        Both stores were migrated by this code on opening, so their tables are the same.
        """
        # Each database keeps its own identity; the copy names its source as predecessor.
        tables = [t for t in source._table_names() if t not in _OWN_TABLES]
        filled = [t for t in tables if self._count(f'select count(*) from "{t}"')]
        if filled:
            raise StoreError(f"the destination already holds records ({', '.join(filled)})")
        # Tasks refer to bundles (a foreign key): bundles go in first.
        tables.sort(key=lambda t: (t != "bundles", t))
        copied: dict[str, int] = {}
        # One snapshot of the source: a coordinator still serving it commits between the
        # tables' reads (a round read open, then the version its commit made).
        with self.atomic(), source._read_snapshot():
            for table in tables:
                cols = source._columns(table)
                names = ", ".join(f'"{c}"' for c in cols)
                insert = f'insert into "{table}" ({names}) values ({_marks(len(cols))})'
                cur = source._execute(f'select {names} from "{table}" order by rowid')
                copied[table] = 0
                while rows := cur.fetchmany(batch):
                    self._execute_many(insert, rows)
                    copied[table] += len(rows)
            self._records_copied()
            was = source.identity()
            self._execute("update store_identity set predecessor = ?, predecessor_generation = ?",
                          [was.store_id, was.generation])  # fmt: skip
        return copied

    def identity(self) -> StoreIdentity:
        row = self._execute(
            "select store_id, generation, predecessor, predecessor_generation from store_identity"
        ).fetchone()
        return StoreIdentity(row[0], int(row[1]), row[2], row[3])

    def start(self) -> StoreIdentity:
        with self.atomic():
            self._execute("update store_identity set generation = generation + 1")
            return self.identity()

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every record, table by table (sorted): what a copy must reproduce (the identity,
        each database's own, is left out)."""
        out: dict[str, list[tuple[Any, ...]]] = {}
        for name in sorted(t for t in self._table_names() if t != "store_identity"):
            cols = ", ".join(f'"{c}"' for c in self._columns(name))
            rows = self._execute(f'select {cols} from "{name}"').fetchall()
            out[name] = sorted((tuple(r) for r in rows), key=repr)
        return out
