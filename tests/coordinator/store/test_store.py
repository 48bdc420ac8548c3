"""One abstract suite for every Store backend: SQLite (a file, and in memory) and PostgreSQL
(a real server, one fresh schema a test; see tests/fixtures/postgres.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.store import (
    ROUND_DURATION_BOUNDS,
    Assignment,
    DatabaseInUse,
    Device,
    DeviceAuth,
    EvalReport,
    PartialSum,
    Round,
    SecAggEvent,
    SQLiteStore,
    Store,
    StoreError,
    Task,
    TransactionLost,
    Update,
    UpdateTotals,
    Version,
    open_store,
)
from coordinator.store.migrations import MIGRATIONS, SchemaTooNew, apply_migrations
from coordinator.store.sql import SQLStore

Opener = Callable[[], SQLStore]


def _task(task_id: str = "t-1", created_at: float = 1.0, population: str = "default") -> Task:
    return Task(
        task_id, "demo", "b-1", "sync", population, {"goal": 3}, "running", 0, 0, 0, created_at
    )


def _round(task_id: str = "t-1", state: str = "selecting") -> Round:
    return Round(0, task_id, 1, "train", state, 0, 3, 4, 3, 10.0, 20.0)


def _device(device_id: str = "d-1") -> Device:
    return Device(device_id, "00" * 16, "ab" * 32, "linux", "x86_64", ("ort-step",), "default", 5.0)


def _round_with_updates(store: Store, task_id: str, state: str, n: int, size: int = 1) -> int:
    """A round of ``task_id`` in ``state`` with ``n`` accepted updates of ``size`` payload
    bytes each; returns its id."""
    rnd = store.add_round(_round(task_id, "reporting"))
    for i in range(n):
        aid = f"{task_id}-{rnd.round_id}-{i}"
        store.add_assignments([Assignment(aid, rnd.round_id, task_id, aid, "train", "delivered",
                                          1.0)])  # fmt: skip
        store.add_update(Update(aid, rnd.round_id, task_id, aid, "k", "5" * 64, size, 1, None,
                                {}, 2.0, {}))  # fmt: skip
    if state != "reporting":
        store.update_round(rnd.round_id, state=state, closed_at=3.0)
    return rnd.round_id


def _rows(store: SQLStore, table: str) -> list[dict[str, Any]]:
    cols = store._columns(table)
    return [dict(zip(cols, row, strict=True)) for row in store.snapshot()[table]]


@pytest.fixture(params=["sqlite-file", "sqlite-memory", "postgres"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens the test's database, the same one on each call as a new process would (except
    in memory, where each call is a new database)."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        return lambda: open_store(url)  # type: ignore[return-value]
    if request.param == "sqlite-memory":
        return lambda: SQLiteStore(":memory:")
    return lambda: SQLiteStore(tmp_path / "store.db")


def _reopenable(opener: Opener) -> SQLStore:
    """The test's store, where opening it again finds the same data (not in memory)."""
    s = opener()
    if isinstance(s, SQLiteStore) and s.path == ":memory:":
        s.close()
        pytest.skip("an in-memory database ends with its connection")
    return s


@pytest.fixture
def store(opener: Opener) -> Iterator[SQLStore]:
    s = opener()
    yield s
    s.close()


@pytest.fixture
def with_task(store: Store) -> Store:
    store.add_bundle("b-1", {"num_parameters": 8, "files": {}}, 0.0)
    store.add_task(_task())
    return store


