"""Two replicas' upload batches that lock the same rows: each batch locks every round its
uploads will lock, in round order, then its tasks' rows, before it stores anything, so the
two take turns instead of each holding one lock and waiting for the other's (a deadlock
that PostgreSQL would end by failing one transaction: a batch, 503 for all its uploads, or
a commit). Sync: uploads to two tasks' rounds, listed in opposite orders. Async: an upload
locks its assignment's round and then the open buffer round, so a batch with an update from
an older version holds a round below another batch's; at a buffer's turn-over (no round
open) an upload opens the next one under its task's row, which commits also take, after
their round. On a SQLite file (one writer at a time) only the outcome is checked."""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.admin import tar_directory
from coordinator.clock import FakeClock
from coordinator.config import CoordinatorConfig
from coordinator.errors import Overloaded, TaskFailure
from coordinator.service import LOCK_TRIES, Coordinator, DeviceIdentity, StagedUpload
from coordinator.store import Round, is_database_url
from edge_sdk.codecs import encode_update
from edge_sdk.frame import decode_tensor
from edge_sdk.protocol import ErrorCode, device_auth_header
from tests.fixtures.coordinator import GOOD_CONDITIONS

PLAN = {"rounds": 1, "goal": 2, "over_selection": 1.0, "selection_window_s": 0.0,
        "round_deadline_s": 600.0, "robust": "none", "max_update_norm": None,
        "eligibility": {"require_charging": False}, "codec": "int8"}  # fmt: skip
# How long a batch holding its first round waits for the other batch to take one too: above
# PostgreSQL's deadlock_timeout (1 s), so that a deadlock would be found (and one batch
# failed) before the wait gives up.
MEET_S = 1.5


def _replica(db: str, blobs: Path, clock: FakeClock) -> Coordinator:
    where = {"database_url": db} if is_database_url(db) else {"db_path": db}
    config = CoordinatorConfig(**where, replica=True, blob_path=str(blobs),
                               open_registration=True)  # fmt: skip
    return Coordinator(config, clock=clock)


def _staged(coord: Coordinator, tiny_bundle: Path) -> dict[str, list[StagedUpload]]:
    """Two tasks of one round each, two devices selected in each, their uploads staged and
    installed (not accepted): by task."""
    bundle_id = coord.add_bundle(tar_directory(tiny_bundle))["bundle_id"]
    checkin = json.dumps({"runtimes": ["ort-step"], "conditions": GOOD_CONDITIONS}).encode()
    out: dict[str, list[StagedUpload]] = {}
    for t in range(2):
        task_id = coord.create_task(json.dumps({"bundle_id": bundle_id, "plan": PLAN}).encode())[
            "task_id"
        ]
        out[task_id] = []
        devices = []
        for _ in range(2):  # the other task is full (or not created yet): they join this one
            reg = coord.register(json.dumps({"runtimes": ["ort-step"]}).encode())
            devices.append(coord.authenticate(device_auth_header(reg["device_id"], reg["secret"])))
        for who in devices:
            coord.checkin(who, checkin)
        for i, who in enumerate(devices):
            answer = coord.checkin(who, checkin)
            assert answer["action"] == "train", answer
            assignment = answer["assignment"]["assignment_id"]
            delta = np.full(coord.ctx.num_parameters(coord.store.get_task(task_id)), 0.01 * (i + 1))
            frame = encode_update(delta.astype(np.float32), "int8")[0]
            report = json.dumps({"num_examples": 10 + t})
            admitted = coord.admit_upload(who, assignment, f"k-{t}-{i}", report)
            out[task_id].append(coord.stage_upload(admitted, frame))
        coord.install_uploads(out[task_id])
    return out


def _meeting(
    coord: Coordinator,
    mine: threading.Event,
    theirs: threading.Event,
    at: tuple[str, ...] = ("lock_round", "lock_round_of"),
) -> None:
    """Once this replica's batch holds its first lock of the kinds ``at`` (store methods),
    wait (a while) for the other batch to hold one too: without an order, each would then
    wait for a lock the other holds."""

    def meet() -> None:
        if not mine.is_set():
            mine.set()
            theirs.wait(MEET_S)

    for name in at:
        _around(coord.store, name, after=meet)


