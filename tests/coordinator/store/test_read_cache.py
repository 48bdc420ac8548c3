"""The SQLite store's read cache (what every check-in reads: a population's tasks, a task's
open round, a round's assignment count) never answers what the database no longer says.

Each check compares the cached store's answers with plain ``sqlite3`` queries of the same
file (an independent reference), after writes by the cached connection itself, by another
connection, by another process, inside transactions and after their rollback; and, over
HTTP, steered check-ins follow a pause, a resume, a closed round and a deleted device made
through another connection at once.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.embedded import EmbeddedCoordinator
from coordinator.store import Assignment, Round, SQLiteStore, Task
from tests.fixtures.coordinator import DeviceHTTP

POPULATIONS = ("default", "other")
TASK_STATES = ("running", "paused", "completed", "failed")
OPEN = ("selecting", "reporting")
REPO = Path(__file__).resolve().parents[3]


def _task(task_id: str, population: str, created_at: float) -> Task:
    return Task(task_id, "t", "b-1", "sync", population, {"goal": 2}, "running", 0, 0, 0,
                created_at)  # fmt: skip


def _round(task_id: str) -> Round:
    return Round(0, task_id, 1, "train", "selecting", 0, 2, 2, 1, 10.0, 20.0)


def _assignment(i: int, round_id: int, task_id: str) -> Assignment:
    return Assignment(f"a-{i}", round_id, task_id, f"d-{i}", "train", "selected", 1.0)


class Reference:
    """What the database file says now, read with plain sqlite3 (no store code)."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)

    def tasks(self, population: str) -> list[tuple[str, str]]:
        return self.conn.execute(
            "select task_id, state from tasks where population = ? order by created_at, rowid",
            [population],
        ).fetchall()

    def open_round(self, task_id: str) -> tuple[int, str] | None:
        row = self.conn.execute(
            "select round_id, state from rounds where task_id = ? "
            "and state in ('selecting', 'reporting')",
            [task_id],
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def assignments(self, round_id: int) -> int:
        q = "select count(*) from assignments where round_id = ?"
        return int(self.conn.execute(q, [round_id]).fetchone()[0])

    def round_ids(self) -> list[int]:
        return [r[0] for r in self.conn.execute("select round_id from rounds").fetchall()]


def cached_view(store: SQLiteStore, ref: Reference) -> dict[str, Any]:
    tasks = {p: [(t.task_id, t.state) for t in store.list_tasks(population=p)] for p in POPULATIONS}
    rounds = {}
    for task_id, _ in tasks["default"] + tasks["other"]:
        rnd = store.open_round(task_id)
        rounds[task_id] = None if rnd is None else (rnd.round_id, rnd.state)
    counts = {r: store.count_assignments(r) for r in ref.round_ids()}
    return {"tasks": tasks, "rounds": rounds, "counts": counts}


def reference_view(ref: Reference) -> dict[str, Any]:
    tasks = {p: ref.tasks(p) for p in POPULATIONS}
    rounds = {t: ref.open_round(t) for t, _ in tasks["default"] + tasks["other"]}
    return {"tasks": tasks, "rounds": rounds, "counts": {r: ref.assignments(r) for r in
                                                          ref.round_ids()}}  # fmt: skip


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[Path, SQLiteStore, SQLiteStore, Reference]]:
    path = tmp_path / "store.db"
    cached, other = SQLiteStore(path), SQLiteStore(path)
    cached.add_bundle("b-1", {"num_parameters": 8, "files": {}}, 0.0)
    yield path, cached, other, Reference(path)
    cached.close()
    other.close()


class Rollback(Exception):
    pass


def test_cached_reads_follow_every_write_of_either_connection(
    db: tuple[Path, SQLiteStore, SQLiteStore, Reference],
) -> None:
    _, cached, other, ref = db
    rng = random.Random(7)
    n = 0
    for step in range(400):
        writer = rng.choice((cached, other))
        fresh = reference_view(ref)
        tasks = [t for p in POPULATIONS for t, _ in fresh["tasks"][p]]
        op = rng.choice(("task", "state", "open", "close", "assign", "rollback", "inside"))
        if op == "task" or not tasks:
            writer.add_task(_task(f"t-{step}", rng.choice(POPULATIONS), float(step)))
        elif op == "state":
            writer.update_task(rng.choice(tasks), state=rng.choice(TASK_STATES))
        elif op == "open":
            free = [t for t in tasks if fresh["rounds"][t] is None]
            if free:
                writer.add_round(_round(rng.choice(free)))
        elif op in ("close", "assign"):
            open_ = [(t, r) for t, r in fresh["rounds"].items() if r is not None]
            if open_:
                task_id, (round_id, state) = rng.choice(open_)
                if op == "assign":
                    n += 1
                    writer.add_assignments([_assignment(n, round_id, task_id)])
                else:
                    after = "reporting" if state == "selecting" else "committed"
                    writer.update_round(round_id, state=after)
        elif op == "rollback":
            # A write that the cached connection rolls back: its reads go back to before.
            with pytest.raises(Rollback), cached.atomic():
                cached.update_task(rng.choice(tasks), state="failed")
                cached.add_task(_task(f"t-{step}", "default", float(step)))
                raise Rollback
        else:
            # Inside its own transaction the cached connection reads what it just wrote.
            task_id = rng.choice(tasks)
            with pytest.raises(Rollback), cached.atomic():
                cached.update_task(task_id, state="paused")
                population = next(p for p in POPULATIONS if task_id in dict(fresh["tasks"][p]))
                assert (
                    dict((t.task_id, t.state) for t in cached.list_tasks(population))[task_id]
                    == "paused"
                )
                raise Rollback
        assert cached_view(cached, ref) == reference_view(ref), (step, op)
    assert cached._read_cache is not None  # the cache was in use, not bypassed


