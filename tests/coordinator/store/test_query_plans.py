"""Every query on a hot path uses an index: no full scan of a table that grows with history.

A real coordinator (HTTP, SQLite file, fake clock) runs sync rounds (selection, uploads, an
abort, a commit, an evaluation round, deadlines), an async task (check-ins, uploads, commits,
expiries) and parameter downloads while every statement its store runs is recorded; then
SQLite's ``EXPLAIN QUERY PLAN`` of each must not scan the tables that grow with rounds
(rounds, candidates, assignments, updates, evaluation reports, versions) or devices. SQLite
plans without statistics (nothing runs ANALYZE), so a small database gives the plans a large
one gets. Start-up and retention's blob collection read whole tables on purpose (once, and
per retention pass over what retention keeps): they are not on the hot path and not recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.clock import FakeClock
from coordinator.embedded import EmbeddedCoordinator
from coordinator.store import Assignment, Round, SQLiteStore, Task, Version
from tests.fixtures.coordinator import DeviceHTTP

N = 64
# Tables with a row per task or per bundle: small whatever the history, scanned on purpose
# (list_tasks on every check-in).
SMALL_TABLES = {"tasks", "bundles"}


def full_scans(store: SQLiteStore, sql: str, args: Sequence[Any]) -> list[str]:
    plan = store.db.execute("explain query plan " + sql, list(args)).fetchall()
    return [
        detail
        for *_, detail in plan
        if detail.startswith("SCAN ") and detail.split()[1] not in SMALL_TABLES
    ]


class Recorder:
    """Records (sql, args) of every statement a store runs, from the worker thread."""

    def __init__(self, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.statements: dict[str, Sequence[Any]] = {}
        self.recording = False
        for name in ("_execute", "_query"):
            real = getattr(store, name)

            def wrapped(sql: str, args: Sequence[Any] = (), _real: Any = real) -> Any:
                if self.recording:
                    self.statements.setdefault(sql, list(args))
                return _real(sql, args)

            monkeypatch.setattr(store, name, wrapped)


def _delta(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.01, N).astype(np.float32)


def _drive_sync(coord: EmbeddedCoordinator, clock: FakeClock, bundle_id: str) -> None:
    admin = coord.admin()
    plan = {"rounds": 5, "goal": 3, "selection_window_s": 5.0, "round_deadline_s": 60.0}
    task_id = admin.create_task(bundle_id, plan)["task_id"]
    devices = [DeviceHTTP(coord) for _ in range(6)]
    for rnd in range(2):
        for d in devices:
            d.check_in()
        clock.advance(6.0)
        work = [(d, a["assignment"]) for d in devices if (a := d.check_in())["action"] == "train"]
        assert len(work) == 4  # ceil(3 x 1.3)
        d, a = work[0]
        d.params(task_id, a["model_version"])
        assert d.abort(a["assignment_id"])[0] == 200
        for i, (d, a) in enumerate(work[1:]):
            assert d.upload(a["assignment_id"], _delta(i))[0] == 200
            d.upload(a["assignment_id"], _delta(i), key="replayed")  # a conflicting replay
        assert admin.task(task_id)["model_version"] == rnd + 1
        clock.advance(1.0)
    # an evaluation round, and a train round that runs into its deadline
    admin.evaluate(task_id)
    for d in devices:
        d.check_in()
    clock.advance(6.0)
    work = [(d, a["assignment"]) for d in devices if (a := d.check_in())["action"] == "evaluate"]
    for d, a in work[:3]:  # the goal: the third completes the round
        assert d.metrics(a["assignment_id"], 10, 0.5, 0.9)[0] == 200
    clock.advance(1.0)
    for d in devices:
        d.check_in()
    clock.advance(6.0)
    for d in devices:
        d.check_in()
    clock.advance(61.0)
    coord.call(coord.service.tick)
    admin.rounds(task_id)


def _drive_async(coord: EmbeddedCoordinator, clock: FakeClock, bundle_id: str) -> None:
    admin = coord.admin()
    plan = {"rounds": 5, "buffer_k": 2, "max_concurrency": 4, "round_deadline_s": 30.0}
    task_id = admin.create_task(bundle_id, plan, mode="async")["task_id"]
    devices = [DeviceHTTP(coord) for _ in range(5)]
    for v in range(2):
        work = [(d, a["assignment"]) for d in devices if (a := d.check_in())["action"] == "train"]
        for i, (d, a) in enumerate(work[:2]):
            d.params(task_id, a["model_version"])
            status, body = d.upload(a["assignment_id"], _delta(10 + i))
            assert status == 200, body
        assert admin.task(task_id)["model_version"] == v + 1
        clock.advance(1.0)
    clock.advance(31.0)  # the rest expire
    coord.call(coord.service.tick)
    for d in devices:
        d.check_in()


def test_hot_queries_use_indexes(
    tmp_path: Path, tiny_bundle: Path, fake_clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # retention off: its pass reads whole (bounded) tables on purpose, see the docstring
    with EmbeddedCoordinator(
        tmp_path / "fedge.db", clock=fake_clock, seed=3, retain_versions=0
    ) as coord:
        store = coord.service.store
        assert isinstance(store, SQLiteStore)
        rec = Recorder(store, monkeypatch)
        bundle_id = coord.admin().upload_bundle(tiny_bundle)["bundle_id"]
        rec.recording = True
        _drive_sync(coord, fake_clock, bundle_id)
        _drive_async(coord, fake_clock, bundle_id)
        rec.recording = False
        assert len(rec.statements) > 30  # the drive reached the store's hot paths
        scans = {
            sql: found
            for sql, args in rec.statements.items()
            if (found := coord.call(full_scans, store, sql, args))
        }
    assert scans == {}


def test_retention_queries_use_indexes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention's row work (not its blob collection) is indexed too: one pass per task."""
    store = SQLiteStore(tmp_path / "fedge.db")
    store.add_bundle("b-1", {"num_parameters": 1, "files": {}}, 0.0)
    store.add_task(Task("t-1", "demo", "b-1", "sync", "default", {}, "running", 3, 3, 0, 0.0))
    for v in range(4):
        store.add_version(Version("t-1", v, f"{v}" * 64, None, None, 0.0))
    rnd = store.add_round(Round(0, "t-1", 1, "train", "committed", 0, 1, 1, 1, 0.0, 0.0))
    store.add_assignments([Assignment("a-1", rnd.round_id, "t-1", "d-1", "train", "expired", 0)])
    rec = Recorder(store, monkeypatch)
    rec.recording = True
    store.list_rounds("t-1", min_base_version=2)
    store.list_versions("t-1")
    store.open_assignments([rnd.round_id])
    store.round_payloads(rnd.round_id)
    store.update_version("t-1", 1, optimizer_sha=None)
    with store.atomic():
        store.delete_optimizer_states("t-1", [1, 2])
        store.delete_rounds([rnd.round_id])
        store.delete_versions("t-1", [0])
    scans = {
        sql: found
        for sql, args in rec.statements.items()
        if (found := full_scans(store, sql, args))
    }
    store.close()
    assert scans == {}


def test_the_check_sees_scans_without_the_indexes(tmp_path: Path) -> None:
    """The check can fail: with migration 2's indexes dropped, these lookups scan (the
    third, on (task_id, base_version), narrows an async task's window further)."""
    store = SQLiteStore(tmp_path / "fedge.db")
    for index in ("idx_updates_payload_sha", "idx_rounds_state", "idx_rounds_task_id_base_version"):
        store.db.execute(f"drop index {index}")
    hot = {
        "payload_in_open_round": (
            "select 1 from updates u join rounds r on r.round_id = u.round_id "
            "where u.payload_sha = ? and r.state in ('selecting', 'reporting') limit 1",
            ["a" * 64],
        ),
        "open_rounds": ("select * from rounds where state in ('selecting', 'reporting')", []),
    }
    found = {name: full_scans(store, sql, args) for name, (sql, args) in hot.items()}
    store.close()
    assert found["payload_in_open_round"] and found["open_rounds"], found
