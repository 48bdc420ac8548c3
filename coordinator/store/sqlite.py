"""The SQLite backend (through sqlite-utils): one database file, or ``:memory:``.

The connection runs in autocommit mode with WAL and ``synchronous=FULL``: a write that
returned is on disk, which is what lets the service acknowledge an upload right after it.
Rows go in through sqlite-utils' table API and come out through ``Database.query`` (a table's
``rows_where`` would first query the schema twice, on every check-in's hot path); the few
aggregate queries are plain SQL.
The object is used from one thread at a time (the service serialises its calls).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TypeVar

from sqlite_utils import Database

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
from coordinator.store.migrations import apply_migrations

__all__ = ["SQLiteStore"]

R = TypeVar("R")
# Record fields stored as JSON text.
_JSON_FIELDS = {"runtimes", "plan", "metrics", "report", "response"}


def _to_row(record: Any) -> dict[str, Any]:
    row = asdict(record)
    for k in _JSON_FIELDS & row.keys():
        row[k] = json.dumps(row[k], sort_keys=True)
    return row


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


class SQLiteStore(Store):
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        memory = self.path == ":memory:"
        # isolation_level=None: no implicit transactions; db.atomic() opens explicit ones.
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db = Database(conn)
        if not memory:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        self.schema_version = apply_migrations(self.db)

    def atomic(self) -> AbstractContextManager[None]:
        @contextmanager
        def block() -> Iterator[None]:
            with self.db.atomic():
                yield

        return block()

    def close(self) -> None:
        self.db.conn.close()

    def _insert(self, table: str, record: Any) -> None:
        try:
            with self.db.atomic():
                self.db.table(table).insert(_to_row(record))
        except sqlite3.IntegrityError as e:
            raise StoreError(f"{table}: {e}") from e

    def _rows(
        self,
        table: str,
        where: str,
        args: Sequence[Any] = (),
        *,
        order_by: str | None = None,
        select: str = "*",
        limit: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        sql = f"select {select} from [{table}] where {where}"
        if order_by is not None:
            sql += f" order by {order_by}"
        if limit is not None:
            sql += f" limit {int(limit)}"
        return self.db.query(sql, list(args))

    def _get(self, cls: type[R], table: str, where: str, args: Sequence[Any]) -> R | None:
        rows = list(self._rows(table, where, args, limit=1))
        return _from_row(cls, rows[0]) if rows else None

    def _update(self, table: str, pk: Any, values: dict[str, Any]) -> None:
        row = {
            k: json.dumps(v, sort_keys=True) if k in _JSON_FIELDS else v for k, v in values.items()
        }
        with self.db.atomic():
            self.db.table(table).update(pk, row)

    def _count(self, sql: str, args: Sequence[Any] = ()) -> int:
        return int(self.db.execute(sql, list(args)).fetchone()[0])

    # devices
    def add_device(self, device: Device) -> None:
        self._insert("devices", device)

    def get_device(self, device_id: str) -> Device | None:
        return self._get(Device, "devices", "device_id = ?", [device_id])

    def count_devices(self) -> int:
        return self._count("select count(*) from devices")

    # bundles
    def add_bundle(self, bundle_id: str, manifest: dict[str, Any], created_at: float) -> bool:
        if self.get_bundle(bundle_id) is not None:
            return False
        row = {
            "bundle_id": bundle_id,
            "manifest": json.dumps(manifest, sort_keys=True),
            "num_parameters": int(manifest["num_parameters"]),
            "created_at": created_at,
        }
        with self.db.atomic():
            self.db.table("bundles").insert(row)
        return True

    def get_bundle(self, bundle_id: str) -> dict[str, Any] | None:
        rows = list(self._rows("bundles", "bundle_id = ?", [bundle_id], limit=1))
        return json.loads(rows[0]["manifest"]) if rows else None

    # tasks
    def add_task(self, task: Task) -> None:
        self._insert("tasks", task)

    def get_task(self, task_id: str) -> Task | None:
        return self._get(Task, "tasks", "task_id = ?", [task_id])

    def list_tasks(self, population: str | None = None, state: str | None = None) -> list[Task]:
        where, args = ["1 = 1"], []
        if population is not None:
            where.append("population = ?")
            args.append(population)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        rows = self._rows("tasks", " and ".join(where), args, order_by="created_at, rowid")
        return [_from_row(Task, r) for r in rows]

    def update_task(self, task_id: str, **values: Any) -> None:
        self._update("tasks", task_id, values)

    # versions
    def add_version(self, version: Version) -> None:
        self._insert("versions", version)

    def get_version(self, task_id: str, version: int) -> Version | None:
        return self._get(Version, "versions", "task_id = ? and version = ?", [task_id, version])

    # rounds
    def add_round(self, rnd: Round) -> Round:
        row = _to_row(rnd)
        del row["round_id"]
        with self.db.atomic():
            round_id = self.db.table("rounds").insert(row).last_pk
        stored = self.get_round(int(round_id))  # type: ignore[arg-type]
        assert stored is not None
        return stored

    def get_round(self, round_id: int) -> Round | None:
        return self._get(Round, "rounds", "round_id = ?", [round_id])

    def open_round(self, task_id: str) -> Round | None:
        return self._get(
            Round, "rounds", "task_id = ? and state in ('selecting', 'reporting')", [task_id]
        )

    def open_rounds(self) -> list[Round]:
        rows = self._rows("rounds", "state in ('selecting', 'reporting')", order_by="round_id")
        return [_from_row(Round, r) for r in rows]

    def list_rounds(self, task_id: str, min_base_version: int = 0) -> list[Round]:
        where, args = "task_id = ? and base_version >= ?", [task_id, min_base_version]
        rows = self._rows("rounds", where, args, order_by="round_id")
        return [_from_row(Round, r) for r in rows]

    def update_round(self, round_id: int, **values: Any) -> None:
        self._update("rounds", round_id, values)

    # candidates
    def add_candidate(self, round_id: int, device_id: str, at: float) -> bool:
        with self.db.atomic():
            cur = self.db.execute(
                "insert or ignore into candidates (round_id, device_id, checked_in_at) "
                "values (?, ?, ?)",
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

    # assignments
    def add_assignments(self, assignments: Sequence[Assignment]) -> None:
        try:
            with self.db.atomic():
                self.db.table("assignments").insert_all([_to_row(a) for a in assignments])
        except sqlite3.IntegrityError as e:
            raise StoreError(f"assignments: {e}") from e

    def get_assignment(self, assignment_id: str) -> Assignment | None:
        return self._get(Assignment, "assignments", "assignment_id = ?", [assignment_id])

    def assignment_for(self, round_id: int, device_id: str) -> Assignment | None:
        return self._get(
            Assignment, "assignments", "round_id = ? and device_id = ?", [round_id, device_id]
        )

    def round_assignments(self, round_id: int) -> list[Assignment]:
        rows = self._rows("assignments", "round_id = ?", [round_id], order_by="rowid")
        return [_from_row(Assignment, r) for r in rows]

    def count_assignments(self, round_id: int) -> int:
        return self._count("select count(*) from assignments where round_id = ?", [round_id])

    def update_assignment(self, assignment_id: str, **values: Any) -> None:
        self._update("assignments", assignment_id, values)

    def expire_assignments(self, round_id: int, at: float) -> int:
        with self.db.atomic():
            cur = self.db.execute(
                "update assignments set state = 'expired', closed_at = ? "
                "where round_id = ? and state in ('selected', 'delivered')",
                [at, round_id],
            )
        return cur.rowcount

    def open_assignments(self, round_ids: Sequence[int]) -> list[Assignment]:
        if not round_ids:
            return []
        marks = ", ".join("?" * len(round_ids))
        rows = self._rows(
            "assignments",
            f"round_id in ({marks}) and state in ('selected', 'delivered')",
            [int(r) for r in round_ids],
            order_by="created_at, rowid",
        )
        return [_from_row(Assignment, r) for r in rows]

    # updates and evaluation reports
    def _add_report(self, table: str, report: Update | EvalReport, at: float) -> None:
        """Store a report and close its assignment as reported, in one transaction."""
        with self.atomic():
            self._insert(table, report)
            self._update(
                "assignments", report.assignment_id, {"state": "reported", "closed_at": at}
            )

    def add_update(self, update: Update) -> None:
        self._add_report("updates", update, update.accepted_at)

    def get_update(self, assignment_id: str) -> Update | None:
        return self._get(Update, "updates", "assignment_id = ?", [assignment_id])

    def round_updates(self, round_id: int) -> Iterator[Update]:
        rows = self._rows("updates", "round_id = ?", [round_id], order_by="rowid")
        return (_from_row(Update, r) for r in list(rows))

    def count_updates(self, round_id: int | None = None) -> int:
        if round_id is None:
            return self._count("select count(*) from updates")
        return self._count("select count(*) from updates where round_id = ?", [round_id])

    def update_totals(self, round_id: int) -> UpdateTotals:
        acc = "json_extract(report, '$.accuracy')"
        row = self.db.execute(
            "select count(*), coalesce(sum(num_examples), 0), coalesce(sum(payload_bytes), 0), "
            "coalesce(sum(loss * num_examples), 0), "
            "coalesce(sum(case when loss is null then 0 else num_examples end), 0), "
            f"coalesce(sum({acc} * num_examples), 0), "
            f"coalesce(sum(case when {acc} is null then 0 else num_examples end), 0) "
            "from updates where round_id = ?",
            [round_id],
        ).fetchone()
        return UpdateTotals(int(row[0]), int(row[1]), int(row[2]), float(row[3]), int(row[4]),
                            float(row[5]), int(row[6]))  # fmt: skip

    def round_payloads(self, round_id: int) -> list[str]:
        rows = self.db.execute("select payload_sha from updates where round_id = ?", [round_id])
        return [r[0] for r in rows.fetchall()]

    def payload_in_open_round(self, payload_sha: str) -> bool:
        row = self.db.execute(
            "select 1 from updates u join rounds r on r.round_id = u.round_id "
            "where u.payload_sha = ? and r.state in ('selecting', 'reporting') limit 1",
            [payload_sha],
        ).fetchone()
        return row is not None

    def referenced_blobs(self, *, closed_round_payloads: bool) -> set[str]:
        payloads = (
            "select payload_sha from updates"
            if closed_round_payloads
            else "select u.payload_sha from updates u join rounds r on r.round_id = u.round_id "
            "where r.state in ('selecting', 'reporting')"
        )
        rows = self.db.execute(
            "select json_extract(f.value, '$.sha256') "
            "from bundles b, json_each(b.manifest, '$.files') f "
            "union select params_sha from versions "
            "union select optimizer_sha from versions "
            f"union {payloads}"
        ).fetchall()
        return {r[0] for r in rows if r[0] is not None}

    def assignment_counts(self, round_id: int) -> dict[str, int]:
        rows = self.db.execute(
            "select state, count(*) from assignments where round_id = ? group by state", [round_id]
        )
        return {state: int(n) for state, n in rows.fetchall()}

    def add_eval_report(self, report: EvalReport) -> None:
        self._add_report("eval_reports", report, report.reported_at)

    def get_eval_report(self, assignment_id: str) -> EvalReport | None:
        return self._get(EvalReport, "eval_reports", "assignment_id = ?", [assignment_id])

    def round_eval_reports(self, round_id: int) -> list[EvalReport]:
        rows = self._rows("eval_reports", "round_id = ?", [round_id], order_by="rowid")
        return [_from_row(EvalReport, r) for r in rows]

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        out: dict[str, list[tuple[Any, ...]]] = {}
        for name in sorted(self.db.table_names()):
            rows = self.db.execute(f"select * from [{name}]").fetchall()
            out[name] = sorted(rows, key=repr)
        return out