def test_a_change_by_another_process_is_seen_at_once(
    db: tuple[Path, SQLiteStore, SQLiteStore, Reference],
) -> None:
    path, cached, _, ref = db
    cached.add_task(_task("t-1", "default", 1.0))
    rnd = cached.add_round(_round("t-1"))
    before = cached_view(cached, ref)
    assert before["tasks"]["default"] == [("t-1", "running")]
    assert before["rounds"]["t-1"] == (rnd.round_id, "selecting")
    script = textwrap.dedent(f"""
        from coordinator.store import Assignment, SQLiteStore
        s = SQLiteStore({str(path)!r})
        s.update_task("t-1", state="paused")
        s.add_assignments([Assignment("a-x", {rnd.round_id}, "t-1", "d-x", "train",
                                      "selected", 1.0)])
        s.update_round({rnd.round_id}, state="abandoned")
        s.close()
    """)
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=60)
    after = cached_view(cached, ref)
    assert after == reference_view(ref)
    assert after["tasks"]["default"] == [("t-1", "paused")]
    assert after["rounds"]["t-1"] is None
    assert after["counts"] == {rnd.round_id: 1}


def test_steered_checkins_follow_changes_made_through_another_connection(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    path = tmp_path / "fedge.db"
    plan = {"goal": 1, "over_selection": 1.0, "selection_window_s": 0.0,
            "round_deadline_s": 3600.0, "rounds": 5}  # fmt: skip
    with EmbeddedCoordinator(path, seed=1) as coord:
        admin = coord.admin()
        task_id = admin.create_task(admin.upload_bundle(tiny_bundle)["bundle_id"], plan)["task_id"]
        chosen = DeviceHTTP(coord)
        chosen.check_in()
        assert chosen.check_in()["action"] == "train"
        steered = DeviceHTTP(coord)

        def reason() -> str:
            answer = steered.check_in()
            assert answer["action"] == "wait", answer
            return str(answer["reason"])

        assert [reason() for _ in range(3)] == ["window_full"] * 3
        elsewhere = SQLiteStore(path)  # what another process on this file would write
        try:
            elsewhere.update_task(task_id, state="paused")
            assert reason() == "paused"
            elsewhere.update_task(task_id, state="running")
            assert reason() == "window_full"
            admin.pause(task_id)  # and through this coordinator's own connection
            assert reason() == "paused"
            admin.resume(task_id)
            assert reason() == "window_full"
            rnd = elsewhere.open_round(task_id)
            assert rnd is not None
            elsewhere.update_round(rnd.round_id, state="abandoned", closed_at=rnd.opened_at)
            # That round is over: this check-in opens the next one, and (goal 1, no window)
            # is its cohort at once.
            answer = steered.check_in()
            assert (answer["action"], answer["assignment"]["round"]) == ("train", rnd.number + 1)
            late = DeviceHTTP(coord)
            assert late.check_in()["reason"] == "window_full"
            elsewhere.db.conn.execute("delete from devices where device_id = ?", [late.device_id])
            status, _, _ = late.raw("POST", "/v1/checkin", b"{}")
            assert status == 401  # revoked at once
        finally:
            elsewhere.close()


@pytest.mark.parametrize("statement", [
    "update tasks set state = ? where task_id = ?",
    "UPDATE TASKS SET state = ? WHERE task_id = ?",
    "  Update \"Tasks\" set state = ? where task_id = ?",
])  # fmt: skip
def test_a_record_kept_in_a_transaction_is_forgotten_by_any_write_of_its_table(
    db: tuple[Path, SQLiteStore, SQLiteStore, Reference], statement: str
) -> None:
    """Inside a write transaction a task read once is kept (a batch reads it per upload);
    a statement that writes its table, however it spells the name, must drop it."""
    _, cached, _, ref = db
    cached.add_task(_task("t-1", "default", 1.0))
    with cached.atomic():
        before = cached.get_task("t-1")
        assert before is not None and before.state == "running"
        cached._execute(statement, ["paused", "t-1"])
        inside = cached.get_task("t-1")
        assert inside is not None and inside.state == "paused"
    assert ref.tasks("default") == [("t-1", "paused")]
