"""The persistence interface and its records.

Every method that writes is atomic on its own; :meth:`Store.atomic` groups several into one
transaction (the service commits a model version, its round and the task's counters as one
step). Records are plain frozen dataclasses; JSON-ish fields are already decoded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "ROUND_DURATION_BOUNDS",
    "Assignment",
    "Device",
    "DeviceAuth",
    "EvalReport",
    "PartialSum",
    "Round",
    "RoundDurations",
    "SecAggEvent",
    "Store",
    "StoreError",
    "StoreIdentity",
    "Task",
    "TransactionLost",
    "Update",
    "UpdateTotals",
    "Version",
]


class StoreError(Exception):
    """A write that would break an invariant of the stored data (e.g. a duplicate key)."""


# How long a transaction waits for another's lock (PostgreSQL's lock_timeout, SQLite's turn
# among the processes on one file) before a transient error (503, retry later). The wait
# stops the service's one worker thread, its ticks included: kept well below the 10 s after
# which a coordinator with no finished tick is unready (coordinator.readiness), or one
# waiting out another process's long close would be taken out of the balancer.
LOCK_WAIT_S = 5.0


class DatabaseInUse(StoreError):
    """Another coordinator serves this database and this one cannot join it: one started
    alone (not a replica) excludes every other, and replicas exclude one alone."""

    def __init__(self, shared: bool) -> None:
        super().__init__(
            "a coordinator started without --replica serves this database: stop it, or "
            "start every process on it with --replica" if shared else
            "another coordinator serves this database: stop it, or start every process on "
            "it with --replica (or one fedge serve --processes K)"
        )


class TransactionLost(StoreError):
    """An ``atomic()`` block whose transaction the database rolled back under it: a statement
    failed and its error was caught inside the block (SQLite undoes the whole transaction on
    some errors, e.g. a full disk; PostgreSQL aborts it on any). Nothing of the block is
    stored. A transient error of every backend: the caller answers 503 and retries."""


@dataclass(frozen=True)
class Device:
    device_id: str
    secret_salt: str
    secret_hash: str
    platform: str
    arch: str
    runtimes: tuple[str, ...]
    population: str
    registered_at: float
    last_seen_at: float | None = None  # last check-in, coarse (see coordinator.retention)


@dataclass(frozen=True)
class DeviceAuth:
    """What authenticating a device's call reads (:meth:`Store.device_auth`): a few columns
    of its row, not the whole record."""

    device_id: str
    secret_salt: str
    secret_hash: str
    population: str
    last_seen_at: float  # registration time if never recorded


@dataclass(frozen=True)
class Task:
    task_id: str
    name: str
    bundle_id: str
    mode: str  # "sync" (rounds); "async" is reserved for buffered aggregation
    population: str
    plan: dict[str, Any]
    state: str  # running | paused | completed | failed
    model_version: int
    rounds_completed: int
    pending_evaluations: int
    created_at: float
    failure: str | None = None  # why a failed task cannot proceed


@dataclass(frozen=True)
class Version:
    task_id: str
    version: int
    params_sha: str
    optimizer_sha: str | None
    round_id: int | None
    created_at: float


@dataclass(frozen=True)
class Round:
    round_id: int
    task_id: str
    number: int  # 1, 2, ... per task, abandoned attempts included
    kind: str  # train | evaluate
    state: str  # selecting | reporting | committed | abandoned | completed (evaluate)
    base_version: int
    goal: int
    target: int  # goal x over-selection
    min_reports: int
    opened_at: float
    window_ends_at: float
    selected_at: float | None = None
    deadline_at: float | None = None
    closed_at: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def is_open(self) -> bool:
        return self.state in ("selecting", "reporting")


@dataclass(frozen=True)
class Assignment:
    assignment_id: str
    round_id: int
    task_id: str
    device_id: str
    action: str  # train | evaluate
    state: str  # selected | delivered | reported | aborted | expired
    created_at: float
    delivered_at: float | None = None
    closed_at: float | None = None
    abort_reason: str | None = None


@dataclass(frozen=True)
class Update:
    assignment_id: str
    round_id: int
    task_id: str
    device_id: str
    idempotency_key: str
    payload_sha: str
    payload_bytes: int
    num_examples: int
    loss: float | None
    report: dict[str, Any]
    accepted_at: float
    response: dict[str, Any]
    # Among replicas (coordinator/replicas.py): the replica that stored it and its place
    # among that replica's updates of the round (1, 2, ...); a partial sum of ``count``
    # updates covers those numbered up to ``count``. None when stored by a lone coordinator.
    replica_id: str | None = None
    replica_seq: int | None = None


# The upper bounds, in seconds, that closed rounds are counted under by duration (what
# /metrics reports as fedge_round_duration_seconds); a last bucket holds the longer ones.
ROUND_DURATION_BOUNDS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


@dataclass(frozen=True)
class RoundDurations:
    """Closed rounds counted by duration: ``counts[i]`` took more than the bound before
    ``ROUND_DURATION_BOUNDS[i]`` and at most it; the last count, more than every bound.
    ``seconds`` is their durations' sum."""

    counts: tuple[int, ...]
    seconds: float


