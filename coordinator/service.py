"""The coordinator's operations, independent of HTTP: what each route does.

:class:`Coordinator` owns the store, the blob directory, the clock, the RNG and one policy
per task mode. It is not thread-safe on purpose: the HTTP layer runs every call on one worker
thread, which makes each operation (check-in, upload, commit) a critical section without
locks within the process; several processes on one PostgreSQL database (``replica``) take
turns through the database's row locks (:mod:`coordinator.replicas`). Handlers pass
already-read bodies in; failures are raised as
:class:`~coordinator.errors.ApiError`. The exceptions, :meth:`Coordinator.stage_upload` and
:meth:`Coordinator.install_uploads` (decoding a frame, writing and syncing payload files),
touch no store or policy state and run off the worker thread, for group commit.

Tasks are isolated from each other: every step of one task's state machine (a check-in, a
report, a tick, start-up recovery) runs under :meth:`Coordinator._task_step`. An error there
drops what its policy holds in memory for that task (rebuilt from the store when next
needed); a storage
error (disk full, I/O, lock) answers ``503 overloaded`` and is retried later; anything else
marks that task ``failed`` with its reason, and the other tasks go on.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import random
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from coordinator.blobs import (
    BackgroundDeletes,
    BlobStore,
    Collected,
    Staged,
    WrongBlobDirectory,
    delete_unneeded,
    held,
)
from coordinator.bundles import bundle_tar, extract_bundle, initial_params_name, version_manifest
from coordinator.clock import Clock, SystemClock
from coordinator.config import CoordinatorConfig
from coordinator.eligibility import parse_conditions
from coordinator.errors import (
    ApiError,
    Conflict,
    Forbidden,
    Gone,
    InvalidRequest,
    NotFound,
    Overloaded,
    TaskFailure,
    Unauthorized,
    Unprocessable,
)
from coordinator.pacing import PaceSteering
from coordinator.plan import TaskPlan
from coordinator.replicas import PartialSums, Replica
from coordinator.retention import Retention, RetentionPolicy
from coordinator.rounds import POLICIES, PolicyContext, TaskPolicy
from coordinator.rounds.base import IN_FLIGHT, wait_answer
from coordinator.store import (
    Assignment,
    Device,
    EvalReport,
    Round,
    Store,
    Task,
    Update,
    Version,
    open_store,
)
from coordinator.tensors import decode_delta
from coordinator.validation import Fields
from coordinator.versions import ModelVersions, RoundSums
from edge_sdk.codecs import CodecSpec
from edge_sdk.protocol import (
    HEADER_ENROLLMENT,
    DeviceErrorCode,
    ErrorCode,
    FailurePhase,
    parse_device_auth,
)

__all__ = ["AdmittedUpload", "Coordinator", "DeviceIdentity", "StagedUpload"]

log = logging.getLogger("fedge.coordinator")
T = TypeVar("T")

MAX_IDEMPOTENCY_KEY = 128
# Reported losses are averaged weighted by examples (up to the plan's cap): a bound keeps those
# sums finite, so no round's metrics hold an infinity that JSON cannot carry.
MAX_LOSS = 1e9
# A report's counts are stored and shown as they came: no more than a float64 (and the
# dashboard's JavaScript) holds exactly, rather than a number of a thousand digits.
MAX_REPORTED_COUNT = 2**53
ABORT_REASONS = ("conditions_lapsed", "error", "user")
# Among replicas, how often a batch takes its locks again because one of its tasks opened a
# round while it waited (each time another transaction got there first), before a 503.
LOCK_TRIES = 8


class _RoundOpened(Exception):
    """A round opened while a batch took its locks (:meth:`Coordinator._lock_rounds`)."""


class _TaskRefused(Exception):
    """One task's uploads in a batch cannot be stored now: its step could not write its
    files (a version's parameters on a full disk, say), or among replicas another one is
    closing its round. Its ``refusal`` answers that task's uploads, not the batch's
    (:meth:`Coordinator.accept_uploads`)."""

    def __init__(self, task_id: str, refusal: Overloaded) -> None:
        super().__init__(task_id)
        self.task_id, self.refusal = task_id, refusal


@dataclass(frozen=True)
class DeviceIdentity:
    device_id: str
    population: str
    last_seen_at: float = 0.0  # as stored (registration time if never recorded)


@dataclass(frozen=True)
class AdmittedUpload:
    """An upload that passed the checks needing no payload (:meth:`Coordinator.admit_upload`);
    ``replay``: the answer to a repeat of an upload already accepted."""

    who: DeviceIdentity
    assignment_id: str
    idempotency_key: str
    report: dict[str, Any]
    num_parameters: int
    max_norm: float | None
    replay: dict[str, Any] | None = None
    round_id: int = 0  # the assignment's (among replicas a batch locks its rounds first)
    task_id: str = ""
    codec: CodecSpec | None = None  # the plan's: the frame must be encoded with it


@dataclass(frozen=True)
class StagedUpload:
    """An admitted upload whose frame decoded and checked; its payload staged as a blob."""

    admitted: AdmittedUpload
    delta: np.ndarray  # float32, as decoded (widened when folded)
    blob: Staged
    payload_bytes: int


def _header_bytes(value: str) -> bytes:
    # aiohttp decodes header bytes that are not UTF-8 to lone surrogates; keep them comparable.
    return value.encode("utf-8", "surrogateescape")


def _hash_secret(salt: str, secret: str) -> str:
    # Not the one-shot hmac.digest: it lets the GIL go around every call, and the worker
    # thread, authenticating each request, then queues for it behind the event loop and the
    # decoders. An HMAC object hashes a short message holding it.
    return hmac.new(bytes.fromhex(salt), _header_bytes(secret), "sha256").hexdigest()


_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def reason_kind(reason: str) -> str:
    """An ineligibility reason without the values a device reported ("battery N below N"):
    counted per kind, so that devices cannot grow the counters (and /metrics labels) at will."""
    return _NUMBER.sub("N", reason)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8")) if body else None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # RecursionError: a deeply nested document; ValueError also covers huge integers.
        raise InvalidRequest(f"body is not valid JSON: {e!s:.200}", ErrorCode.MALFORMED_JSON) from e


def _fields_or_empty(body: bytes) -> Fields:
    """A body whose fields are all optional: empty (or ``null``) reads as ``{}``; anything
    else must be a JSON object (not ``or {}``: ``[]``, ``0`` and ``false`` are falsy too, and
    were taken for an empty body)."""
    data = parse_json(body)
    return Fields({} if data is None else data, "body")


def _check_examples(num_examples: int, plan: TaskPlan) -> None:
    # A report's weight: one claiming more would dominate the round (and past 2**63 it
    # would not even fit its column).
    if num_examples > plan.max_examples:
        raise Unprocessable(
            f"num_examples {num_examples} exceeds the task's bound {plan.max_examples}",
            ErrorCode.BAD_UPDATE,
        )


class Coordinator:
    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        store: Store | None = None,
        blobs: BlobStore | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        # A refused start (the directory is another database's) closes what it opened: the
        # caller has no coordinator to close, and the database's writer lock stays held.
        with contextlib.ExitStack() as refused:
            self.store = store if store is not None else open_store(config.store_location)
            if store is None:
                refused.callback(self.store.close)
            # Before anything is read into memory or swept: alone means alone.
            self.store.hold(shared=config.shared)
            # Alone on its blob directory, deletes (a closed round's payloads) unlink off the
            # worker thread; replicas decide and unlink under the blob's lock.
            self.blobs = (
                blobs
                if blobs is not None
                else BlobStore(
                    config.blob_dir,
                    unlink_later=not config.shared,
                    shared_after_s=config.replica_orphan_age_s if config.shared else None,
                    drop_leftovers=False,  # below, once the directory is known to be ours
                )
            )
            if blobs is None:
                refused.callback(self.blobs.close)
            # Before anything reads or sweeps the directory: it must be this database's.
            if self.blobs.owner() is None:
                self._check_versions_present()
            self.blobs.claim(self.store.start())
            refused.pop_all()
        if blobs is None:
            self.blobs.drop_leftovers()
        self.clock = clock or SystemClock()
        self.admin_token = config.admin_token or secrets.token_hex(24)
        # None only when the operator opened registration on purpose.
        self.enrollment_token = config.enrollment_token or (
            None if config.open_registration else secrets.token_hex(24)
        )
        self.rng = random.Random(config.seed)
        self.pacing = PaceSteering(config.pacing, self.rng)
        # Why eligible-looking devices were turned away, per reason (metrics: since start).
        self.ineligible_reasons: Counter[str] = Counter()
        # One of several processes on this database (coordinator.replicas), or alone.
        self.replica = (
            Replica(self.store, write_every=config.replica_partial_every)
            if config.shared
            else None
        )
        self.ctx = PolicyContext(
            store=self.store,
            blobs=self.blobs,
            pacing=self.pacing,
            rng=self.rng,
            versions=ModelVersions(self.store, self.blobs),
            sums=(
                RoundSums(self.store, self.blobs)
                if self.replica is None
                else PartialSums(self.store, self.blobs, self.replica)
            ),
            retain_updates=config.retain_updates,
            replica=self.replica,
            deletes=(
                BackgroundDeletes(self.blobs, lambda: open_store(config.store_location))
                if self.replica is not None
                else None
            ),
        )
        self.policies: dict[str, TaskPolicy] = {m: cls(self.ctx) for m, cls in POLICIES.items()}
        self._plans: dict[str, TaskPlan] = {}
        self._last_tick = float("-inf")
        # Replicas: orphaned blobs last collected (at start-up by the HTTP layer).
        self._last_sweep = self.clock.now()
        self.retention = Retention(
            self.store,
            self.blobs,
            RetentionPolicy(
                config.retain_versions,
                config.retention_interval_s,
                device_inactivity_s=config.device_inactivity_s,
                receipts_s=config.retain_receipts_s,
                closed_round_payloads=config.retain_updates,
            ),
        )

    def close(self) -> None:
        if self.ctx.deletes is not None:
            self.ctx.deletes.close()
        self.blobs.close()
        self.store.close()

    # -- time -------------------------------------------------------------------------------

    def tick(self) -> None:
        """Apply every deadline that is due (the HTTP layer calls this periodically)."""
        now = self.clock.now()
        self._last_tick = now
        for rnd in self.store.open_rounds():
            task = self.store.get_task(rnd.task_id)
            if task is not None and task.state != "failed":
                self._isolated(task, self._tick_task, task, now)
        self.retention.maybe_run(now)  # after the policies: what they closed can go
        # Orphans are at least replica_orphan_age_s old when collected: looking for them much
        # more often than that finds nothing new (each look lists the whole directory).
        interval = max(self.config.retention_interval_s, self.config.replica_orphan_age_s / 4)
        if self.replica is not None and now - self._last_sweep >= interval:
            self._last_sweep = now
            try:
                self.collect_garbage()
            except Exception:  # retried at the next interval
                log.exception("replica: collecting orphaned blobs failed")

    def _check_versions_present(self) -> None:
        """A directory no database has claimed yet must hold the tasks' current versions:
        a database with tasks started on a new, empty directory (``--blobs`` forgotten after
        ``fedge db migrate``) would accept uploads for rounds it can never commit."""
        for task in self.store.list_tasks():
            version = self.store.get_version(task.task_id, task.model_version)
            if version is not None and not self.blobs.exists(version.params_sha):
                raise WrongBlobDirectory(
                    f"blob directory {self.blobs.root} does not hold task {task.task_id}'s "
                    f"version {task.model_version}: give the directory this database's blobs "
                    "are in (--blobs)"
                )

    def collect_garbage(self) -> Collected:
        """Delete blobs no record needs any more (see :mod:`coordinator.blobs`).

        Alone: at startup, after the first :meth:`tick` has finished what a crash interrupted
        and before any request: a blob written for a record not yet committed would look
        unused. Among replicas the others are writing all the time (and :meth:`tick` calls
        this at the retention cadence): only blobs older than ``replica_orphan_age_s`` are
        candidates, each deleted under its lock after a fresh look (``delete_unneeded``).
        """
        if self.replica is None:
            keep = self.store.referenced_blobs(closed_round_payloads=self.config.retain_updates)
            return self.blobs.collect(keep)
        # What delete_unneeded will call needed (closed rounds' payloads included: the close
        # deletes those), so that a blob kept once is not looked at again and again.
        keep = self.store.referenced_blobs(closed_round_payloads=True)
        # File times are the host's wall clock, whatever clock the service runs on.
        cutoff = time.time() - self.config.replica_orphan_age_s
        old: dict[str, int] = {}
        for sha in [s for s in self.blobs.shas() if s not in keep]:
            try:
                stat = self.blobs.path(sha).stat()
            except FileNotFoundError:  # deleted meanwhile by another replica
                continue
            if stat.st_mtime < cutoff:
                old[sha] = stat.st_size
        gone = delete_unneeded(self.blobs, self.store, old, self.store.blob_referenced)
        return Collected(len(gone), sum(old[sha] for sha in gone))

    def _now(self) -> float:
        now = self.clock.now()
        if now - self._last_tick >= self.config.tick_interval_s:
            self.tick()
        return now

    def _tick_task(self, task: Task, now: float) -> None:
        self._policy(task).tick(task, self._plan(task), now)

    # -- task isolation ---------------------------------------------------------------------

    def _task_step(self, task: Task, step: Callable[..., T], *args: Any) -> T:
        """Run one step of ``task``'s state machine. A refusal (ApiError) passes through.
        Any other error drops what its policy holds for the task; a storage error becomes
        ``503 overloaded`` (nothing was acknowledged; retry later), anything else marks the
        task failed and becomes ``409 conflict``."""
        try:
            return step(*args)
        except ApiError:
            raise
        except Exception as e:
            self._policy(task).forget(task.task_id)
            if isinstance(e, (OSError, *self.store.transient_errors)):
                log.warning("task %s: storage unavailable: %s", task.task_id, e)
                raise Overloaded(
                    f"storage unavailable ({type(e).__name__}: {e}); try again later",
                    retry_after_s=max(1.0, self.config.tick_interval_s),
                ) from e
            raise Conflict(f"task {task.task_id} failed: {self._fail(task, e)}") from e

    def _isolated(
        self, task: Task, step: Callable[..., T], *args: Any,
        refused: list[Overloaded] | None = None,
    ) -> T | None:  # fmt: skip
        """:meth:`_task_step` for loops over tasks: a failing task yields None, the loop
        goes on with the others. A ``503`` refusal (the store unavailable) is also added to
        ``refused``, for a caller that must not take it as "nothing to do"."""
        try:
            return self._task_step(task, step, *args)
        except ApiError as e:
            log.info("task %s skipped: %s", task.task_id, e.message)
            if refused is not None and isinstance(e, Overloaded):
                refused.append(e)
            return None

    def _fail(self, task: Task, error: Exception) -> str:
        """Mark ``task`` failed (its open round abandoned, its devices released); returns
        the reason recorded."""
        named = isinstance(error, TaskFailure)
        reason = (str(error) if named else f"{type(error).__name__}: {error}")[:500]
        log.error("task %s failed: %s", task.task_id, reason, exc_info=error)
        now = self.clock.now()
        try:
            with self.ctx.deferring_deletes(), self.store.atomic():
                if self.replica is not None:  # the open round before the task's row
                    self._lock_in_order_retrying({}, [task.task_id])
                self.store.update_task(task.task_id, state="failed", failure=reason)
                rnd = self.store.open_round(task.task_id)
                if rnd is not None:
                    metrics = {"outcome": "abandoned", "reason": "task_failed"}
                    self.store.update_round(
                        rnd.round_id, state="abandoned", closed_at=now, metrics=metrics
                    )
                    # Closed like any abandoned round: its payloads go once this (or the
                    # batch it is part of) commits, unless retained, and its partial sums.
                    self.ctx.round_closed(task.task_id, rnd.round_id)
                # Every round's, not only the open one's: an async task's stragglers train
                # on versions whose buffers committed, and none of them can report now (as
                # when a task completes).
                for held in self.store.list_rounds(task.task_id):
                    self.store.expire_assignments(held.round_id, now)
        except Exception:
            log.exception("task %s: could not record its failure", task.task_id)
        self._plans.pop(task.task_id, None)
        return reason

    # -- helpers ----------------------------------------------------------------------------

    def _plan(self, task: Task) -> TaskPlan:
        plan = self._plans.get(task.task_id)
        if plan is None:
            try:
                plan = TaskPlan.from_json(task.plan)
            except InvalidRequest as e:  # stored by an older coordinator, or edited by hand
                raise TaskFailure(f"stored plan: {e.message}") from e
            self._plans[task.task_id] = plan
        return plan

    def _policy(self, task: Task) -> TaskPolicy:
        return self.policies[task.mode]

    def _task(self, task_id: str) -> Task:
        task = self.store.get_task(task_id)
        if task is None:
            raise NotFound(f"no task {task_id!r}")
        return task

    def _manifest(self, bundle_id: str) -> dict[str, Any]:
        manifest = self.ctx.manifest(bundle_id)
        if manifest is None:
            raise NotFound(f"no bundle {bundle_id!r}")
        return manifest

    def check_admin(self, authorization: str | None) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(  # RFC 9110: any case
            _header_bytes(token), self.admin_token.encode()
        ):
            raise Unauthorized("operator calls need 'Authorization: Bearer <admin token>'")

    def check_enrollment(self, token: str | None) -> None:
        expected = self.enrollment_token
        if expected is None:
            return
        if token is None or not hmac.compare_digest(_header_bytes(token), expected.encode()):
            raise Unauthorized(
                f"registration needs '{HEADER_ENROLLMENT}: <enrollment token>' (missing or wrong)"
            )

    def authenticate(self, authorization: str | None) -> DeviceIdentity:
        parsed = parse_device_auth(authorization)
        if parsed is None:
            raise Unauthorized("device calls need 'Authorization: Device <device_id>:<secret>'")
        device_id, secret = parsed
        # Ids are short ASCII: one that is not cannot exist, and is not looked up (bytes of a
        # header that are not UTF-8 come as lone surrogates, which no store takes: a 500).
        possible = len(device_id) <= 64 and device_id.isascii()
        device = self.store.device_auth(device_id) if possible else None
        # Hash even for unknown devices so that timing does not tell which ids exist.
        salt = device.secret_salt if device else "00" * 16
        expected = device.secret_hash if device else "0" * 64
        if not hmac.compare_digest(_hash_secret(salt, secret[:256]), expected) or device is None:
            raise Unauthorized("unknown device or wrong secret")
        return DeviceIdentity(device.device_id, device.population, device.last_seen_at)

    def _own_assignment(self, who: DeviceIdentity, assignment_id: str) -> Assignment:
        a = self.store.get_assignment(assignment_id)
        if a is None:
            raise NotFound(f"no assignment {assignment_id!r}")
        if a.device_id != who.device_id:
            raise Forbidden("this assignment belongs to another device")
        return a

    def _receipt(self, a: Assignment) -> dict[str, Any]:
        """The stored answer to an accepted report (a replay gets it again)."""
        rnd = self.store.get_round(a.round_id)
        assert rnd is not None
        return {"accepted": True, "round": rnd.number, "model_version": rnd.base_version}

    def _paced(
        self, who: DeviceIdentity, task: Task, now: float, answer: dict[str, Any]
    ) -> dict[str, Any]:
        """``answer`` plus when to check in again: a device that just reported or gave up is
        pace-steered like one that was turned away, or it would come straight back and fill
        the next selection window ahead of devices waiting their turn. Never stored (a replay
        gets a fresh value)."""
        wait = round(self._policy(task).steer(task, self._plan(task), now), 3)
        self.pacing.expect(who.device_id, now, wait)
        return {**answer, "retry_after_s": wait}

    # -- device calls -----------------------------------------------------------------------

    def register(self, body: bytes) -> dict[str, Any]:
        f = _fields_or_empty(body)
        runtimes = f.strings("runtimes", None)
        if runtimes is None:
            raise InvalidRequest("body.runtimes is required")
        platform = f.string("platform", "unknown", max_len=64)
        arch = f.string("arch", "unknown", max_len=64)
        population = f.string("population", "default", max_len=64)
        f.done()
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        device = Device(
            device_id="d-" + secrets.token_hex(10),
            secret_salt=salt,
            secret_hash=_hash_secret(salt, secret),
            platform=platform,
            arch=arch,
            runtimes=tuple(runtimes),
            population=population,
            registered_at=self.clock.now(),
        )
        self.store.add_device(device)
        return {"device_id": device.device_id, "secret": secret}

    def checkin(self, who: DeviceIdentity, body: bytes) -> dict[str, Any]:
        # Only a check-in's own rows are written relaxed (Store.relaxed_durability, at each
        # write in the policies): what it may also do (a tick, a selection, a round opened,
        # a buffer committed) waits for the disk like the rest.
        return self._checkin(who, body, self._now())

    def _checkin(self, who: DeviceIdentity, body: bytes, now: float) -> dict[str, Any]:
        f = _fields_or_empty(body)
        population = f.string("population", who.population, max_len=64)
        if population != who.population:
            raise Forbidden(f"this device is registered in population {who.population!r}")
        runtimes = f.strings("runtimes", None)
        if runtimes is None:
            raise InvalidRequest("body.runtimes is required")
        conditions = parse_conditions(f.raw("conditions"))
        caps = f.child("capabilities")
        codecs = caps.strings("codecs", None)
        caps.done()  # its unknown keys are refused like the body's own
        f.done()
        if not self.retention.saw(who.device_id, who.last_seen_at, now):
            raise Unauthorized("unknown device or wrong secret")  # as authentication says
        self.pacing.saw(who.device_id, now)
        tasks = [
            t
            for t in self.store.list_tasks(population=population)
            if t.state in ("running", "paused")
            or (t.pending_evaluations > 0 and t.state != "failed")
        ]
        fallback: dict[str, Any] | None = None
        refused: list[Overloaded] = []
        for task in tasks:
            found = self._isolated(task, self._task_setup, task, refused=refused)
            if found is None:
                continue
            plan, backends = found
            why = plan.eligibility.check(conditions, runtimes, codecs, backends, plan.codec.name)
            if why is not None:
                self.ineligible_reasons.update(reason_kind(r) for r in why.split("; "))
                if fallback is None:
                    period = plan.selection_window_s + plan.round_deadline_s
                    wait = self.pacing.retry_after(now, plan.target, period)
                    fallback = wait_answer(wait, "ineligible")
                continue
            answer = self._isolated(
                task, self._policy(task).check_in, task, plan, who.device_id, now,
                refused=refused,
            )  # fmt: skip
            if answer is None:
                continue
            if answer["action"] != "wait":
                return answer
            if fallback is None or fallback["reason"] == "ineligible":
                fallback = answer
        if refused:
            # No task offered work, and one could not be asked (a lost connection): it may
            # have work for this device. A wait would send the device away for its pacing
            # (no_task_retry_s with no other task), past the round's window; 503 brings it
            # back after Retry-After, as for any call the store failed.
            raise refused[0]
        if fallback is None:
            fallback = wait_answer(self.pacing.idle(), "no_task")
        self.pacing.expect(who.device_id, now, fallback["retry_after_s"])
        return fallback

    def _task_setup(self, task: Task) -> tuple[TaskPlan, dict[str, Any]]:
        """A task's plan and its bundle's backends; a task whose stored plan no longer
        validates, or whose bundle is gone, cannot proceed."""
        plan = self._plan(task)
        manifest = self.ctx.manifest(task.bundle_id)
        if manifest is None:
            raise TaskFailure(f"bundle {task.bundle_id} is missing")
        return plan, manifest.get("backends", {})

    def _device_bundle(self, who: DeviceIdentity, bundle_id: str) -> dict[str, Any]:
        """A bundle's manifest, for a device of a population that has a task using it (to
        any other device it does not exist)."""
        if not any(t.bundle_id == bundle_id for t in self.store.list_tasks(who.population)):
            raise NotFound(f"no bundle {bundle_id!r}")
        return self._manifest(bundle_id)

    def _device_task(self, who: DeviceIdentity | None, task: Task) -> None:
        """Devices see only their population's tasks (operators, ``who=None``, see all)."""
        if who is not None and task.population != who.population:
            raise NotFound(f"no task {task.task_id!r}")

    def manifest(self, who: DeviceIdentity, bundle_id: str) -> dict[str, Any]:
        return self._device_bundle(who, bundle_id)

    def bundle_file(self, who: DeviceIdentity, bundle_id: str, name: str) -> Path:
        meta = self._device_bundle(who, bundle_id)["files"].get(name)
        if meta is None:
            raise NotFound(f"bundle {bundle_id} has no file {name!r}")
        return self.blobs.path(meta["sha256"])

    def version_params(self, who: DeviceIdentity | None, task_id: str, version: str) -> bytes:
        """A version's parameter frame (the bytes of :meth:`version_params_file`)."""
        return self.version_params_file(who, task_id, version).read_bytes()

    def version_params_file(
        self, who: DeviceIdentity | None, task_id: str, version: str
    ) -> Path:
        """The file holding a version's parameter frame: encoded on the first download of
        that version, then served from disk. What the HTTP layer then sends a device counts
        as the round's ``bytes_out`` (:meth:`parameters_sent`), an operator's read does not."""
        task = self._task(task_id)
        self._device_task(who, task)
        v = self._version(task, version)
        return self.ctx.versions.params_frame(v, self.ctx.num_parameters(task))

    def parameters_sent(self, task_id: str, nbytes: int) -> None:
        """Count ``nbytes`` of a parameter frame sent to a device in its task's ``bytes_out``:
        what was sent, not the file's size (nothing for a ``304``, the rest of the frame for
        a download resumed with ``Range``)."""
        self.ctx.bytes_out.add(task_id, nbytes)

    def _version(self, task: Task, version: str) -> Version:
        if version == "current":
            number = task.model_version
        elif not (version.isascii() and version.isdigit()) or len(version) > 12:
            raise InvalidRequest(f"version must be an integer or 'current', not {version!r}")
        else:
            number = int(version)
        v = self.store.get_version(task.task_id, number)
        if v is not None:
            return v
        if number < task.model_version:
            raise Gone(
                f"version {number} of task {task.task_id} was deleted by retention (the "
                f"coordinator keeps the last {self.config.retain_versions} versions and those "
                "that open work needs); download 'current'"
            )
        raise NotFound(f"task {task.task_id} has no version {number}")

    def upload(
        self,
        who: DeviceIdentity,
        assignment_id: str,
        idempotency_key: str | None,
        report_header: str | None,
        body: bytes,
    ) -> dict[str, Any]:
        """One upload made durable on its own. The HTTP layer's group commit runs the same
        steps (:meth:`admit_upload`, :meth:`stage_upload`, :meth:`install_uploads`,
        :meth:`accept_uploads`) with many uploads per batch."""
        return self.complete_upload(
            self.admit_upload(who, assignment_id, idempotency_key, report_header), body
        )

    def complete_upload(self, admitted: AdmittedUpload, body: bytes) -> dict[str, Any]:
        """The rest of :meth:`upload` for an upload :meth:`admit_upload` let in (its frame
        read since): its replay, or staged, installed and accepted on its own."""
        if admitted.replay is not None:
            return admitted.replay
        staged = self.stage_upload(admitted, body)
        self.install_uploads([staged])
        answer = self.accept_uploads([staged])[0]
        if isinstance(answer, ApiError):
            raise answer
        return answer

    def admit_upload(
        self,
        who: DeviceIdentity,
        assignment_id: str,
        idempotency_key: str | None,
        report_header: str | None,
    ) -> AdmittedUpload:
        """Every check of an upload that needs no payload; a repeat of an accepted upload
        gets its stored answer (``replay``)."""
        now = self._now()
        if not idempotency_key:
            idempotency_key = ""  # refused by _upload_checks, after the assignment's checks
        a, task, plan, prior = self._upload_checks(who, assignment_id, idempotency_key, now)
        if prior is not None:
            return AdmittedUpload(who, assignment_id, idempotency_key, {}, 0, None,
                                  replay=self._paced(who, task, now, prior))  # fmt: skip
        report = self._parse_report(report_header, plan)
        n = self.ctx.num_parameters(task)
        return AdmittedUpload(who, a.assignment_id, idempotency_key, report, n,
                              plan.max_update_norm, round_id=a.round_id,
                              task_id=a.task_id, codec=plan.codec)  # fmt: skip

    def _upload_checks(
        self, who: DeviceIdentity, assignment_id: str, idempotency_key: str, now: float
    ) -> tuple[Assignment, Task, TaskPlan, dict[str, Any] | None]:
        """The assignment, its task and plan, and the stored answer if this upload was
        accepted before (same key); raises what refuses it."""
        a = self._own_assignment(who, assignment_id)
        if a.action != "train":
            raise Conflict("this is an evaluation assignment: report metrics, not an update")
        if (
            not idempotency_key
            or len(idempotency_key) > MAX_IDEMPOTENCY_KEY
            or not (idempotency_key.isascii() and idempotency_key.isprintable())
        ):
            raise InvalidRequest(
                f"uploads need an Idempotency-Key header of 1..{MAX_IDEMPOTENCY_KEY} printable "
                "ASCII characters"
            )
        task = self._task(a.task_id)
        plan = self._task_step(task, self._plan, task)
        prior = self.store.get_update(a.assignment_id)
        if prior is not None:
            if hmac.compare_digest(prior.idempotency_key, idempotency_key):
                return a, task, plan, prior.response
            raise Conflict("this assignment already reported an update", ErrorCode.DUPLICATE_UPLOAD)
        if task.state == "failed":
            raise Conflict(f"task {task.task_id} failed: {task.failure}")
        self._policy(task).check_upload(task, plan, a, now)
        return a, task, plan, None

    def stage_upload(self, admitted: AdmittedUpload, body: bytes) -> StagedUpload:
        """Decode and check the frame and stage its payload (not durable yet). Touches no
        store or policy state: safe on any thread, several at once (numpy, hashing and file
        writes release the GIL)."""
        delta = decode_delta(body, admitted.num_parameters, admitted.max_norm, dtype=np.float32,
                             codec=admitted.codec)  # fmt: skip
        try:
            blob = self.blobs.stage(body)
        except OSError as e:  # a full disk: nothing written, nothing acknowledged
            raise self.storage_unavailable(e) from e
        return StagedUpload(admitted, delta, blob, len(body))

    def install_uploads(self, staged: Sequence[StagedUpload]) -> None:
        """Make the staged payloads durable together (one batch of fsyncs); a disk error
        refuses them all with ``503`` (no record names them: files renamed before the error
        stay, see :meth:`BlobStore.install`)."""
        try:
            self.blobs.install([s.blob for s in staged])
        except OSError as e:
            raise self.storage_unavailable(e) from e

    def storage_unavailable(self, e: Exception) -> Overloaded:
        """The ``503`` answering a call that a disk or the store's transient error stopped
        (nothing of it was done)."""
        log.warning("storage unavailable: %s", e)
        return Overloaded(
            f"storage unavailable ({type(e).__name__}: {e}); try again later",
            retry_after_s=max(1.0, self.config.tick_interval_s),
        )

    def accept_uploads(self, staged: Sequence[StagedUpload]) -> list[dict[str, Any] | ApiError]:
        """Store and fold uploads whose payloads :meth:`install_uploads` made durable, in
        one transaction; the answer (or refusal) of each, in order. Everything is checked
        again: the state may have moved since admission (another upload of the batch may
        even have been the same one's retry). A storage error refuses the whole batch with
        ``503``: nothing of it was stored, and what the policies folded in memory is
        dropped (rebuilt from the store). Files that one task's step could not write (its
        version, on a full disk) refuse that task's uploads only: the batch is made again
        without them (:meth:`_without_task`)."""
        now = self._now()
        done: list[tuple[Task, dict[str, Any]] | ApiError] = []
        tasks: dict[str, Task] = {}
        try:
            with self.ctx.deferring_deletes(), self.store.atomic():
                if self.replica is not None:
                    self._lock_rounds(staged)
                for s in staged:
                    try:
                        done.append(self._accept_staged(s, now, tasks))
                    except Overloaded as e:
                        cause = e.__cause__
                        if isinstance(cause, OSError) and not isinstance(
                            cause, self.store.transient_errors
                        ):
                            raise _TaskRefused(s.admitted.task_id, e) from e
                        raise
                    except ApiError as e:
                        done.append(e)
                if self.replica is not None:
                    # A stored update's payload name may be another process's, placed again
                    # after a delete and not yet synced: these acknowledgements must not
                    # depend on that process's sync (the blobs' locks are held to the commit).
                    self.blobs.sync_names(s.blob.sha for s, d in zip(staged, done, strict=True)
                                          if not isinstance(d, ApiError))  # fmt: skip
                    self.replica.flush()  # the partial sums folded, with their updates
        except Exception as e:
            if self.replica is not None:
                self.replica.discard()
            for task in tasks.values():
                self._policy(task).forget(task.task_id)
            if isinstance(e, _TaskRefused):
                return self._without_task(staged, e)
            if not isinstance(e, (Overloaded, OSError, *self.store.transient_errors)):
                raise
            refusal = e if isinstance(e, Overloaded) else self.storage_unavailable(e)
            return [refusal] * len(staged)
        # Durable now, and acknowledged whatever happens next: a commit that fails here
        # stays due and is retried by the next tick.
        self._drop_refused_payloads(staged, done)
        for task_id in tasks:
            self._advance(task_id, now)
        return [
            d if isinstance(d, ApiError) else self._acknowledged(s.admitted.who, d[0], now, d[1])
            for s, d in zip(staged, done, strict=True)
        ]

    def _without_task(
        self, staged: Sequence[StagedUpload], failed: _TaskRefused
    ) -> list[dict[str, Any] | ApiError]:
        """The batch, rolled back, made again without the uploads of the task whose files
        could not be written; those are answered its ``503``. Each pass leaves out one more
        task, so a disk that refuses every task's files ends the batch after one pass per
        task in it."""
        rest = [s for s in staged if s.admitted.task_id != failed.task_id]
        answers = iter(self.accept_uploads(rest) if rest else [])
        return [failed.refusal if s.admitted.task_id == failed.task_id else next(answers)
                for s in staged]  # fmt: skip

    def _lock_rounds(self, staged: Sequence[StagedUpload]) -> None:
        """Among replicas, before a batch stores anything: lock every round its uploads will
        lock, in round order, then its tasks' rows, in task-id order. Commits and closes
        keep that order (they hold their round, then update their task's row); opening a
        round takes only the task's row (the new round is its opener's until it commits).
        Locked upload by upload, batches would deadlock: one holding an older version's
        round and then the buffer round, another the two the other way round; or, at an
        async buffer's turn-over (no round open), each holding one task's row to open its
        next buffer and then wanting the other's, or one holding the row and then wanting
        the buffer round that another replica opened meanwhile and is committing.

        Once the rows are held, no other transaction can open a round of these tasks; a
        round one opened while this waited would be locked after a row, out of order: the
        locks are let go (a savepoint rolled back) and taken again, that round among them."""
        self._lock_in_order_retrying(
            {s.admitted.round_id: s.admitted.task_id for s in staged},
            sorted({s.admitted.task_id for s in staged}),
            claiming=True,
        )

    def _lock_in_order_retrying(
        self, assigned: dict[int, str], task_ids: list[str], *, claiming: bool = False
    ) -> None:
        """``assigned`` rounds (of their tasks) and the tasks' open rounds, then the tasks'
        rows (see :meth:`_lock_rounds`), taken again if a round opened meanwhile. With
        ``claiming``, a round another replica is closing refuses its task's uploads at once
        (:meth:`Store.claim_round`) rather than stopping this replica's one worker thread
        for the length of the close."""
        for _ in range(LOCK_TRIES):
            try:
                with self.store.atomic():
                    self._lock_in_order(assigned, task_ids, claiming)
                return
            except _RoundOpened:
                continue
        raise Overloaded("buffer rounds are turning over; try again", 1.0)

    def _lock_in_order(self, assigned: dict[int, str], task_ids: list[str], claiming: bool) -> None:
        current = {t: self.store.open_round(t) for t in task_ids}
        rounds = {**assigned, **{r.round_id: t for t, r in current.items() if r is not None}}
        for round_id in sorted(rounds) if claiming else ():
            if not self.store.claim_round(round_id):
                raise _TaskRefused(rounds[round_id], Overloaded(
                    "the round is being closed by another replica; try again", 1.0
                ))  # fmt: skip
        locked = {round_id: self.store.lock_round(round_id) for round_id in sorted(rounds)}
        for task_id in task_ids:
            self.store.lock_task(task_id)
        for task_id, rnd in current.items():
            held = None if rnd is None else locked[rnd.round_id]
            if held is not None and held.is_open:
                continue  # it cannot close now, and no other round opens while it is open
            found = self.store.open_round(task_id)
            if found is not None and found.round_id not in rounds:
                raise _RoundOpened

    def _drop_refused_payloads(
        self, staged: Sequence[StagedUpload], done: Sequence[object]
    ) -> None:
        """Delete the payloads installed for uploads the batch then refused (409, 422), now
        that the batch's rows are committed, rather than at the next start-up sweep. Blobs
        are content-addressed: bytes that any record needs (another device's identical
        update, stored in this batch or before; a version; a bundle file) stay, and so do
        bytes the next batch is installing anew (identical, and wanted there). An upload
        answered ``Overloaded`` was not refused for its bytes: they were gone already, or
        the next batch's."""
        checked: set[str] = set()
        for s, d in zip(staged, done, strict=True):
            sha = s.blob.sha
            if not isinstance(d, ApiError) or isinstance(d, Overloaded) or sha in checked:
                continue
            if self.blobs.installing(sha):
                continue
            checked.add(sha)
            try:
                delete_unneeded(self.blobs, self.store, [sha], self.store.blob_referenced)
            except Exception as e:  # the answers stand; the start-up sweep removes it
                log.warning("uploads: refused payload %s not deleted: %s", sha, e)

    def _accept_staged(
        self, s: StagedUpload, now: float, tasks: dict[str, Task]
    ) -> tuple[Task, dict[str, Any]] | ApiError:
        ad = s.admitted
        if self.replica is not None:
            # Its round's lock (as a close takes it, before any assignment's row): the same
            # upload retried on another replica waits for this transaction, then finds it
            # stored (a replay).
            self.store.lock_round_of(ad.assignment_id)
        a, task, plan, prior = self._upload_checks(ad.who, ad.assignment_id,
                                                   ad.idempotency_key, now)  # fmt: skip
        if prior is not None:
            return task, prior
        if not held(self.store, self.blobs, [s.blob.sha]):
            # Deleted since it was installed (retention, an identical payload of a closed
            # round or of an upload the batch before refused, committed while this batch
            # installed): this one is not stored, the others go on.
            return Overloaded("the payload was not stored; upload it again", 1.0)
        tasks[task.task_id] = task
        response = self._receipt(a)
        update = Update(
            assignment_id=a.assignment_id,
            round_id=a.round_id,
            task_id=a.task_id,
            device_id=a.device_id,
            idempotency_key=ad.idempotency_key,
            payload_sha=s.blob.sha,
            payload_bytes=s.payload_bytes,
            num_examples=ad.report["num_examples"],
            loss=ad.report.get("loss"),
            report=ad.report,
            accepted_at=now,
            response=response,
        )
        self._task_step(task, self._policy(task).accept_update, task, plan, update, s.delta, now)
        return task, response

    def _advance(self, task_id: str, now: float) -> None:
        """Whatever a report made due (a commit), isolated from the report's answer: the
        report is durable, so nothing here may turn its answer into an error. On any error
        the task's policy drops what it holds (rebuilt from the store) and the next tick
        makes the commit."""
        try:
            task = self.store.get_task(task_id)
            if task is not None and task.state != "failed":
                self._isolated(task, self._tick_task, task, now)
        except Exception:
            log.exception("task %s: the commit after a report failed; left to the tick", task_id)
            for policy in self.policies.values():
                policy.forget(task_id)

    def _acknowledged(
        self, who: DeviceIdentity, task: Task, now: float, answer: dict[str, Any]
    ) -> dict[str, Any]:
        """:meth:`_paced` for an answer whose report is durable: if pacing fails, the device
        still hears that it was accepted, told to come back after the shortest wait."""
        try:
            return self._paced(who, task, now, answer)
        except Exception:
            log.exception("task %s: pacing an acknowledged report failed", task.task_id)
            return {**answer, "retry_after_s": self.config.pacing.min_retry_s}

    def _parse_report(self, header: str | None, plan: TaskPlan) -> dict[str, Any]:
        if not header:
            raise InvalidRequest("uploads need an X-Fedge-Report header (JSON)")
        f = Fields(parse_json(header.encode("utf-8", "replace")), "X-Fedge-Report")
        report = {
            "num_examples": f.integer("num_examples", None, minimum=1),
            "loss": f.number("loss", None, minimum=-MAX_LOSS, maximum=MAX_LOSS),
            "accuracy": f.number("accuracy", None, minimum=0.0, maximum=1.0),
            "steps": f.integer("steps", None, minimum=0, maximum=MAX_REPORTED_COUNT),
            "wall_time_s": f.number("wall_time_s", None, minimum=0.0),
            "bytes_down": f.integer("bytes_down", None, minimum=0, maximum=MAX_REPORTED_COUNT),
        }
        f.done()
        if report["num_examples"] is None:
            raise InvalidRequest("X-Fedge-Report.num_examples is required")
        _check_examples(report["num_examples"], plan)
        return {k: v for k, v in report.items() if v is not None}

    def report_metrics(
        self, who: DeviceIdentity, assignment_id: str, body: bytes
    ) -> dict[str, Any]:
        now = self._now()
        a = self._own_assignment(who, assignment_id)
        f = Fields(parse_json(body), "body")
        num_examples = f.integer("num_examples", None, minimum=1)
        loss = f.number("loss", None, minimum=-MAX_LOSS, maximum=MAX_LOSS)
        accuracy = f.number("accuracy", None, minimum=0.0, maximum=1.0)
        f.done()
        if num_examples is None or loss is None:
            raise InvalidRequest("body needs num_examples and loss")
        if a.action != "evaluate":
            raise Conflict("this is a training assignment: upload an update, not metrics")
        task = self._task(a.task_id)
        plan = self._task_step(task, self._plan, task)
        prior = self.store.get_eval_report(a.assignment_id)
        if prior is not None:
            if prior.same_figures(num_examples, loss, accuracy):
                return self._paced(who, task, now, prior.response)
            raise Conflict("this assignment already reported", ErrorCode.DUPLICATE_UPLOAD)
        if task.state == "failed":
            raise Conflict(f"task {task.task_id} failed: {task.failure}")
        self._policy(task).check_upload(task, plan, a, now)
        _check_examples(num_examples, plan)
        response = self._receipt(a)
        report = EvalReport(
            a.assignment_id,
            a.round_id,
            a.task_id,
            a.device_id,
            num_examples,
            loss,
            accuracy,
            now,
            response,
        )
        self._task_step(task, self._policy(task).accept_eval, task, plan, report, now)
        self._advance(task.task_id, now)
        return self._acknowledged(who, task, now, response)

    def abort(self, who: DeviceIdentity, assignment_id: str, body: bytes) -> dict[str, Any]:
        now = self._now()
        a = self._own_assignment(who, assignment_id)
        f = _fields_or_empty(body)
        reason = f.string("reason", "error", choices=ABORT_REASONS)
        message = f.string("message", None, max_len=1024)
        # The device's failure phase and code (enumerations: the funnel's figures, no text).
        phase = f.string("phase", None, choices=tuple(p.value for p in FailurePhase))
        code = f.string("code", None, choices=tuple(c.value for c in DeviceErrorCode))
        f.done()
        task = self._task(a.task_id)
        note = reason if phase is None else f"{reason} [{phase}/{code or 'other'}]"
        note = note if message is None else f"{note}: {message}"
        # Only from in flight: among replicas, another may have reported or expired it since
        # it was read; then the answer is that state's, as if read now.
        if a.state in IN_FLIGHT and self.store.update_assignment(
            a.assignment_id, only_from=IN_FLIGHT, state="aborted", closed_at=now,
            abort_reason=note,
        ):  # fmt: skip
            return self._paced(who, task, now, {"aborted": True})
        state = a.state
        if state in IN_FLIGHT:
            state = self._own_assignment(who, a.assignment_id).state
        if state == "aborted":
            return self._paced(who, task, now, {"aborted": True})
        if state == "expired":
            # Its round closed (or its deadline passed) first: there is no slot left to free.
            raise Conflict("the assignment's round has closed", ErrorCode.ROUND_CLOSED)
        raise Conflict(f"assignment is {state}; it can no longer be aborted")

    # -- operator calls ---------------------------------------------------------------------

    def add_bundle(self, body: bytes) -> dict[str, Any]:
        if not body:
            raise InvalidRequest("body must be an uncompressed tar of a bundle directory")
        manifest = extract_bundle(body, self.blobs)
        with self.store.atomic():
            if not held(self.store, self.blobs, (m["sha256"] for m in manifest["files"].values())):
                raise Overloaded("a file of the bundle was deleted meanwhile; upload it again", 1.0)
            created = self.store.add_bundle(manifest["bundle_id"], manifest, self.clock.now())
        return {
            "bundle_id": manifest["bundle_id"],
            "num_parameters": int(manifest["num_parameters"]),
            "created": created,
        }

    def create_task(self, body: bytes) -> dict[str, Any]:
        f = Fields(parse_json(body), "body")
        name = f.string("name", "task", max_len=128)
        bundle_id = f.string("bundle_id", None, max_len=128)
        mode = f.string("mode", "sync", max_len=32)
        population = f.string("population", "default", max_len=64)
        plan_raw = f.raw("plan")
        f.done()
        if bundle_id is None:
            raise InvalidRequest("body.bundle_id is required")
        if mode not in self.policies:
            raise InvalidRequest(
                f"mode {mode!r} is not available; this coordinator runs: {', '.join(self.policies)}"
            )
        plan = TaskPlan.from_json(plan_raw)
        plan.check_mode(mode)
        manifest = self._manifest(bundle_id)
        if not plan.eligibility.usable_runtimes(manifest.get("backends", {})):
            raise InvalidRequest("no runtime the plan allows is supported by the bundle")
        now = self.clock.now()
        params_meta = manifest["files"][initial_params_name(manifest)]
        task = Task(
            task_id="t-" + secrets.token_hex(8),
            name=name,
            bundle_id=bundle_id,
            mode=mode,
            population=population,
            plan=plan.to_json(),
            state="running",
            model_version=0,
            rounds_completed=0,
            pending_evaluations=0,
            created_at=now,
        )
        with self.store.atomic():
            self.store.add_task(task)
            self.store.add_version(Version(task.task_id, 0, params_meta["sha256"], None, None, now))
            # The answer is read before the commit: a lost connection after it would answer
            # 503 ("nothing done, try again") for a task that exists, and the retry would
            # create a second one training the same model.
            return self.task_json(task)

    def task_json(self, task: Task) -> dict[str, Any]:
        rnd = self.store.open_round(task.task_id)
        return {
            "task_id": task.task_id,
            "name": task.name,
            "bundle_id": task.bundle_id,
            "mode": task.mode,
            "population": task.population,
            "state": task.state,
            "model_version": task.model_version,
            "rounds_completed": task.rounds_completed,
            "pending_evaluations": task.pending_evaluations,
            "created_at": task.created_at,
            "plan": task.plan,
            "current_round": None if rnd is None else self._round_json(rnd),
            "failure": task.failure,
            **self._privacy(task),
        }

    def _privacy(self, task: Task) -> dict[str, Any]:
        """A DP task's ``epsilon`` spent so far and ``privacy`` (:func:`coordinator.privacy.
        privacy_json`); nothing for other tasks."""
        if "dp" not in task.plan:
            return {}
        from coordinator.privacy import privacy_json  # the privacy extra: DP plans need it

        rounds = self.store.list_rounds(task.task_id, max(0, task.model_version - 1))
        out = privacy_json([r.metrics for r in rounds if not r.is_open])
        return {"epsilon": out["epsilon"], "privacy": out}

    @staticmethod
    def _round_json(rnd: Round) -> dict[str, Any]:
        return {
            "round": rnd.number,
            "kind": rnd.kind,
            "state": rnd.state,
            "base_version": rnd.base_version,
            "goal": rnd.goal,
            "target": rnd.target,
            "min_reports": rnd.min_reports,
            "opened_at": rnd.opened_at,
            "window_ends_at": rnd.window_ends_at,
            "selected_at": rnd.selected_at,
            "deadline_at": rnd.deadline_at,
            "closed_at": rnd.closed_at,
            "metrics": rnd.metrics,
        }

    def list_tasks(self) -> dict[str, Any]:
        self._now()
        return {"tasks": [self.task_json(t) for t in self.store.list_tasks()]}

    def get_task(self, task_id: str) -> dict[str, Any]:
        self._now()
        return self.task_json(self._task(task_id))

    def set_paused(self, task_id: str, paused: bool) -> dict[str, Any]:
        task = self._task(task_id)
        # Outside the transaction: a plan that cannot be read fails the task, which stays.
        rounds = self._task_step(task, self._plan, task).rounds
        want_from, to = ("running", "paused") if paused else ("paused", "running")
        # Read under the task's lock: among replicas another may be committing the task's
        # last round (completed must not turn paused).
        with self.store.atomic():
            task = self.store.lock_task(task_id) or task
            if task.state != want_from:
                raise Conflict(f"task is {task.state}; only a {want_from} task can be made {to}")
            if not paused and task.rounds_completed >= rounds:
                to = "completed"  # paused during its last round by an older coordinator
            self.store.update_task(task_id, state=to)
            # The answer is read before the commit (as create_task's): a connection lost
            # after it would answer 503 for a change that was made, and the retry 409.
            return self.task_json(self._task(task_id))

    def rounds(self, task_id: str) -> dict[str, Any]:
        self._now()
        self._task(task_id)
        return {"rounds": [self._round_json(r) for r in self.store.list_rounds(task_id)]}

    def schedule_evaluation(self, task_id: str, body: bytes) -> dict[str, Any]:
        task = self._task(task_id)
        f = _fields_or_empty(body)
        f.done()
        if task.mode == "async":
            raise Conflict("async tasks run no evaluation rounds")
        if "dp" in task.plan:
            # Their metrics come from device data un-noised: the ledger would not cover them.
            raise Conflict(
                "a DP task runs no evaluation rounds: their loss and accuracy are released "
                "without noise, which the task's privacy ledger does not account for "
                "(evaluate a downloaded version on data of your own)"
            )
        # Counted under the task's lock: among replicas another may count one at once, or
        # close an evaluation round and count it down.
        with self.store.atomic():
            fresh = self.store.lock_task(task_id) or task
            if fresh.state == "failed":
                # A failed task opens no round of any kind (check-ins and ticks pass it by):
                # the evaluation asked for would never run.
                raise Conflict(f"task failed ({fresh.failure}): it runs no evaluation rounds")
            pending = fresh.pending_evaluations + 1
            self.store.update_task(task_id, pending_evaluations=pending)
        return {"task_id": task_id, "pending_evaluations": pending}

    def task_bundle(self, task_id: str) -> bytes:
        task = self._task(task_id)
        manifest = self._manifest(task.bundle_id)
        v = self.store.get_version(task_id, task.model_version)
        assert v is not None
        out = version_manifest(
            manifest, task_id, task.model_version, v.params_sha, self.blobs.size(v.params_sha)
        )
        return bundle_tar(out, self.blobs)

    def status(self) -> dict[str, Any]:
        self._now()
        tasks = self.store.list_tasks()
        latest = tasks[-1] if tasks else None
        return {
            "model_version": latest.model_version if latest else 0,
            "rounds_completed": latest.rounds_completed if latest else 0,
            "updates_accepted": self.store.count_accepted_updates(),
            "devices_registered": self.store.count_devices(),
            "tasks": [
                {
                    "task_id": t.task_id,
                    "name": t.name,
                    "state": t.state,
                    "mode": t.mode,
                    "model_version": t.model_version,
                    "rounds_completed": t.rounds_completed,
                    "failure": t.failure,
                    **self._privacy(t),
                }
                for t in tasks
            ],
        }