class TestStore:
    """Behaviour every backend must have."""

    def test_devices_round_trip_and_count(self, store: Store) -> None:
        d = _device("d-1")
        store.add_device(d)
        assert store.get_device("d-1") == d
        assert store.get_device("d-2") is None
        assert store.count_devices() == 1
        with pytest.raises(StoreError):
            store.add_device(d)
        store.add_device(_device("d-2"))  # the failure left the connection usable
        assert store.count_devices() == 2

    def test_device_auth_is_the_row_s_credentials(self, store: Store) -> None:
        d = _device("d-1")
        store.add_device(d)
        assert store.device_auth("d-2") is None
        assert store.device_auth("d-1") == DeviceAuth(
            "d-1", d.secret_salt, d.secret_hash, d.population, d.registered_at
        )  # never seen: registration time
        store.update_device("d-1", last_seen_at=42.5)
        assert store.device_auth("d-1") == DeviceAuth(
            "d-1", d.secret_salt, d.secret_hash, d.population, 42.5
        )

    def test_size_grows_with_what_is_stored(self, store: Store) -> None:
        before = store.size_bytes()
        assert before > 0
        with store.atomic():
            for i in range(3000):
                store.add_device(dataclasses.replace(_device(f"d-{i}"), platform="x" * 200))
        assert store.size_bytes() > before + 3000 * 200 // 2

    def test_devices_unseen_since_are_deleted_unless_in_flight(self, with_task: Store) -> None:
        for i, at in ((1, 1.0), (2, 2.0), (3, 3.0), (4, 50.0)):
            with_task.add_device(dataclasses.replace(_device(f"d-{i}"), registered_at=at))
        with_task.update_device("d-1", last_seen_at=60.0)  # registered long ago, seen lately
        r = with_task.add_round(_round("t-1", "reporting"))
        with_task.add_assignments(  # d-3 trains right now
            [Assignment("a-3", r.round_id, "t-1", "d-3", "train", "delivered", 4.0)]
        )
        assert with_task.delete_devices(seen_before=10.0) == 1  # d-2 only
        assert [d for d in ("d-1", "d-2", "d-3", "d-4") if with_task.get_device(d)] == [
            "d-1", "d-3", "d-4"
        ]  # fmt: skip
        seen = with_task.get_device("d-1")
        assert seen is not None and seen.last_seen_at == 60.0
        with pytest.raises(StoreError):
            with_task.update_device("d-9", last_seen_at=1.0)

    def test_bundles_are_content_addressed(self, store: Store) -> None:
        manifest = {"num_parameters": 4, "files": {"p": {"sha256": "x", "bytes": 16}}}
        assert store.add_bundle("b-9", manifest, 1.0) is True
        assert store.add_bundle("b-9", manifest, 2.0) is False
        assert store.get_bundle("b-9") == manifest
        assert store.get_bundle("nope") is None

    def test_tasks_list_in_creation_order_and_filter(self, store: Store) -> None:
        store.add_bundle("b-1", {"num_parameters": 8, "files": {}}, 0.0)
        store.add_task(_task("t-2", created_at=2.0))
        store.add_task(_task("t-1", created_at=1.0, population="phones"))
        assert [t.task_id for t in store.list_tasks()] == ["t-1", "t-2"]
        assert [t.task_id for t in store.list_tasks(population="phones")] == ["t-1"]
        store.update_task("t-2", state="paused", model_version=3)
        t2 = store.get_task("t-2")
        assert t2 is not None and (t2.state, t2.model_version) == ("paused", 3)
        assert [t.task_id for t in store.list_tasks(state="paused")] == ["t-2"]

    def test_versions_are_unique_per_task(self, with_task: Store) -> None:
        v = Version("t-1", 0, "a" * 64, None, None, 1.0)
        with_task.add_version(v)
        assert with_task.get_version("t-1", 0) == v
        assert with_task.get_version("t-1", 1) is None
        with pytest.raises(StoreError):
            with_task.add_version(v)

    def test_rounds_open_and_close(self, with_task: Store) -> None:
        r = with_task.add_round(_round())
        assert r.round_id > 0 and r.is_open
        assert with_task.open_round("t-1") == r
        with_task.update_round(r.round_id, state="committed", closed_at=30.0, metrics={"a": 1})
        closed = with_task.get_round(r.round_id)
        assert closed is not None and closed.metrics == {"a": 1} and not closed.is_open
        assert with_task.open_round("t-1") is None
        assert with_task.open_rounds() == []
        assert [x.round_id for x in with_task.list_rounds("t-1")] == [r.round_id]

    def test_rounds_from_a_base_version(self, with_task: Store) -> None:
        ids = [
            with_task.add_round(
                dataclasses.replace(_round(), number=v + 1, base_version=v)
            ).round_id
            for v in range(4)
        ]
        assert [x.round_id for x in with_task.list_rounds("t-1", min_base_version=2)] == ids[2:]
        assert [x.round_id for x in with_task.list_rounds("t-1", min_base_version=0)] == ids
        assert with_task.list_rounds("t-1", min_base_version=9) == []

    def test_candidates_once_each_in_order(self, with_task: Store) -> None:
        r = with_task.add_round(_round())
        assert with_task.add_candidate(r.round_id, "d-2", 11.0)
        assert with_task.add_candidate(r.round_id, "d-1", 12.0)
        assert not with_task.add_candidate(r.round_id, "d-2", 13.0)
        assert with_task.candidates(r.round_id) == ["d-2", "d-1"]
        assert with_task.count_candidates(r.round_id) == 2

    def test_assignments_one_per_device_and_round(self, with_task: Store) -> None:
        r = with_task.add_round(_round())
        a = Assignment("a-1", r.round_id, "t-1", "d-1", "train", "selected", 20.0)
        with_task.add_assignments([a])
        assert with_task.get_assignment("a-1") == a
        assert with_task.assignment_for(r.round_id, "d-1") == a
        with pytest.raises(StoreError):  # the second of the batch is d-1's second assignment
            with_task.add_assignments(
                [Assignment("a-4", r.round_id, "t-1", "d-4", "train", "selected", 20.0),
                 Assignment("a-2", r.round_id, "t-1", "d-1", "train", "selected", 20.0)]
            )  # fmt: skip
        assert with_task.get_assignment("a-4") is None  # the failed batch left nothing
        assert with_task.count_assignments(r.round_id) == 1
        with_task.add_assignments(
            [Assignment("a-3", r.round_id, "t-1", "d-3", "train", "delivered", 21.0)]
        )
        with_task.update_assignment("a-1", state="aborted", abort_reason="user")
        assert with_task.expire_assignments(r.round_id, 50.0) == 1  # only a-3 was still open
        states = {a.assignment_id: a.state for a in with_task.round_assignments(r.round_id)}
        assert states == {"a-1": "aborted", "a-3": "expired"}

    def test_open_assignments_across_rounds(self, with_task: Store) -> None:
        r1 = with_task.add_round(_round("t-1", "committed"))
        r2 = with_task.add_round(_round("t-1", "reporting"))
        r3 = with_task.add_round(_round("t-1", "committed"))
        with_task.add_assignments(
            [
                Assignment("a-1", r1.round_id, "t-1", "d-1", "train", "delivered", 23.0),
                Assignment("a-2", r2.round_id, "t-1", "d-2", "train", "selected", 21.0),
                Assignment("a-3", r2.round_id, "t-1", "d-3", "train", "delivered", 22.0),
                Assignment("a-4", r3.round_id, "t-1", "d-4", "train", "delivered", 20.0),
            ]
        )
        with_task.update_assignment("a-3", state="aborted")
        got = with_task.open_assignments([r1.round_id, r2.round_id])
        assert [a.assignment_id for a in got] == ["a-2", "a-1"]  # open ones, oldest first
        assert with_task.open_assignments([]) == []

    def test_assignment_moves_only_from_the_states_given(self, with_task: Store) -> None:
        r = with_task.add_round(_round("t-1", "reporting"))
        with_task.add_assignments(
            [Assignment("a-1", r.round_id, "t-1", "d-1", "train", "delivered", 20.0),
             Assignment("a-2", r.round_id, "t-1", "d-2", "train", "selected", 20.0)]
        )  # fmt: skip
        with_task.update_assignment("a-1", state="reported", closed_at=30.0)
        before = with_task.snapshot()
        # Read as in flight before another replica reported it: the expiry changes nothing.
        moved = with_task.update_assignment(
            "a-1", only_from=("selected", "delivered"), state="expired", closed_at=40.0
        )
        assert moved is False and with_task.snapshot() == before
        assert with_task.get_assignment("a-1").state == "reported"  # type: ignore[union-attr]
        assert with_task.update_assignment(
            "a-2", only_from=("selected",), state="delivered", delivered_at=41.0
        ) is True
        got = with_task.get_assignment("a-2")
        assert got is not None and (got.state, got.delivered_at) == ("delivered", 41.0)
        with pytest.raises(StoreError):  # missing is still an error, not a state that moved
            with_task.update_assignment("a-9", only_from=("selected",), state="expired")
        with pytest.raises(ValueError):
            with_task.update_assignment("a-2", only_from=(), state="expired")

    def test_update_marks_assignment_reported_atomically(self, with_task: Store) -> None:
        r = with_task.add_round(_round("t-1", "reporting"))
        with_task.add_assignments(
            [Assignment("a-1", r.round_id, "t-1", "d-1", "train", "delivered", 20.0)]
        )
        u = Update(
            "a-1",
            r.round_id,
            "t-1",
            "d-1",
            "k",
            "c" * 64,
            100,
            7,
            0.5,
            {"num_examples": 7},
            25.0,
            {"accepted": True},
        )
        with_task.add_update(u)
        assert with_task.get_update("a-1") == u
        assert list(with_task.round_updates(r.round_id)) == [u]
        assert with_task.count_updates(r.round_id) == 1 and with_task.count_updates() == 1
        assert with_task.count_updates(device_id="d-1") == 1
        assert with_task.count_updates(r.round_id, device_id="d-2") == 0
        assert with_task.round_payloads(r.round_id) == ["c" * 64]
        assert with_task.payload_in_open_round("c" * 64)
        assert not with_task.payload_in_open_round("d" * 64)
        with_task.update_round(r.round_id, state="committed")
        assert not with_task.payload_in_open_round("c" * 64)
        assert with_task.assignment_counts(r.round_id) == {"reported": 1}
        a = with_task.get_assignment("a-1")
        assert a is not None and a.state == "reported" and a.closed_at == 25.0
        before = with_task.snapshot()
        with pytest.raises(StoreError):
            with_task.add_update(u)
        assert with_task.snapshot() == before

    def test_a_report_of_an_assignment_no_longer_in_flight_stores_nothing(
        self, with_task: Store
    ) -> None:
        """Aborted or expired after the caller read it in flight (among replicas, by another
        one): the abort or expiry stands, neither report is stored."""
        r = with_task.add_round(_round("t-1", "reporting"))
        with_task.add_assignments(
            [Assignment(a, r.round_id, "t-1", "d-" + a, "train", "delivered", 20.0)
             for a in ("a-1", "a-2")]
        )  # fmt: skip
        with_task.update_assignment("a-1", state="aborted", closed_at=21.0)
        with_task.expire_assignments(r.round_id, 22.0)
        before = with_task.snapshot()
        u = Update("a-1", r.round_id, "t-1", "d-a-1", "k", "c" * 64, 100, 7, None,
                   {"num_examples": 7}, 25.0, {})  # fmt: skip
        assert with_task.add_update(u) is False
        report = EvalReport("a-2", r.round_id, "t-1", "d-a-2", 5, 0.1, None, 25.0, {})
        assert with_task.add_eval_report(report) is False
        assert with_task.snapshot() == before

    def test_update_totals_are_example_weighted(self, with_task: Store) -> None:
        r = with_task.add_round(_round("t-1", "reporting"))
        assert with_task.update_totals(r.round_id) == UpdateTotals()
        rows = [(3, 0.5, 0.9, 100), (7, None, 0.5, 50), (10, 0.2, None, 10)]
        for i, (n, loss, acc, size) in enumerate(rows):
            aid = f"a-{i}"
            with_task.add_assignments(
                [Assignment(aid, r.round_id, "t-1", f"d-{i}", "train", "delivered", 20.0)]
            )
            report = {"num_examples": n, **({} if acc is None else {"accuracy": acc})}
            with_task.add_update(
                Update(
                    aid, r.round_id, "t-1", f"d-{i}", "k", "c" * 64, size, n, loss, report, 25.0, {}
                )
            )
        t = with_task.update_totals(r.round_id)
        assert (t.count, t.num_examples, t.payload_bytes) == (3, 20, 160)
        assert t.loss == pytest.approx((3 * 0.5 + 10 * 0.2) / 13)
        assert t.accuracy == pytest.approx((3 * 0.9 + 7 * 0.5) / 10)
        # a robust plan's cap: each update's figures count for at most 4.5 examples
        capped = with_task.update_totals(r.round_id, example_cap=4.5)
        assert (capped.count, capped.num_examples) == (3, 20)  # the declared total stays
        assert capped.loss == pytest.approx((3 * 0.5 + 4.5 * 0.2) / 7.5)
        assert capped.accuracy == pytest.approx((3 * 0.9 + 4.5 * 0.5) / 7.5)

    def test_referenced_blobs(self, store: Store) -> None:
        files = {"p": {"sha256": "1" * 64, "bytes": 4}, "g": {"sha256": "2" * 64, "bytes": 9}}
        store.add_bundle("b-1", {"num_parameters": 1, "files": files}, 0.0)
        store.add_task(_task())
        store.add_version(Version("t-1", 0, "1" * 64, None, None, 1.0))  # shared with the bundle
        store.add_version(Version("t-1", 1, "3" * 64, "4" * 64, None, 2.0))
        open_r = store.add_round(_round("t-1", "reporting"))
        closed_r = store.add_round(_round("t-1", "committed"))
        for aid, r, sha in (("a-1", open_r, "5" * 64), ("a-2", closed_r, "6" * 64)):
            store.add_assignments(
                [Assignment(aid, r.round_id, "t-1", aid, "train", "delivered", 1)]
            )
            store.add_update(Update(aid, r.round_id, "t-1", aid, "k", sha, 1, 1, None, {}, 2, {}))
        live = {c * 64 for c in "12345"}
        assert store.referenced_blobs(closed_round_payloads=False) == live
        assert store.referenced_blobs(closed_round_payloads=True) == live | {"6" * 64}
        everything = store.referenced_blobs(closed_round_payloads=True)
        for sha in [c * 64 for c in "1234567"]:
            assert store.blob_referenced(sha) == (sha in everything), sha

    def test_eval_report(self, with_task: Store) -> None:
        r = with_task.add_round(_round("t-1", "reporting"))
        with_task.add_assignments(
            [Assignment("a-1", r.round_id, "t-1", "d-1", "evaluate", "delivered", 20.0)]
        )
        rep = EvalReport("a-1", r.round_id, "t-1", "d-1", 50, 0.3, 0.9, 26.0, {"accepted": True})
        with_task.add_eval_report(rep)
        assert with_task.get_eval_report("a-1") == rep
        assert with_task.round_eval_reports(r.round_id) == [rep]

    def test_atomic_rolls_back_everything(self, with_task: Store) -> None:
        before = with_task.snapshot()
        with pytest.raises(RuntimeError), with_task.atomic():
            with_task.add_version(Version("t-1", 0, "a" * 64, None, None, 1.0))
            with_task.update_task("t-1", model_version=5)
            raise RuntimeError("crash in the middle")
        assert with_task.snapshot() == before


    def test_reads_inside_a_transaction_see_its_own_writes(self, with_task: Store) -> None:
        """A round or task read again inside one transaction (SQLite keeps such records for
        the transaction) is what the transaction's writes made it: updated, inserted after
        it was read as missing, deleted, set by a statement of its own (expiry, retention),
        and back to before after a savepoint rolled back."""
        s = with_task
        with s.atomic():
            rnd = s.add_round(_round())
            assert s.get_round(rnd.round_id + 1) is None
            assert s.lock_round(rnd.round_id) == rnd
            s.update_round(rnd.round_id, state="reporting")
            got = s.get_round(rnd.round_id)
            assert got is not None and got.state == "reporting"
            nxt = s.add_round(_round())
            assert nxt.round_id == rnd.round_id + 1 and s.get_round(nxt.round_id) == nxt
            assert s.get_task("t-1") is not None and s.get_task("t-1").model_version == 0
            s.update_task("t-1", model_version=4)
            assert s.get_task("t-1").model_version == 4
            with pytest.raises(RuntimeError), s.atomic():  # nested: a savepoint
                s.update_task("t-1", model_version=5)
                s.update_round(rnd.round_id, state="committed", closed_at=2.0)
                assert s.get_task("t-1").model_version == 5
                assert s.get_round(rnd.round_id).state == "committed"
                raise RuntimeError("rolled back")
            assert s.get_task("t-1").model_version == 4
            got = s.lock_round(rnd.round_id)
            assert got is not None and got.state == "reporting"
            s.update_round(nxt.round_id, state="abandoned", closed_at=2.0)
            s.delete_rounds([nxt.round_id])
            assert s.get_round(nxt.round_id) is None
        assert s.get_round(rnd.round_id) == dataclasses.replace(rnd, state="reporting")
        assert s.get_task("t-1").model_version == 4

    def test_a_transaction_is_never_taken_as_stored_when_it_was_not(self, store: SQLStore) -> None:
        """A statement fails inside a transaction and its caller catches the error (as an
        upload batch does for one upload's error, going on with the others). SQLite undoes
        that statement only, and the rest commits; PostgreSQL aborts the whole transaction,
        whose COMMIT then rolls back without an error: the block must fail instead, or a
        batch would acknowledge uploads that were not stored (with an error it answers 503,
        as for storage unavailable: see also test_lost_transaction.py)."""
        try:
            with store.atomic():
                store.add_device(_device("d-1"))
                with pytest.raises(Exception, match="no_such_table"):
                    store._execute("select * from no_such_table")
        except TransactionLost as e:
            assert isinstance(e, store.transient_errors)
            assert store.get_device("d-1") is None  # refused, and nothing of it stored
            assert not isinstance(store, SQLiteStore)
        else:
            assert store.get_device("d-1") == _device("d-1")  # taken as stored, and stored
        store.add_device(_device("d-2"))  # the connection is usable either way
        assert store.get_device("d-2") is not None

    def test_failed_write_inside_a_transaction_leaves_it_usable(self, store: Store) -> None:
        with store.atomic():
            store.add_device(_device("d-1"))
            with pytest.raises(StoreError):
                store.add_device(_device("d-1"))
            store.add_device(_device("d-2"))
        assert store.count_devices() == 2

    def test_updating_a_missing_record_is_refused(self, with_task: Store) -> None:
        before = with_task.snapshot()
        for update in (
            lambda: with_task.update_task("t-9", state="paused"),
            lambda: with_task.update_round(999, state="committed"),
            lambda: with_task.update_assignment("a-9", state="aborted"),
            lambda: with_task.update_version("t-1", 9, optimizer_sha=None),
        ):
            with pytest.raises(StoreError):
                update()
        assert with_task.snapshot() == before

    def test_versions_listed_updated_and_deleted(self, with_task: Store) -> None:
        for v in range(4):
            with_task.add_version(Version("t-1", v, str(v) * 64, "e" * 64, None, float(v)))
        with_task.update_task("t-1", model_version=3)
        with_task.update_version("t-1", 1, optimizer_sha=None)
        assert [v.version for v in with_task.list_versions("t-1")] == [0, 1, 2, 3]
        v1 = with_task.get_version("t-1", 1)
        assert v1 is not None and v1.optimizer_sha is None
        with pytest.raises(StoreError):
            with_task.delete_versions("t-1", [2, 3])  # 3 is the task's current version
        assert len(with_task.list_versions("t-1")) == 4
        with_task.delete_versions("t-1", [0, 2])
        assert [v.version for v in with_task.list_versions("t-1")] == [1, 3]
        assert with_task.list_versions("t-9") == []

    def test_delete_rounds_with_what_hangs_off_them(self, with_task: Store) -> None:
        closed = with_task.add_round(_round("t-1", "committed"))
        live = with_task.add_round(_round("t-1", "reporting"))
        assert live.round_id > closed.round_id
        for r, aid in ((closed, "a-1"), (live, "a-2")):
            with_task.add_candidate(r.round_id, aid, 1.0)
            with_task.add_assignments(
                [Assignment(aid, r.round_id, "t-1", aid, "train", "delivered", 1)]
            )
            with_task.add_update(Update(aid, r.round_id, "t-1", aid, "k", "5" * 64, 1, 1, None,
                                        {}, 2, {}))  # fmt: skip
        with_task.add_assignments(
            [Assignment("a-3", closed.round_id, "t-1", "a-3", "evaluate", "delivered", 1)]
        )
        with_task.add_eval_report(EvalReport("a-3", closed.round_id, "t-1", "a-3", 5, 0.1, None,
                                             3.0, {}))  # fmt: skip
        before = with_task.snapshot()
        with pytest.raises(StoreError):
            with_task.delete_rounds([closed.round_id, live.round_id])
        assert with_task.snapshot() == before
        with_task.delete_rounds([closed.round_id])
        assert with_task.get_round(closed.round_id) is None
        assert with_task.candidates(closed.round_id) == []
        assert with_task.round_assignments(closed.round_id) == []
        assert with_task.get_update("a-1") is None and with_task.get_eval_report("a-3") is None
        assert with_task.get_update("a-2") is not None
        assert with_task.candidates(live.round_id) == ["a-2"]

    def test_a_coordinator_alone_excludes_every_other_and_replicas_one_alone(
        self, opener: Opener
    ) -> None:
        """Before, nothing did: two ``fedge serve`` without ``--replica`` on one database
        both served it (each adding a round's uploads into its own sums in memory, each
        sweeping at start-up the payloads the other had not committed yet)."""
        first = _reopenable(opener)
        first.hold(shared=False)
        first.hold(shared=False)  # again on the same store: nothing changes
        for shared in (False, True):
            other = opener()
            with pytest.raises(DatabaseInUse, match="--replica"):
                other.hold(shared=shared)
            other.close()
        first.close()  # a process that ends (however) lets go
        replicas = [opener(), opener()]
        for r in replicas:
            r.hold(shared=True)
        alone = opener()
        with pytest.raises(DatabaseInUse, match="another coordinator serves"):
            alone.hold(shared=False)
        for s in (alone, *replicas):
            s.close()
        again = opener()
        again.hold(shared=False)
        again.close()

    def test_accepted_updates_outlive_their_deleted_rounds(self, opener: Opener) -> None:
        """Deleting rounds counts their update rows into their tasks' retired updates in the
        same transaction, so the updates ever accepted stay the total: across a reopen (a
        restart), a refused delete and a second delete of the same rounds. Their payload
        bytes likewise (``/metrics`` reads both)."""
        store = _reopenable(opener)
        store.add_bundle("b-1", {"num_parameters": 8, "files": {}}, 0.0)
        closed: dict[str, int] = {}
        for task_id, n, size in (("t-1", 3, 10), ("t-2", 2, 100)):
            store.add_task(_task(task_id))
            closed[task_id] = _round_with_updates(store, task_id, "committed", n, size)
        live = _round_with_updates(store, "t-1", "reporting", 1, 10)
        empty = store.add_round(_round("t-2", "abandoned")).round_id
        assert store.count_accepted_updates() == store.count_updates() == 6
        assert store.accepted_updates()[1] == 3 * 10 + 2 * 100 + 10
        before = store.snapshot()
        with pytest.raises(StoreError):
            store.delete_rounds([closed["t-1"], live])
        assert store.snapshot() == before
        store.delete_rounds([closed["t-1"], closed["t-2"], empty])
        assert store.count_updates() == 1 and store.count_accepted_updates() == 6
        assert store.accepted_updates()[1] == 240
        store.delete_rounds([closed["t-1"]])  # gone already: nothing to count again
        assert store.count_accepted_updates() == 6 and store.accepted_updates()[1] == 240
        store.close()
        store = opener()
        assert store.count_accepted_updates() == 6 and store.accepted_updates()[1] == 240
        store.update_round(live, state="committed")
        store.delete_rounds([live])
        assert store.count_updates() == 0 and store.count_accepted_updates() == 6
        assert store.accepted_updates()[1] == 240
        # kept per task, beside the task's other counters
        retired = {r["task_id"]: (r["updates_retired"], r["update_bytes_retired"])
                   for r in _rows(store, "tasks")}  # fmt: skip
        assert retired == {"t-1": (4, 40), "t-2": (2, 200)}
        store.close()

    def test_round_durations_outlive_their_deleted_rounds(self, opener: Opener) -> None:
        """Closed rounds counted by duration under each bound (at most it: a duration on a
        bound counts under that bound), against numpy's counts of the same durations; and
        deleting rounds moves them into the retired counts in its transaction, so the counts
        stand across a refused delete, a second delete of the same rounds and a reopen."""
        store = _reopenable(opener)
        store.add_bundle("b-1", {"num_parameters": 8, "files": {}}, 0.0)
        store.add_task(_task("t-1"))
        store.add_task(dataclasses.replace(_task("t-2"), mode="async"))
        bounds = np.array(ROUND_DURATION_BOUNDS)
        durations = {("sync", "committed"): [0.5, 1.0, 2.5, 2.6, 3599.0, 3600.0, 7200.5],
                     ("sync", "abandoned"): [30.0, 45.25],
                     ("async", "committed"): [0.25, 10.0, 10.0]}  # fmt: skip
        ids: list[int] = []
        for (mode, outcome), seconds in durations.items():
            task_id = "t-1" if mode == "sync" else "t-2"
            for d in seconds:
                rnd = store.add_round(_round(task_id, "reporting"))
                store.update_round(rnd.round_id, state=outcome, closed_at=rnd.opened_at + d)
                ids.append(rnd.round_id)
        live = store.add_round(_round("t-1", "reporting")).round_id  # not closed: not counted
        # A closed round without a closing time (none is written so, but a row may be) has
        # no duration to count.
        store.update_round(store.add_round(_round("t-2", "reporting")).round_id,
                           state="abandoned")  # fmt: skip

        def reference() -> dict[tuple[str, str], tuple[list[int], float]]:
            out = {}
            for key, seconds in durations.items():
                d = np.array(seconds)
                at_most = [int((d <= b).sum()) for b in bounds] + [len(d)]
                counts = np.diff([0, *at_most]).tolist()
                out[key] = (counts, float(d.sum()))
            return out

        def counted(s: Store) -> dict[tuple[str, str], tuple[list[int], float]]:
            return {k: (list(v.counts), pytest.approx(v.seconds))
                    for k, v in s.round_durations().items()}  # fmt: skip

        assert counted(store) == reference()
        before = store.snapshot()
        with pytest.raises(StoreError):
            store.delete_rounds([ids[0], live])
        assert store.snapshot() == before
        store.delete_rounds(ids[:8])
        assert counted(store) == reference()
        store.delete_rounds(ids[:8])  # gone already: nothing to count again
        assert counted(store) == reference()
        store.close()
        store = opener()
        store.delete_rounds(ids[8:])
        assert counted(store) == reference()
        assert [r.round_id for r in store.list_rounds("t-1")] == [live]
        store.close()

    def test_partial_sums_replace_per_replica_and_go_with_their_round(
        self, with_task: Store
    ) -> None:
        r = with_task.add_round(_round("t-1", "reporting"))
        other = with_task.add_round(_round("t-1", "committed"))
        a = PartialSum(r.round_id, "r-a", 2, 3.5, 4, 1, 1, b"\x00" * 8 + b"\xff" * 8, 1.0)
        with_task.put_partial(a)
        with_task.put_partial(dataclasses.replace(a, replica_id="r-0", count=1))
        with_task.put_partial(dataclasses.replace(a, round_id=other.round_id))
        moved = dataclasses.replace(a, count=3, weight=4.5, total=b"\x01" * 16, updated_at=2.0)
        with_task.put_partial(moved)  # the same replica's row, replaced
        assert with_task.get_partial(r.round_id, "r-a") == moved
        assert with_task.get_partial(r.round_id, "r-b") is None
        assert [p.replica_id for p in with_task.round_partials(r.round_id)] == ["r-0", "r-a"]
        with_task.delete_partials(r.round_id)
        assert with_task.round_partials(r.round_id) == []
        with_task.delete_rounds([other.round_id])
        assert with_task.round_partials(other.round_id) == []

    def test_uncovered_updates_are_those_past_their_replica_s_partial_sum(
        self, with_task: Store
    ) -> None:
        r = with_task.add_round(_round("t-1", "reporting"))
        other = with_task.add_round(_round("t-1", "reporting"))
        tags = [("r-a", 1), ("r-b", 1), ("r-a", 2), (None, None), ("r-a", 3), ("r-c", 1),
                ("r-b", 2)]  # fmt: skip
        for i, (replica, seq) in enumerate(tags):
            aid = f"a-{i}"
            with_task.add_assignments([Assignment(aid, r.round_id, "t-1", aid, "train",
                                                  "delivered", 1.0)])  # fmt: skip
            with_task.add_update(Update(aid, r.round_id, "t-1", aid, "k", "5" * 64, 1, 1, None,
                                        {}, 2.0, {}, replica, seq))  # fmt: skip
        row = PartialSum(r.round_id, "r-a", 2, 2.0, 2, 0, 0, b"\x00" * 8, 1.0)
        with_task.put_partial(row)  # r-a's first two
        with_task.put_partial(dataclasses.replace(row, replica_id="r-b", count=2))  # all of r-b's
        # r-c's row is another round's: it covers nothing here
        with_task.put_partial(dataclasses.replace(row, round_id=other.round_id, replica_id="r-c"))
        uncovered = with_task.uncovered_updates(r.round_id)
        assert [u.assignment_id for u in uncovered] == ["a-3", "a-4", "a-5"]
        assert uncovered[1] == with_task.get_update("a-4")
        assert uncovered[1].replica_id == "r-a" and uncovered[1].replica_seq == 3
        assert [u.assignment_id for u in with_task.uncovered_updates(r.round_id, "r-a")] == ["a-4"]
        assert with_task.uncovered_updates(r.round_id, "r-b") == []
        assert with_task.uncovered_updates(other.round_id) == []
        with_task.delete_partials(r.round_id)
        assert len(with_task.uncovered_updates(r.round_id)) == len(tags)

    def test_locked_reads_return_the_records(self, with_task: Store) -> None:
        r = with_task.add_round(_round("t-1", "reporting"))
        with_task.add_assignments([Assignment("a-1", r.round_id, "t-1", "d", "train",
                                              "delivered", 1.0)])  # fmt: skip
        with with_task.atomic():
            assert with_task.lock_round(r.round_id) == r
            assert with_task.lock_round(r.round_id, skip_locked=True) == r  # its own lock
            assert with_task.lock_task("t-1") == _task()
            assert with_task.lock_round_of("a-1") == r
        assert with_task.lock_round(999) is None and with_task.lock_task("t-9") is None

    def test_secagg_events_in_order_once_each_and_go_with_their_round(
        self, with_task: Store
    ) -> None:
        r = with_task.add_round(_round("t-1", "reporting"))
        start = SecAggEvent(r.round_id, 0, "start", None, {"devices": ["d-1"]}, None, 1.0)
        shares = SecAggEvent(r.round_id, 2, "share", "d-1", {"shares": {"1": "AA=="}}, None, 3.0)
        masked = SecAggEvent(r.round_id, 1, "mask", "d-1", {}, "7" * 64, 2.0)
        for e in (start, shares, masked):
            with_task.add_secagg_event(e)
        assert with_task.secagg_events(r.round_id) == [start, masked, shares]
        assert with_task.secagg_events(r.round_id + 1) == []
        # what a replica holding the session up to seq 1 has not folded yet
        assert with_task.secagg_events(r.round_id, since=2) == [shares]
        assert with_task.secagg_events(r.round_id, since=3) == []
        before = with_task.snapshot()
        with pytest.raises(StoreError):  # two writers for one step: the second is refused
            with_task.add_secagg_event(dataclasses.replace(masked, kind="unmask"))
        assert with_task.snapshot() == before
        # a masked vector is a payload of its round: kept while open, deleted with it
        assert with_task.round_payloads(r.round_id) == ["7" * 64]
        assert "7" * 64 in with_task.referenced_blobs(closed_round_payloads=False)
        with_task.update_round(r.round_id, state="committed")
        assert "7" * 64 not in with_task.referenced_blobs(closed_round_payloads=False)
        assert "7" * 64 in with_task.referenced_blobs(closed_round_payloads=True)
        with_task.delete_rounds([r.round_id])
        assert with_task.secagg_events(r.round_id) == []

    def test_survives_reopen_and_migrates_once(self, opener: Opener) -> None:
        s = _reopenable(opener)
        s.add_bundle("b-1", {"num_parameters": 8, "files": {}}, 0.0)
        s.add_task(_task())
        s.close()
        again = opener()
        assert again.get_task("t-1") == _task()
        assert again.schema_version == max(MIGRATIONS)
        assert len(again.snapshot()["schema_version"]) == len(MIGRATIONS)
        again.close()

    def test_tasks_of_an_older_schema_count_their_retired_updates_from_none(
        self, opener: Opener
    ) -> None:
        with pytest.MonkeyPatch.context() as m:
            m.delitem(MIGRATIONS, 7)  # a database made before tasks.updates_retired
            old = _reopenable(opener)
            old.add_bundle("b-1", {"num_parameters": 8, "files": {}}, 0.0)
            old.add_task(_task())
            done = _round_with_updates(old, "t-1", "committed", 2)
            old.close()
        store = opener()
        assert store.schema_version == max(MIGRATIONS) and store.count_accepted_updates() == 2
        store.delete_rounds([done])
        assert store.count_updates() == 0 and store.count_accepted_updates() == 2
        store.close()

    def test_refuses_a_newer_schema(self, store: SQLStore) -> None:
        version = {"version": max(MIGRATIONS) + 1, "applied_at": 0.0}
        store.schema.table("schema_version").insert(version)
        with pytest.raises(SchemaTooNew):
            apply_migrations(store.schema)