@dataclass(frozen=True)
class UpdateTotals:
    count: int = 0
    num_examples: int = 0
    payload_bytes: int = 0
    loss_sum: float = 0.0  # sum of loss x weight over updates that reported a loss
    loss_weight: float = 0.0  # weight: num_examples, or at most the example cap asked for
    accuracy_sum: float = 0.0
    accuracy_weight: float = 0.0

    @property
    def loss(self) -> float | None:
        return self.loss_sum / self.loss_weight if self.loss_weight else None

    @property
    def accuracy(self) -> float | None:
        return self.accuracy_sum / self.accuracy_weight if self.accuracy_weight else None


@dataclass(frozen=True)
class EvalReport:
    assignment_id: str
    round_id: int
    task_id: str
    device_id: str
    num_examples: int
    loss: float
    accuracy: float | None
    reported_at: float
    response: dict[str, Any]

    def same_figures(self, num_examples: int, loss: float, accuracy: float | None) -> bool:
        """Whether a report of these figures is this one again (a device's retry)."""
        return (self.num_examples, self.loss, self.accuracy) == (num_examples, loss, accuracy)


@dataclass(frozen=True)
class SecAggEvent:
    """One event of a round's secure aggregation (:mod:`coordinator.secagg.rounds`): ``seq``
    0 starts the session, then accepted messages and stage closes in order."""

    round_id: int
    seq: int
    kind: str  # start | advertise | share | mask | unmask | close
    device_id: str | None
    body: dict[str, Any]
    payload_sha: str | None  # a masked vector's blob
    at: float


@dataclass(frozen=True)
class PartialSum:
    """One replica's durable share of an open round's aggregate (:mod:`coordinator.replicas`):
    what it acknowledged, folded. ``total`` is the float64 weighted sum, little-endian bytes."""

    round_id: int
    replica_id: str
    count: int
    weight: float
    examples: int
    staleness_sum: int
    staleness_max: int
    total: bytes
    updated_at: float


@dataclass(frozen=True)
class StoreIdentity:
    """Which database this is: ``store_id`` made when it was created, ``generation`` the
    coordinator starts on it so far (:meth:`Store.start`), and ``predecessor``, the
    ``store_id`` of the database ``fedge db migrate`` copied its records from (None: it
    began empty), with that database's generation at the copy. A blob directory names the
    database it belongs to (:meth:`coordinator.blobs.BlobStore.claim`)."""

    store_id: str
    generation: int
    predecessor: str | None
    predecessor_generation: int | None


