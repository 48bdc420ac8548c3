"""Fault injection at the coordinator's durable seams, and the invariants checked after it.

A scenario runs one small federated workload (:class:`Fleet`: sync rounds or async buffers,
real SQLite file or PostgreSQL schema, real blob directory, the real
:class:`~coordinator.service.Coordinator` called the way the HTTP layer calls it) with one
durable step made to fail. The steps are counted at the seams where durability happens:

* every write method of the store (``add_*``, ``update_*``, ``delete_*``, ``expire_*``) and
  the end of every ``Store.atomic()`` block (the transaction's commit, which rolls back);
* ``BlobStore.put``, ``put_file``, ``put_with_derived`` (versions), ``install`` (uploads'
  payloads) and ``delete``;
* every ``os.fsync`` (blob files and directories).

With DP-FedAvg's adaptive clipping (``dp=True``: sync rounds, the plan's ``dp.adaptive``),
the commit's write of the round's metrics, which holds the next round's clipping bound
(``clip_next``), and the commit of its transaction are labelled steps of their own
(:data:`BOUND_WRITE`, :data:`BOUND_COMMIT`), so that a sweep can fail them by name.

With ``retire=True`` the workload is followed by a retention phase (:meth:`Fleet.retire`):
the coordinator restarts with retention on (one version kept, no receipts), and its pass
deletes the older rounds with their update rows and adds the rows it deleted to
``tasks.updates_retired`` and the rounds to ``retired_round_durations``, in one transaction.
Those statements and the commit of the transactions around them are labelled steps
(:data:`RETIRED_WRITE`, :data:`RETIRED_DURATIONS_WRITE`, :data:`RETIRED_COMMIT`);
:func:`check_retired` then holds ``/v1/status``'s ``updates_accepted`` to the number of
acknowledged updates (none lost, none counted twice), and the round-duration counts to
the rounds ever closed, with the retention done (retried after a failed pass, or after the
restart).

A clean run lists the steps; scenario ``i`` fails step ``i`` once, either as the error the
disk would give (``ENOSPC`` / SQLite's "database or disk is full") with the same process
going on, or as a crash (:class:`Crash`, which no ``except Exception`` catches) followed by a
new coordinator on the same files (on PostgreSQL, a store write fails as psycopg's
``DiskFull``; the crashed coordinator's connection closes, which rolls its transaction
back). Devices retry whatever was not acknowledged with the same idempotency key, as the SDK
does, until the workload completes.

:func:`check_invariants` then holds the run to: every acknowledged update stored and in
exactly one committed version; nothing stored that was not acknowledged; each version the
numpy reference of exactly its round's acknowledged updates (FedAvg weights, async
staleness weights); versions monotonic and contiguous; no task failed. With DP, whose
noise no reference reproduces, each version is instead held to its round's DP record: the
record's bound is the one every device of the round was given, and the previous record's
``clip_next`` (the plan's ``clip`` for the first); the record counts the round's
acknowledged updates; what the version adds to its base is the updates clipped to that
bound over the goal plus noise of the recorded scale. Durability of each
acknowledgement is checked when it is given: the update's row is visible to another
connection, and its payload blob's directory entry was fsync'ed after the blob was renamed
into place (the fsync ledger).
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import math
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.admin import tar_directory
from coordinator.clock import FakeClock
from coordinator.config import CoordinatorConfig
from coordinator.errors import ApiError
from coordinator.service import Coordinator, DeviceIdentity
from coordinator.store import Store
from edge_sdk.codecs import encode_update
from edge_sdk.protocol import device_auth_header
from tests.fixtures.coordinator import GOOD_CONDITIONS, make_synthetic_bundle

__all__ = [
    "BOUND_COMMIT",
    "BOUND_WRITE",
    "MODES",
    "RETIRED_COMMIT",
    "RETIRED_DURATIONS_WRITE",
    "RETIRED_WRITE",
    "Crash",
    "Fault",
    "Fleet",
    "Ledger",
    "check_invariants",
    "check_retired",
    "page_limit",
    "run_scenario",
]

N = 48  # parameters of the synthetic model
STORE_WRITES = tuple(
    sorted(
        n
        for n in dir(Store)
        if n.startswith(("add_", "update_", "delete_", "expire_")) and n != "update_totals"
    )
)
# Undefended FedAvg ("robust": "none"): the reference is the plain weighted mean.
PLANS: dict[str, dict[str, Any]] = {
    # three devices a round, all of them needed: every upload is one of the round's
    "sync": {
        "rounds": 2, "goal": 3, "over_selection": 1.0, "min_reporting_fraction": 1.0,
        "selection_window_s": 0.0, "round_deadline_s": 3600.0,
        "eligibility": {"require_charging": False}, "robust": "none",
    },
    # two updates a version; devices 2 and 3 train on version 0 and report at version 1
    "async": {
        "rounds": 3, "buffer_k": 2, "max_concurrency": 4, "round_deadline_s": 3600.0,
        "eligibility": {"require_charging": False}, "robust": "none",
    },
}  # fmt: skip
MODES = tuple(PLANS)
# DP-FedAvg with adaptive clipping (sync only: DP refuses async): a first bound below most
# updates' norms (about 0.07), so that the bound matters and moves.
DP_PLAN = {"clip": 0.05, "noise_multiplier": 1.0,
           "adaptive": {"quantile": 0.5, "lr": 0.2, "bit_noise": 5.0}}  # fmt: skip
BOUND_WRITE = "store.update_round[dp.clip_next]"
BOUND_COMMIT = "store.commit[dp.clip_next]"
RETIRED_WRITE = "store.delete_rounds[tasks.updates_retired]"
RETIRED_COMMIT = "store.commit[tasks.updates_retired]"
RETIRED_DURATIONS_WRITE = "store.delete_rounds[retired_round_durations]"


@contextmanager
def page_limit(conn: sqlite3.Connection) -> Iterator[None]:
    """A database file with no room to grow: ``PRAGMA max_page_count`` at its size. A write
    that needs a new page fails with SQLite's real "database or disk is full", and inside a
    transaction SQLite then rolls the whole transaction back (shown by
    ``tests/coordinator/store/test_lost_transaction.py``)."""
    limit = conn.execute("PRAGMA max_page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
    try:
        yield
    finally:
        conn.execute(f"PRAGMA max_page_count = {limit}")


class Crash(BaseException):
    """The process dies at this step: nothing after it runs (no handler catches it)."""


def _injected_error(label: str, postgres: bool) -> Exception:
    if not label.startswith("store."):
        return OSError(errno.ENOSPC, f"No space left on device (injected at {label})")
    if postgres:
        import psycopg

        return psycopg.errors.DiskFull(f"could not extend file (injected at {label})")
    return sqlite3.OperationalError(f"database or disk is full (injected at {label})")


@dataclass
class Fault:
    """Counts durable steps; fails step ``at`` once (as an error, or as a crash). A store's
    error is the one its driver raises for a full disk (``postgres``: psycopg's)."""

    at: int | None = None
    crash: bool = False
    postgres: bool = False
    steps: list[str] = field(default_factory=list)
    fired: str | None = None

    def step(self, label: str) -> None:
        index = len(self.steps)
        self.steps.append(label)
        if index == self.at:
            self.fired = label
            if self.crash:
                raise Crash(label)
            raise _injected_error(label, self.postgres)


@dataclass
class Ledger:
    """What reached the disk: the step number of each rename into place and of each
    successful directory fsync."""

    seq: int = 0
    renamed: dict[str, int] = field(default_factory=dict)
    dir_synced: dict[str, int] = field(default_factory=dict)

    def durable(self, path: Path) -> bool:
        """Whether ``path``'s directory entry was fsync'ed after it was last renamed."""
        renamed = self.renamed.get(str(path))
        return renamed is not None and self.dir_synced.get(str(path.parent), -1) > renamed


@contextmanager
def os_seams(fault_of: Callable[[], Fault | None], ledger: Ledger) -> Iterator[None]:
    """Route ``os.fsync`` and ``os.replace`` through the fault counter and the ledger."""
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        fault = fault_of()
        if fault is not None:
            fault.step("os.fsync")
        real_fsync(fd)
        ledger.seq += 1
        path = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.isdir(path):
            ledger.dir_synced[path] = ledger.seq

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        real_replace(src, dst, **kwargs)
        ledger.seq += 1
        ledger.renamed[os.path.realpath(dst)] = ledger.seq

    os.fsync, os.replace = fsync, replace  # type: ignore[assignment]
    try:
        yield
    finally:
        os.fsync, os.replace = real_fsync, real_replace


def _records_bound(label: str, kwargs: dict[str, Any]) -> bool:
    """Whether a store write is a DP commit's round metrics with the next clipping bound."""
    metrics = kwargs.get("metrics")
    dp = metrics.get("dp") if label == "store.update_round" and metrics else None
    return isinstance(dp, dict) and "clip_next" in dp


def instrument(coord: Coordinator, fault: Fault) -> None:
    """Count (and fail) ``coord``'s store writes, commits and blob writes."""
    store, blobs = coord.store, coord.blobs
    # The commit label of each labelled write so far: a transaction that saw one more
    # commits that write (the last one's label).
    marked: list[str] = []

    def counted(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if _records_bound(label, kwargs):
                marked.append(BOUND_COMMIT)
                fault.step(BOUND_WRITE)
            else:
                fault.step(label)
            return fn(*args, **kwargs)

        return wrapper

    for name in STORE_WRITES:
        setattr(store, name, counted(f"store.{name}", getattr(store, name)))
    real_atomic, real_execute = store.atomic, store._execute  # type: ignore[attr-defined]

    def atomic() -> AbstractContextManager[None]:
        @contextmanager
        def block() -> Iterator[None]:
            before = len(marked)
            with real_atomic():
                yield
                # raising here rolls the transaction back
                fault.step(marked[-1] if len(marked) > before else "store.commit")

        return block()

    def execute(sql: str, *args: Any) -> Any:
        # Retention's count of the update rows it deleted: a statement inside delete_rounds.
        if sql.startswith("update tasks set updates_retired"):
            marked.append(RETIRED_COMMIT)
            fault.step(RETIRED_WRITE)
        elif sql.startswith("insert into retired_round_durations"):
            marked.append(RETIRED_COMMIT)
            fault.step(RETIRED_DURATIONS_WRITE)
        return real_execute(sql, *args)

    store.atomic = atomic  # type: ignore[method-assign]
    store._execute = execute  # type: ignore[attr-defined]
    for name in ("put", "put_file", "put_with_derived", "install", "delete"):
        setattr(blobs, name, counted(f"blobs.{name}", getattr(blobs, name)))


def delta_of(device: int, version: int, n: int = N) -> np.ndarray:
    return np.random.default_rng(1000 * device + version).normal(0, 0.01, n).astype(np.float32)


def examples_of(device: int) -> int:
    return 10 + 7 * device


@dataclass
class Ack:
    device: int
    assignment_id: str
    base_version: int  # the version the device trained on (its assignment's)
    delta: np.ndarray
    num_examples: int
    clip: float | None = None  # DP: the clipping bound the assignment gave the device


class Fleet:
    """One coordinator (restarted on the same files after a crash), one task, six devices;
    its records in a SQLite file, or in PostgreSQL at ``database_url``."""

    def __init__(
        self,
        root: Path,
        mode: str,
        fault: Fault,
        ledger: Ledger,
        num_parameters: int = N,
        robust: bool = False,
        dp: bool = False,
        database_url: str | None = None,
    ) -> None:
        self.root, self.mode, self.fault, self.ledger = root, mode, fault, ledger
        self.num_parameters = num_parameters
        # Called after each refused request and each tick that did not bring the awaited
        # version (the full-disk test frees space there).
        self.on_trouble: Callable[[], None] = lambda: None
        self.config = CoordinatorConfig(
            db_path=str(root / "fedge.db"),  # with a database_url: where the blobs go
            database_url=database_url,
            open_registration=True,
            seed=7,
            tick_interval_s=1.0,
            retention_interval_s=2.0,  # retention passes run among the faults too
        )
        self.clock = FakeClock()
        self.coord = Coordinator(self.config, clock=self.clock)
        bundle = make_synthetic_bundle(root / "bundle", num_parameters=num_parameters, seed=5)
        bundle_id = self.coord.add_bundle(tar_directory(bundle))["bundle_id"]
        # robust: the plan's default defences (weight cap, adaptive clipping), whose commit
        # reads the updates back from the blob store and keeps a clipping bound
        self.plan = {k: v for k, v in PLANS[mode].items()
                     if not ((robust or dp) and k == "robust")}  # fmt: skip
        if dp:  # DP-FedAvg brings its own clipping and refuses a robust plan
            self.plan["dp"] = DP_PLAN
        self.dp = dp
        self.reference = not (robust or dp)
        body = {"bundle_id": bundle_id, "mode": mode, "plan": self.plan}
        self.task_id = self.coord.create_task(json.dumps(body).encode())["task_id"]
        self.devices: list[DeviceIdentity] = []
        for _ in range(6):
            reg = self.coord.register(json.dumps({"runtimes": ["ort-step"]}).encode())
            auth = device_auth_header(reg["device_id"], reg["secret"])
            self.devices.append(self.coord.authenticate(auth))
        self.acks: dict[str, Ack] = {}
        self.versions_seen: list[int] = [0]
        self.restarts = 0
        self.retire_steps = range(0)  # the steps of the retention phase (retire())
        self.refusals: list[str] = []
        self.p0 = np.fromfile(bundle / "params.f32", dtype="<f4")
        instrument(self.coord, fault)

    # -- the process ------------------------------------------------------------------------

    def restart(self) -> None:
        """A new coordinator on the same database and blob directory, started as the HTTP
        layer starts one: a tick (recovery), then garbage collection."""
        self.coord.close()
        self.coord = Coordinator(self.config, clock=self.clock)
        instrument(self.coord, self.fault)
        self.restarts += 1
        for step in (self.coord.tick, self.coord.collect_garbage):
            try:
                step()
            except Crash:  # the fault fires once: cannot happen twice
                raise AssertionError("crashed twice") from None

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One request; None if it failed (a refusal, an error, or a crash and restart)."""
        self.clock.advance(0.4)
        try:
            return fn(*args)
        except Crash:
            self.restart()
            return None
        except ApiError as e:
            self.refusals.append(f"{e.status} {e.code.value}: {e.message}")
            self.on_trouble()
            return None
        except Exception as e:  # what the HTTP layer would answer 500
            self.refusals.append(f"500 {type(e).__name__}: {e}")
            self.on_trouble()
            return None
        finally:
            self.versions_seen.append(self.read("select model_version from tasks")[0][0])

    def read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """What another connection sees: only committed data."""
        if self.config.database_url is not None:
            import psycopg

            from coordinator.store.postgres_schema import pg_sql

            with psycopg.connect(self.config.database_url, autocommit=True) as pg:
                return pg.execute(pg_sql(sql), args).fetchall()
        conn = sqlite3.connect(f"file:{self.config.db_path}?mode=ro", uri=True)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    # -- devices ----------------------------------------------------------------------------

    def assign(self, devices: list[int]) -> dict[int, dict[str, Any]]:
        """Check the devices in until each holds an assignment."""
        out: dict[int, dict[str, Any]] = {}
        body = json.dumps({"runtimes": ["ort-step"], "conditions": GOOD_CONDITIONS}).encode()
        for _ in range(40):
            for d in devices:
                if d in out:
                    continue
                answer = self.call(lambda who=self.devices[d]: self.coord.checkin(who, body))
                if answer is not None and answer["action"] == "train":
                    out[d] = answer["assignment"]
            if len(out) == len(devices):
                return out
        raise AssertionError(f"devices {devices} got no assignment: {self.refusals[-3:]}")

    def report(self, device: int, assignment: dict[str, Any]) -> None:
        """Upload until acknowledged (same bytes, same key), then check the ack is durable."""
        aid, base = assignment["assignment_id"], assignment["model_version"]
        delta, n = delta_of(device, base, self.num_parameters), examples_of(device)
        frame, _ = encode_update(delta, "fp32")
        header = json.dumps({"num_examples": n, "loss": 0.5})
        who, key = self.devices[device], f"key-{device}-{base}"
        for _ in range(20):
            answer = self.call(lambda: self.coord.upload(who, aid, key, header, frame))
            if answer is not None and answer.get("accepted"):
                self._check_durable(aid)
                clip = assignment["plan"]["dp"]["clip"] if self.dp else None
                self.acks[aid] = Ack(device, aid, base, delta, n, clip)
                return
        raise AssertionError(f"device {device}'s upload was never acknowledged: {self.refusals}")

    def _check_durable(self, assignment_id: str) -> None:
        sql = "select payload_sha from updates where assignment_id = ?"
        rows = self.read(sql, (assignment_id,))
        assert rows, f"acknowledged {assignment_id} but no committed row holds it"
        # (the blob itself may be gone already: a commit the upload completed deletes it)
        path = self.coord.blobs.path(rows[0][0])
        assert self.ledger.durable(path.parent.resolve() / path.name), (
            f"acknowledged {assignment_id} before its payload blob's directory entry was synced"
        )

    def settle(self, version: int) -> None:
        """Let time pass (ticks) until the task reached ``version``."""
        for _ in range(20):
            if self.versions_seen[-1] >= version:
                return
            self.call(self.coord.tick)
            if self.versions_seen[-1] < version:
                self.on_trouble()
        raise AssertionError(f"version {version} never came: {self.refusals[-3:]}")

    def retire(self) -> None:
        """The retention phase: a new coordinator on the same files with retention on (the
        current version kept, no receipts: every round but the last goes), and ticks until
        its pass has deleted the older rounds (a failed pass is retried after
        ``retention_interval_s``, a crash's after the restart)."""
        self.config = dataclasses.replace(self.config, retain_versions=1, retain_receipts_s=0.0)
        self.coord.close()
        self.coord = Coordinator(self.config, clock=self.clock)
        instrument(self.coord, self.fault)
        first = len(self.fault.steps)
        for _ in range(30):
            self.call(self.coord.tick)
            if self.read("select count(*) from rounds") == [(1,)]:
                self.retire_steps = range(first, len(self.fault.steps))
                return
        raise AssertionError(f"retention never deleted the older rounds: {self.refusals[-3:]}")

    def run(self) -> None:
        if self.mode == "sync":
            for version in (1, 2):
                for d, a in self.assign([0, 1, 2]).items():
                    self.report(d, a)
                self.settle(version)
        else:
            work = self.assign([0, 1, 2, 3])
            for d in (0, 1):
                self.report(d, work[d])
            self.settle(1)
            for d in (2, 3):  # trained on version 0, one version stale now
                self.report(d, work[d])
            self.settle(2)
            for d, a in self.assign([4, 5]).items():
                self.report(d, a)
            self.settle(3)


def check_invariants(fleet: Fleet) -> None:
    """The invariants of the module docstring, against a numpy reference (of plain FedAvg:
    with the robust defaults, each version is only checked to be finite)."""
    internal = [r for r in fleet.refusals if r.startswith("500")]
    assert not internal, f"answered 500 (a bug, not a storage error): {internal}"
    rounds_planned = int(fleet.plan["rounds"])
    state, version, failure = fleet.read("select state, model_version, failure from tasks")[0]
    assert state == "completed" and failure is None, (state, failure)
    assert version == rounds_planned
    seen = fleet.versions_seen
    assert all(a <= b for a, b in itertools.pairwise(seen)), f"went back: {seen}"
    versions = fleet.read("select version, params_sha, round_id from versions order by version")
    assert [v for v, _, _ in versions] == list(range(rounds_planned + 1))

    stored = fleet.read("select assignment_id, round_id, device_id, num_examples from updates")
    assert {aid for aid, *_ in stored} == set(fleet.acks), "stored and acknowledged differ"
    committed = {rid for _, _, rid in versions[1:]}
    assert all(rid in committed for _, rid, _, _ in stored), "an acknowledged update is unused"
    blobs = fleet.coord.blobs
    params = fleet.p0.astype(np.float32)
    for v, params_sha, round_id in versions[1:]:
        ups = [fleet.acks[aid] for aid, rid, _, _ in stored if rid == round_id]
        reported = json.loads(fleet.read("select metrics from rounds where round_id = ?",
                                         (round_id,))[0][0])["reported"]  # fmt: skip
        assert reported == len(ups), f"version {v}: {reported} reported, {len(ups)} stored"
        deltas = np.stack([u.delta.astype(np.float64) for u in ups])
        weights = np.array([u.num_examples for u in ups], dtype=np.float64)
        if fleet.mode == "async":  # FedBuff: n / sqrt(1 + staleness), staleness vs v - 1
            weights /= np.sqrt(1.0 + np.array([v - 1 - u.base_version for u in ups], float))
        mean = (weights[:, None] * deltas).sum(0) / weights.sum()
        got = np.frombuffer(blobs.read(params_sha), dtype="<f4")
        if fleet.reference:
            expected = (params.astype(np.float64) + mean).astype(np.float32)
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7, err_msg=f"version {v}")
        if fleet.dp:
            check_dp_round(fleet, v, ups, params, got)
        assert np.isfinite(got).all()
        params = got
    assert sum(1 for _ in stored) == len(fleet.acks)
    assert math.isfinite(float(np.abs(params).sum()))


def check_retired(fleet: Fleet) -> None:
    """After the retention phase (and a restart): the older rounds and versions are gone,
    and ``/v1/status`` still counts every acknowledged update once: the rows kept plus the
    rows retention counted as it deleted them."""
    acked = len(fleet.acks)
    kept, retired = fleet.read(
        "select (select count(*) from updates), "
        "(select coalesce(sum(updates_retired), 0) from tasks)"
    )[0]
    current = fleet.read("select model_version from tasks")[0][0]
    assert fleet.read("select version from versions") == [(current,)]
    assert 0 < retired == acked - kept, f"{retired} retired, {kept} kept, {acked} acknowledged"
    # Rounds are numbered 1, 2, ... and retention keeps the newest: every round ever closed
    # is counted by duration once, deleted or not.
    ever, still_open = fleet.read(
        "select max(number), coalesce(sum(case when state in ('selecting', 'reporting') "
        "then 1 else 0 end), 0) from rounds"
    )[0]
    durations = fleet.coord.store.round_durations().values()
    assert sum(sum(d.counts) for d in durations) == ever - still_open, (durations, ever)
    status = fleet.coord.status()
    assert status["updates_accepted"] == acked, (status["updates_accepted"], acked)
    assert status["tasks"][0]["state"] == "completed"


def check_dp_round(
    fleet: Fleet, version: int, ups: list[Ack], base: np.ndarray, got: np.ndarray
) -> None:
    """Version ``version`` against its round's DP record (``base``: the version before)."""
    records = {v: json.loads(m)["dp"] for v, m in fleet.read(
        "select v.version, r.metrics from versions v join rounds r on r.round_id = v.round_id"
    )}  # fmt: skip
    record = records[version]
    first = float(fleet.plan["dp"]["clip"])
    bound = first if version == 1 else float(records[version - 1]["clip_next"])
    chosen = f"the bound chosen before version {version} was {bound}"
    assert record["clip"] == bound, f"{chosen}, it committed at {record['clip']}"
    given = {u.clip for u in ups}
    assert given == {bound}, f"{chosen}, its devices were given {given}"
    assert record["reports"] == len(ups) and record["rounds"] == version, record
    assert math.isfinite(record["clip_next"]) and record["clip_next"] > 0, record
    goal = record["denominator"]
    deltas = [u.delta.astype(np.float64) for u in ups]
    clipped = sum(d * min(1.0, bound / float(np.linalg.norm(d))) for d in deltas)
    noise = got.astype(np.float64) - base.astype(np.float64) - clipped / goal
    # The noise's scale (its own multiplier, a little above the plan's with adaptive
    # clipping): 48 draws put the sample std within 0.5x-2x with overwhelming probability.
    expected = record["noise_multiplier"] * bound / goal
    assert 0.5 < float(noise.std()) / expected < 2.0, (float(noise.std()), expected)


def run_scenario(
    root: Path,
    mode: str,
    at: int | None,
    crash: bool,
    *,
    num_parameters: int = N,
    robust: bool = False,
    dp: bool = False,
    retire: bool = False,
    prepare: Callable[[Fleet], None] = lambda fleet: None,
    database_url: str | None = None,
) -> Fleet:
    """One scenario end to end (then a clean restart, which must change nothing);
    ``prepare`` runs after the setup, before the workload; ``dp``: a sync workload with
    DP-FedAvg's adaptive clipping; ``retire``: the retention phase after the workload's
    checks (:meth:`Fleet.retire`), then a restart and :func:`check_retired`;
    ``database_url``: the records in that (empty) PostgreSQL schema."""
    root.mkdir(parents=True, exist_ok=True)
    fault = Fault(at=at, crash=crash, postgres=database_url is not None)
    ledger = Ledger()
    current: list[Fault | None] = [None]
    with os_seams(lambda: current[0], ledger):
        fleet = Fleet(root, mode, fault, ledger, num_parameters, robust, dp, database_url)
        prepare(fleet)
        current[0] = fault
        fleet.run()
        current[0] = None
        before = fleet.read("select version, params_sha from versions")
        fleet.restart()
        assert fleet.read("select version, params_sha from versions") == before
        check_invariants(fleet)
        if retire:
            current[0] = fault
            fleet.retire()
            current[0] = None
            fleet.restart()
            check_retired(fleet)
        if at is not None:
            assert fault.fired is not None, f"step {at} never came"
        fleet.coord.close()
    return fleet