def _race(
    a: Coordinator,
    b: Coordinator,
    batch_a: list[StagedUpload],
    batch_b: list[StagedUpload],
    at: tuple[str, ...] = ("lock_round", "lock_round_of"),
) -> dict[str, list[Any]]:
    """Both batches accepted at once, each replica meeting the other at its first lock of
    the kinds ``at``."""
    met = threading.Event(), threading.Event()
    _meeting(a, met[0], met[1], at)
    _meeting(b, met[1], met[0], at)
    answers: dict[str, list[Any]] = {}

    threads = [
        threading.Thread(target=_accept, args=(answers, "a", a, batch_a)),
        threading.Thread(target=_accept, args=(answers, "b", b, batch_b)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    _all_accepted(answers, {"a": batch_a, "b": batch_b})
    return answers


def _accept(
    answers: dict[str, list[Any]], name: str, coord: Coordinator, batch: list[StagedUpload]
) -> None:
    answers[name] = coord.accept_uploads(batch)


def _all_accepted(answers: dict[str, list[Any]], batches: dict[str, list[StagedUpload]]) -> None:
    """Every upload acknowledged: a batch PostgreSQL had ended as a deadlock's victim would
    be answered 503 (Overloaded) for all its uploads."""
    for name, batch in batches.items():
        assert [type(r) for r in answers[name]] == [dict] * len(batch), answers[name]
        assert all(r["accepted"] for r in answers[name])


@pytest.fixture(autouse=True)
def _no_deadlock(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """PostgreSQL ends a deadlock by failing one of its transactions: a batch of uploads
    (503 to all its devices, seen in their answers) or a commit after a batch (logged and
    left to the next tick, which no answer shows)."""
    yield
    ended = [r.getMessage() for r in caplog.get_records("call") if "deadlock" in r.getMessage()]
    assert not ended, ended


@pytest.fixture
def replicas(replica_db: str, tmp_path: Path) -> Iterator[tuple[Coordinator, Coordinator]]:
    """Two replicas on one database and blob directory, on one fake clock."""
    clock = FakeClock(1_700_000_000.0)
    a, b = (_replica(replica_db, tmp_path / "blobs", clock) for _ in range(2))
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_two_batches_take_the_same_rounds_in_one_order(
    replicas: tuple[Coordinator, Coordinator], tiny_bundle: Path
) -> None:
    a, b = replicas
    (first, x), (second, y) = _staged(a, tiny_bundle).items()
    assert a.store.get_task(first) is not None and a.store.get_task(second) is not None
    # A's batch lists the first task's upload first, B's the second task's.
    _race(a, b, [x[0], y[0]], [y[1], x[1]])
    for batch in (x, y):
        assert a.store.count_updates(batch[0].admitted.round_id) == 2


ASYNC_PLAN = {"rounds": 100, "buffer_k": 3, "max_concurrency": 20, "max_staleness": 5,
              "round_deadline_s": 600.0, "robust": "none", "max_update_norm": None,
              "eligibility": {"require_charging": False}, "codec": "int8"}  # fmt: skip
CHECKIN = {"runtimes": ["ort-step"], "conditions": GOOD_CONDITIONS}


class _AsyncTasks:
    """Async tasks made on replica ``a`` (each in a population of its own), devices of theirs
    assigned by check-ins and their uploads staged and installed (not accepted) on any
    replica."""

    def __init__(self, a: Coordinator, tiny_bundle: Path) -> None:
        self.a = a
        self.bundle_id = a.add_bundle(tar_directory(tiny_bundle))["bundle_id"]
        manifest = a.ctx.manifest(self.bundle_id)
        assert manifest is not None
        self.n = int(manifest["num_parameters"])
        self.keys = itertools.count()
        self.uploads: dict[str, list[StagedUpload]] = {}

    def task(self, population: str, **plan: Any) -> str:
        body = {"bundle_id": self.bundle_id, "mode": "async", "population": population,
                "plan": {**ASYNC_PLAN, **plan}}  # fmt: skip
        return str(self.a.create_task(json.dumps(body).encode())["task_id"])

    def assigned(
        self, task_id: str, count: int, coord: Coordinator | None = None
    ) -> list[tuple[DeviceIdentity, str]]:
        coord = coord or self.a
        task = coord.store.get_task(task_id)
        assert task is not None
        out = []
        for _ in range(count):
            body = {"runtimes": ["ort-step"], "population": task.population}
            reg = coord.register(json.dumps(body).encode())
            who = coord.authenticate(device_auth_header(reg["device_id"], reg["secret"]))
            answer = coord.checkin(who, json.dumps(CHECKIN).encode())
            assert answer["action"] == "train", answer
            assert answer["assignment"]["task_id"] == task_id
            out.append((who, answer["assignment"]["assignment_id"]))
        return out

    def staged(self, coord: Coordinator, who: DeviceIdentity, assignment: str) -> StagedUpload:
        k = next(self.keys)
        frame = encode_update(np.full(self.n, 0.001 * (k + 1), np.float32), "int8")[0]
        admitted = coord.admit_upload(who, assignment, f"k-{k}", '{"num_examples": 5}')
        upload = coord.stage_upload(admitted, frame)
        coord.install_uploads([upload])
        self.uploads.setdefault(admitted.task_id, []).append(upload)
        return upload

    def committed(self, task_id: str, devices: list[tuple[DeviceIdentity, str]]) -> None:
        """Accept the devices' uploads on ``a``, one batch each; with K = 1 each commits a
        version and leaves no buffer round open."""
        for who, assignment in devices:
            assert self.a.accept_uploads([self.staged(self.a, who, assignment)])[0]["accepted"]
        self.a.tick()
        assert self.a.store.open_round(task_id) is None

    def turned_over(self) -> tuple[str, list[StagedUpload]]:
        """A task (K = 1) whose version 1 is committed, so that no buffer round is open, and
        the upload of a device still on version 0, staged on ``a``."""
        task_id = self.task("default", buffer_k=1)
        v0 = self.assigned(task_id, 2)
        self.committed(task_id, v0[:1])
        return task_id, [self.staged(self.a, *v0[1])]

    def version(self, task_id: str) -> int:
        task = self.a.store.get_task(task_id)
        assert task is not None
        return task.model_version

    def each_applied_once(self, task_id: str) -> None:
        """With K = 1 each version is the one before plus one update (FedAvg, server step
        1): the current version is version 0 plus the delta of every upload staged."""
        uploads = self.uploads[task_id]
        assert self.version(task_id) == len(uploads)
        params = [decode_tensor(self.a.version_params(None, task_id, str(v)))
                  for v in (0, len(uploads))]  # fmt: skip
        want = params[0] + np.sum([u.delta for u in uploads], axis=0, dtype=np.float64)
        np.testing.assert_allclose(params[1], want, rtol=1e-5, atol=1e-6)


def test_async_batches_lock_the_buffer_round_in_order_too(
    replicas: tuple[Coordinator, Coordinator], tiny_bundle: Path
) -> None:
    a, b = replicas
    tasks = _AsyncTasks(a, tiny_bundle)
    task_id = tasks.task("default")
    # Versions 1 and 2 committed (K = 3), one device left assigned on each older version.
    older = []
    for version in (1, 2):
        devices = tasks.assigned(task_id, 4 if version == 1 else 5)
        for who, assignment in devices[:3]:
            assert a.accept_uploads([tasks.staged(a, who, assignment)])[0]["accepted"]
        a.tick()
        assert tasks.version(task_id) == version
        older.append(devices[3:])
    (x,), (y, z) = older
    ux, uy, uz = tasks.staged(a, *x), tasks.staged(a, *y), tasks.staged(b, *z)
    assert ux.admitted.round_id < uy.admitted.round_id == uz.admitted.round_id
    # A: version 0's round, then (buffer) the open one, then version 1's, which B holds.
    _race(a, b, [ux, uy], [uz])
    assert a.store.count_updates() == 9


def test_async_batches_opening_two_tasks_buffers_take_their_rows_in_one_order(
    replicas: tuple[Coordinator, Coordinator], tiny_bundle: Path
) -> None:
    """At a buffer's turn-over no round is open: an upload opens the next one under its
    task's row. Two batches with uploads to two such tasks, listed in opposite orders, from
    older versions' rounds (so that no round is locked by both): each takes one task's row,
    then waits for the other's."""
    a, b = replicas
    tasks = _AsyncTasks(a, tiny_bundle)
    first, second = tasks.task("p1", buffer_k=1), tasks.task("p2", buffer_k=1)
    left: dict[str, list[tuple[DeviceIdentity, str]]] = {}
    for task_id in (first, second):
        # Versions 1 and 2 committed; one device left on each of versions 0 and 1.
        v0 = tasks.assigned(task_id, 2)
        tasks.committed(task_id, v0[:1])
        v1 = tasks.assigned(task_id, 2)
        tasks.committed(task_id, v1[:1])
        assert tasks.version(task_id) == 2
        left[task_id] = [v0[1], v1[1]]
    x = [tasks.staged(a, *left[first][0]), tasks.staged(a, *left[second][1])]
    y = [tasks.staged(b, *left[second][0]), tasks.staged(b, *left[first][1])]
    assert not {u.admitted.round_id for u in x} & {u.admitted.round_id for u in y}
    _race(a, b, x, y, at=("lock_task",))
    a.tick()
    assert a.store.count_updates() == 8
    tasks.each_applied_once(first)
    tasks.each_applied_once(second)


def test_an_async_batch_opening_a_buffer_meets_its_commit_by_another_replica(
    replicas: tuple[Coordinator, Coordinator], tiny_bundle: Path
) -> None:
    """A's batch finds no open buffer round and goes for the task's row to open one. B opens
    it first, fills it (K = 1) and, in one batch, commits it and fills the next one, which
    it then commits after the batch. Each commit holds its round and wants the task's row:
    A, holding the row, must not then wait for either round (found open while it waited)."""
    a, b = replicas
    tasks = _AsyncTasks(a, tiny_bundle)
    task_id, x = tasks.turned_over()
    b.tick()  # now, not inside the choreography below
    answers: dict[str, list[Any]] = {}
    y: list[StagedUpload] = []
    b_commits, a_holds, b_commits_again = (threading.Event() for _ in range(3))

    def replica_b() -> None:
        # B's devices check in (opening the buffer round) and upload two updates in one batch:
        # the first fills the buffer, the second commits it first and fills the next one.
        y.extend(tasks.staged(b, *d) for d in tasks.assigned(task_id, 2, coord=b))
        _accept(answers, "b", b, y)

    other = threading.Thread(target=replica_b)

    def a_takes_the_row() -> None:
        other.start()
        b_commits.wait(MEET_S)

    def a_holds_the_row() -> None:
        a_holds.set()
        b_commits_again.wait(MEET_S)

    def b_commits_the_version() -> None:
        b_commits.set()
        a_holds.wait(MEET_S)

    _around(a.store, "lock_task", before=a_takes_the_row, after=a_holds_the_row)
    _around(b.store, "update_task", before=b_commits_the_version)
    _around(b.store, "update_task", before=b_commits_again.set, nth=2)
    _accept(answers, "a", a, x)
    other.join(30)
    _all_accepted(answers, {"a": x, "b": y})
    a.tick()
    assert a.store.count_updates() == 4
    tasks.each_applied_once(task_id)


def _around(
    store: Any,
    name: str,
    before: Callable[[], None] | None = None,
    after: Callable[[], None] | None = None,
    nth: int = 1,
) -> None:
    """Run ``before`` and ``after`` around the ``nth`` call of the store's method ``name``."""
    call = getattr(store, name)
    calls = itertools.count(1)

    def hooked(*args: Any, **kwargs: Any) -> Any:
        this = next(calls) == nth
        if this and before is not None:
            before()
        out = call(*args, **kwargs)
        if this and after is not None:
            after()
        return out

    setattr(store, name, hooked)


def test_a_batch_whose_tasks_keep_opening_rounds_is_refused_whole(
    replicas: tuple[Coordinator, Coordinator], tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each time the batch holds its task's row, a round it did not lock is open (as if other
    replicas kept turning the buffer over meanwhile): after LOCK_TRIES tries every upload is
    answered 503 and nothing is stored."""
    a, _ = replicas
    tasks = _AsyncTasks(a, tiny_bundle)
    _, x = tasks.turned_over()
    before = a.store.snapshot()
    old = a.store.get_round(x[0].admitted.round_id)
    assert old is not None
    fresh = (
        dataclasses.replace(old, round_id=i, state="reporting") for i in itertools.count(10**6)
    )
    reads = itertools.count(1)

    def turning_over(task_id: str) -> Round | None:
        # Read before the locks: none open. Read again with the row held: a new one.
        return next(fresh) if next(reads) % 2 == 0 else None

    monkeypatch.setattr(a.store, "open_round", turning_over)
    answers = a.accept_uploads(x)
    assert next(reads) == 2 * LOCK_TRIES + 1
    monkeypatch.undo()
    [answer] = answers
    assert isinstance(answer, Overloaded) and answer.code == ErrorCode.OVERLOADED
    assert answer.status == 503
    assert a.store.snapshot() == before


def test_a_task_failing_on_one_replica_meets_a_batch_on_another(
    replicas: tuple[Coordinator, Coordinator], tiny_bundle: Path
) -> None:
    """B's batch holds the task's open round and will take the task's row; A marks the task
    failed meanwhile, which updates the task's row and abandons that round. Taking the row
    first, A would wait for the round while B waits for the row."""
    a, b = replicas
    (task_id, uploads), _ = _staged(a, tiny_bundle).items()
    task = a.store.get_task(task_id)
    assert task is not None
    a_holds = threading.Event()
    answers: dict[str, list[Any]] = {}

    def b_holds_the_round() -> None:
        failing.start()
        a_holds.wait(MEET_S)  # with the order kept, A waits for the round and never gets here

    _around(b.store, "lock_round", after=b_holds_the_round)
    _around(a.store, "update_task", after=a_holds.set)
    failing = threading.Thread(target=a._fail, args=(task, TaskFailure("injected")))
    _accept(answers, "b", b, [uploads[0]])
    failing.join(30)
    _all_accepted(answers, {"b": [uploads[0]]})
    rnd = a.store.get_round(uploads[0].admitted.round_id)
    assert rnd is not None and rnd.state == "abandoned"
    assert a.store.count_updates(rnd.round_id) == 1
    failed = a.store.get_task(task_id)
    assert failed is not None and failed.state == "failed" and failed.failure == "injected"