class Store(ABC):
    """What the coordinator persists. One implementation per backend; one test suite for all."""

    #: What this backend's driver raises when storage is unavailable for now (a full disk,
    #: an I/O error, a lock timeout, a lost connection): the coordinator answers 503 and
    #: retries later instead of marking a task failed. A failed write changes nothing.
    transient_errors: ClassVar[tuple[type[Exception], ...]] = ()

    @abstractmethod
    def atomic(self) -> AbstractContextManager[None]:
        """Group writes into one transaction (nested use joins the outer one). A block
        whose transaction the database rolled back under it (an error caught inside the
        block) raises :class:`TransactionLost` instead of committing."""

    def relaxed_durability(self) -> AbstractContextManager[None]:
        """Writes made inside commit without waiting for the disk: they survive the
        process being killed, and the next write committed outside (which waits for the
        disk) makes them durable too, as it does everything before it; a power loss before
        that may forget them. For bookkeeping that acknowledges nothing: a check-in's
        candidate, delivery or fill-in assignment (a device that loses one checks in again;
        an upload for a forgotten assignment is refused, never half-counted). The default
        waits for the disk as usual."""
        return nullcontext()

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def size_bytes(self) -> int:
        """What the database takes on its server's disk now (for metrics and the dashboard)."""

    @abstractmethod
    def identity(self) -> StoreIdentity: ...

    @abstractmethod
    def start(self) -> StoreIdentity:
        """Count a coordinator's start on this database (durably); its identity after."""

    @abstractmethod
    def hold(self, *, shared: bool) -> None:
        """Hold the database for the coordinator serving it, until :meth:`close`: ``shared``
        by replicas, else alone. A coordinator alone keeps what it serves in memory and
        sweeps unreferenced blobs at start-up without locks: a second process on its
        database would double its rounds' sums and delete payloads the other is about to
        commit. Raises :class:`DatabaseInUse` when another holds it the other way (or alone);
        a second call on the same store changes nothing."""

    # devices
    @abstractmethod
    def add_device(self, device: Device) -> None: ...
    @abstractmethod
    def get_device(self, device_id: str) -> Device | None: ...
    @abstractmethod
    def device_auth(self, device_id: str) -> DeviceAuth | None: ...
    @abstractmethod
    def count_devices(self) -> int: ...
    @abstractmethod
    def update_device(self, device_id: str, **fields: Any) -> None: ...
    @abstractmethod
    def delete_devices(self, seen_before: float) -> int:
        """Delete devices neither registered nor seen (``last_seen_at``) since ``seen_before``
        that hold no assignment in flight; returns how many."""

    # bundles
    @abstractmethod
    def add_bundle(self, bundle_id: str, manifest: dict[str, Any], created_at: float) -> bool:
        """Store a manifest; False if that bundle was already there (content-addressed)."""

    @abstractmethod
    def get_bundle(self, bundle_id: str) -> dict[str, Any] | None: ...

    # tasks
    @abstractmethod
    def add_task(self, task: Task) -> None: ...
    @abstractmethod
    def get_task(self, task_id: str) -> Task | None: ...
    @abstractmethod
    def list_tasks(self, population: str | None = None, state: str | None = None) -> list[Task]:
        """Oldest first."""

    @abstractmethod
    def update_task(self, task_id: str, **fields: Any) -> None: ...

    # model versions
    @abstractmethod
    def add_version(self, version: Version) -> None: ...
    @abstractmethod
    def get_version(self, task_id: str, version: int) -> Version | None: ...
    @abstractmethod
    def update_version(self, task_id: str, version: int, **fields: Any) -> None: ...
    @abstractmethod
    def list_versions(self, task_id: str) -> list[Version]:
        """The task's stored versions, oldest first (retention may have deleted old ones)."""

    @abstractmethod
    def delete_versions(self, task_id: str, versions: Sequence[int]) -> int:
        """Delete these version records (their blobs are the caller's business); returns how
        many this call deleted (another replica's pass may have deleted some). The task's
        current version is refused with :class:`StoreError`: a commit builds on it."""

    @abstractmethod
    def delete_optimizer_states(self, task_id: str, versions: Sequence[int]) -> int:
        """Forget these versions' optimizer state (``optimizer_sha`` NULL); returns how many
        still had one (versions gone meanwhile, or cleared by another replica, count 0)."""

    # rounds
    @abstractmethod
    def add_round(self, rnd: Round) -> Round:
        """Insert (``round_id`` is assigned by the store) and return the stored record."""

    @abstractmethod
    def get_round(self, round_id: int) -> Round | None: ...
    @abstractmethod
    def open_round(self, task_id: str) -> Round | None:
        """The task's round in selecting or reporting state, if any (at most one)."""

    @abstractmethod
    def open_rounds(self) -> list[Round]: ...
    @abstractmethod
    def list_rounds(self, task_id: str, min_base_version: int = 0) -> list[Round]:
        """The task's rounds, oldest first (those on ``min_base_version`` or later)."""

    @abstractmethod
    def update_round(self, round_id: int, **fields: Any) -> None: ...
    @abstractmethod
    def delete_rounds(self, round_ids: Sequence[int]) -> int:
        """Delete closed rounds with every row that hangs off them (candidates, assignments,
        updates, evaluation reports), in one transaction; the update rows are added to their
        tasks' count of retired updates, and their payload bytes to its retired bytes, and
        the rounds to the retired rounds' durations (:meth:`round_durations`), in it.
        Returns how many rounds this call deleted (another replica's pass may have deleted
        some). An open round is refused with :class:`StoreError` and nothing is deleted."""

    @abstractmethod
    def round_durations(self) -> dict[tuple[str, str], RoundDurations]:
        """(task mode, round state) -> every closed round's duration, opening to close,
        counted under :data:`ROUND_DURATION_BOUNDS`: the rounds stored and those
        :meth:`delete_rounds` deleted, read in one snapshot, so retention shrinks neither."""

    # selection candidates
    @abstractmethod
    def add_candidate(self, round_id: int, device_id: str, at: float) -> bool:
        """False if the device was already a candidate of that round."""

    @abstractmethod
    def candidates(self, round_id: int) -> list[str]:
        """Device ids in check-in order."""

    @abstractmethod
    def count_candidates(self, round_id: int) -> int: ...

    # assignments
    @abstractmethod
    def add_assignments(self, assignments: Sequence[Assignment]) -> None: ...
    @abstractmethod
    def get_assignment(self, assignment_id: str) -> Assignment | None: ...
    @abstractmethod
    def assignment_for(self, round_id: int, device_id: str) -> Assignment | None: ...
    @abstractmethod
    def round_assignments(self, round_id: int) -> list[Assignment]: ...
    @abstractmethod
    def count_assignments(self, round_id: int) -> int: ...
    @abstractmethod
    def update_assignment(
        self, assignment_id: str, *, only_from: Sequence[str] | None = None, **fields: Any
    ) -> bool:
        """Set the assignment's ``fields``; with ``only_from``, only if its state is one of
        those, else False and nothing changes: a state read before (an assignment in flight)
        may have moved since, another replica's transaction having reported, aborted or
        expired it. An assignment that does not exist is a :class:`StoreError`."""
    @abstractmethod
    def expire_assignments(self, round_id: int, at: float) -> int:
        """Mark the round's still-open assignments expired; returns how many."""

    @abstractmethod
    def open_assignments(self, round_ids: Sequence[int]) -> list[Assignment]:
        """Still selected or delivered assignments of these rounds (in flight), oldest first."""

    # updates and evaluation reports
    @abstractmethod
    def add_update(self, update: Update) -> bool:
        """Record an accepted update and mark its assignment reported, in one transaction (a
        second update of it is a :class:`StoreError`); False, and nothing stored, if the
        assignment is no longer in flight (aborted or expired since it was read: among
        replicas, by another one)."""

    @abstractmethod
    def get_update(self, assignment_id: str) -> Update | None: ...
    @abstractmethod
    def round_updates(self, round_id: int) -> Iterator[Update]:
        """Accepted updates of a round, in acceptance order."""

    @abstractmethod
    def count_updates(self, round_id: int | None = None, device_id: str | None = None) -> int:
        """Accepted updates of one round, or of all rounds (of one device, if given), among
        those still stored."""

    @abstractmethod
    def accepted_updates(self) -> tuple[int, int]:
        """Every update ever accepted and their payload bytes: those stored, plus those
        :meth:`delete_rounds` deleted (counted per task in its transaction), so retention
        does not shrink either figure; read together, from one snapshot."""

    def count_accepted_updates(self) -> int:
        return self.accepted_updates()[0]

    @abstractmethod
    def update_totals(self, round_id: int, example_cap: float | None = None) -> UpdateTotals:
        """Sums over a round's accepted updates (without loading them); loss and accuracy
        weighted by declared examples, each counted at most ``example_cap`` when given."""

    @abstractmethod
    def round_payloads(self, round_id: int) -> list[str]:
        """Payload blob hashes of a round's accepted updates (and masked vectors)."""

    @abstractmethod
    def payload_in_open_round(self, payload_sha: str) -> bool:
        """Whether an update of a still-open round has this payload (identical bytes)."""

    @abstractmethod
    def blob_referenced(self, sha: str) -> bool:
        """Whether any record needs blob ``sha``: a bundle file, a version's parameters or
        optimizer state, an update payload or masked vector of any round."""

    @abstractmethod
    def referenced_blobs(self, *, closed_round_payloads: bool) -> set[str]:
        """Every blob hash a record needs: bundle files, versions' parameters and optimizer
        state, and the update payloads and masked vectors of open rounds (of all rounds if
        asked)."""

    @abstractmethod
    def assignment_counts(self, round_id: int) -> dict[str, int]:
        """How many of a round's assignments are in each state."""

    @abstractmethod
    def add_eval_report(self, report: EvalReport) -> bool:
        """Record an evaluation report and mark its assignment reported, in one transaction;
        False, and nothing stored, as :meth:`add_update`."""

    @abstractmethod
    def get_eval_report(self, assignment_id: str) -> EvalReport | None: ...
    @abstractmethod
    def round_eval_reports(self, round_id: int) -> list[EvalReport]: ...

    # secure aggregation
    @abstractmethod
    def add_secagg_event(self, event: SecAggEvent) -> None:
        """Append an event; a ``(round_id, seq)`` already stored is a :class:`StoreError`
        (two writers raced for the same step)."""

    @abstractmethod
    def secagg_events(self, round_id: int, since: int = 0) -> list[SecAggEvent]:
        """The round's events from ``seq`` ``since`` on, in ``seq`` order."""

    # replicas (several coordinator processes on one database: coordinator.replicas)
    @abstractmethod
    def lock_round(self, round_id: int, *, skip_locked: bool = False) -> Round | None:
        """The round, its row locked until the enclosing :meth:`atomic` block ends; with
        ``skip_locked``, None while another transaction holds it. A backend with one writer
        at a time (SQLite) has nothing to lock and just reads it."""

    @abstractmethod
    def lock_task(self, task_id: str) -> Task | None:
        """The task, its row locked like :meth:`lock_round`'s."""

    @abstractmethod
    def lock_round_of(self, assignment_id: str) -> Round | None:
        """The round of an assignment, its row locked like :meth:`lock_round`'s (one
        statement: the hot path of uploads among replicas)."""

    @abstractmethod
    def claim_round(self, round_id: int, *, closing: bool = False) -> bool:
        """Among replicas, before a round's row lock (:meth:`lock_round`). ``closing`` (a
        sync round's close, which may compute for seconds holding the row): claim the
        round until the enclosing :meth:`atomic` block ends, False if another transaction
        holds the claim. Otherwise only look, holding nothing: False while a transaction
        closing the round holds its claim, so that the caller (a batch of uploads) answers
        at once, a refusal to retry, instead of waiting out the close on its service's one
        worker thread. Never waits. A backend with one writer at a time has nothing to
        claim (True)."""

    @abstractmethod
    def lock_blob(self, sha: str, *, shared: bool = False, wait: bool = True) -> bool:
        """Hold the payload ``sha`` until the enclosing :meth:`atomic` block ends: shared by
        transactions that store a row naming it (after checking the file exists), exclusive
        around deleting its file (after checking no row needs it). Blobs are
        content-addressed, so among replicas an identical payload may be deleted by one
        while another stores it. Without ``wait``, False at once if another transaction
        holds it (else True). A backend with one writer at a time has nothing to lock."""

    @abstractmethod
    def put_partial(self, partial: PartialSum) -> None:
        """Insert or replace the partial sum of ``(round_id, replica_id)``."""

    @abstractmethod
    def get_partial(self, round_id: int, replica_id: str) -> PartialSum | None: ...
    @abstractmethod
    def round_partials(self, round_id: int) -> list[PartialSum]:
        """Every replica's partial sum of a round, by replica id."""

    @abstractmethod
    def delete_partials(self, round_id: int) -> None: ...

    @abstractmethod
    def uncovered_updates(self, round_id: int, replica_id: str | None = None) -> list[Update]:
        """A round's updates (of one replica, if given) that no partial sum covers: stored by
        a lone coordinator, by a replica without a partial row, or numbered past its row's
        ``count``; in the order stored."""

    # inspection
    @abstractmethod
    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every table's rows, sorted: equal snapshots mean nothing was stored or changed."""
