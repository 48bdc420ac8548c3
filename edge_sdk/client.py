"""The device client: check in when the device allows it, train the task, upload the delta.

One :meth:`Client.run_once` is one pass of the device's loop::

    read conditions ──ineligible──▶ Outcome("ineligible"), no network at all
        │ eligible
    register (first time only; credential kept in the state dir, mode 0600)
    check in ──wait──▶ Outcome("wait", next_run_in_s = retry_after_s + up to 10 % jitter)
        │ train / evaluate
    bundle (cache: sha256-verified, resumable) + the version's parameters
    train the plan, re-checking conditions ──lapsed──▶ POST abort, Outcome("aborted")
    delta = new - start, encode with the plan's codec (error-feedback residual in the state dir)
    persist the pending upload (frame, key, new residual), then upload with its Idempotency-Key
    (retried) ──▶ Outcome("trained") or Outcome("rejected")

An upload whose answer never arrived (the network, a crash) stays pending in the state dir and
is sent again, same bytes and key, at the start of the next pass, before any check-in: the
coordinator answers a repeat with its stored answer, so the update counts once and the
error-feedback residual moves on exactly once (see :mod:`edge_sdk.state`).

After an accepted report or an abort the coordinator's answer carries ``retry_after_s`` too
(pace steering): the next wait is that plus jitter; the local defaults (``after_assignment_s``,
``ineligible_recheck_s``) only stand in when an answer lacks it. A pass that failed on
``503 overloaded`` waits at least the ``Retry-After`` of that answer. A wait a coordinator
asks for is capped at ``MAX_ASKED_WAIT_S`` (a day).

:meth:`Client.run_forever` repeats it, sleeping ``next_run_in_s`` in between (pace steering).
:class:`AsyncClient` adds ``await run_once_async()`` / ``run_forever_async()`` for apps with
an event loop; the blocking work (HTTP, training) runs in a worker thread via
:func:`asyncio.to_thread`, so the loop stays responsive.

For running many clients in one process (the fleet emulator): pass one :class:`BundleCache`
and one :class:`TrainerPool` to all of them, and an injected ``clock``/``sleep``. A client
itself holds its transport (one idle keep-alive socket), its data and a few small objects.

Usage::

    client = Client("http://coordinator:8080", state_dir="~/.fedge", data=(x, y),
                    conditions=default_provider())
    client.run_forever()
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import platform
import random
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk.bundle import BundleError, Manifest
from edge_sdk.cache import BundleCache
from edge_sdk.codecs import CODECS, decode_update, encode_update
from edge_sdk.conditions import ConditionsProvider, DeviceConditions, EligibilityPolicy
from edge_sdk.data import Dataset, as_dataset
from edge_sdk.dp import clip_to_norm, plan_clip
from edge_sdk.errors import (
    ApiError,
    CacheError,
    ClientError,
    ConditionsLapsed,
    Conflict,
    DuplicateUpload,
    Overloaded,
    TransportError,
    Unauthorized,
)
from edge_sdk.frame import FrameError
from edge_sdk.local_training import LocalLayers, Plan, PlanError, evaluate, train
from edge_sdk.pool import TrainerPool, TrainerSource
from edge_sdk.protocol import (
    API_PREFIX,
    FRAME_CONTENT_TYPE,
    HEADER_ENROLLMENT,
    HEADER_IDEMPOTENCY_KEY,
    HEADER_REPORT,
    SAFE_ID,
    DeviceErrorCode,
    ErrorCode,
    FailurePhase,
    Route,
)
from edge_sdk.state import Credentials, DeviceState, PendingUpload
from edge_sdk.tls import TlsConfig
from edge_sdk.trainers import BACKENDS
from edge_sdk.trainers.base import BundleNotSupported
from edge_sdk.transport import RetryPolicy, Transport, doubling_backoff

if TYPE_CHECKING:
    import asyncio

__all__ = ["AsyncClient", "Client", "ClientConfig", "Outcome"]

log = logging.getLogger(__name__)

# What one run_once ended with.
INELIGIBLE = "ineligible"  # the local policy said no; the coordinator was not contacted
WAIT = "wait"  # the coordinator said come back later
TRAINED = "trained"  # the update was accepted
EVALUATED = "evaluated"  # evaluation metrics were accepted
ABORTED = "aborted"  # conditions lapsed during training; the coordinator was told
REJECTED = "rejected"  # the coordinator refused the upload (late, stale, bad update)
FAILED = "failed"  # network or local error; retried after a growing backoff
ACTIONS = (INELIGIBLE, WAIT, TRAINED, EVALUATED, ABORTED, REJECTED, FAILED)

# A device secret: visible ASCII, what a header value carries unchanged.
_SECRET = re.compile(r"^[!-~]{1,512}$")

# The longest wait a coordinator's answer sets (its pacing stays within max_retry_s, an hour
# by default). A larger one is a mistake (a wrong unit, a broken coordinator): past about
# 292 years time.sleep and threading.Event.wait raise OverflowError, which would end
# run_forever, and well before that the device would be lost to the fleet.
MAX_ASKED_WAIT_S = 24 * 3600.0


@dataclass(frozen=True)
class ClientConfig:
    population: str = "default"
    backend: str | None = None  # None: the best installed backend the bundle supports
    ineligible_recheck_s: float = 300.0  # how soon to look at conditions again when ineligible
    after_assignment_s: float = 1.0  # check in again this soon after a finished assignment
    failure_backoff_s: float = 30.0  # first wait after a failed run; doubles, capped below
    max_failure_backoff_s: float = 3600.0
    checkin_jitter: float = 0.1  # fraction added on top of every wait (protocol: up to 10 %)
    request_timeout_s: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    seed: int | None = None  # shuffling, stochastic rounding and jitter; None: fresh entropy
    enrollment_token: str | None = None  # sent on registration (coordinators require one)
    tls: TlsConfig = field(default_factory=TlsConfig)  # CA bundle and key pin for https URLs

    def __post_init__(self) -> None:
        # Any other name registers the device with a runtime no task asks for: it would be
        # told to wait (ineligible) for as long as it runs, uploading nothing.
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")


@dataclass(frozen=True)
class Outcome:
    action: str  # one of ACTIONS
    next_run_in_s: float  # when the device should call run_once again
    assignment_id: str | None = None
    task_id: str | None = None
    round: int | None = None
    reasons: tuple[str, ...] = ()  # ineligibility / wait / abort reasons
    metrics: dict[str, Any] = field(default_factory=dict)  # the report that was sent
    error: str | None = None  # error code or message for rejected / failed


def _platform_name() -> str:
    if hasattr(sys, "getandroidapilevel") or "ANDROID_ROOT" in os.environ:
        return "android"
    return sys.platform


def _conditions_json(c: DeviceConditions) -> dict[str, Any]:
    return {k: v for k, v in c.to_json().items() if v is not None}


class Client:
    """A device's federated-learning client. One per device (state directory).

    ``coordinator``: base URL. ``state_dir``: where the credential and residuals live.
    ``data`` / ``eval_data``: the app's examples (a :class:`~edge_sdk.data.Dataset`, ``(x, y)``
    or an ``.npz`` path). ``conditions``: a provider such as
    :func:`~edge_sdk.conditions.default_provider` or ``ScriptedConditions``; ``policy``: the
    local eligibility rule (default: idle, charging, unmetered). ``cache`` and ``trainers``
    may be shared between clients of one process; ``clock`` (for ``wall_time_s``) and ``sleep``
    (retry backoff, :meth:`run_forever`) may be virtual; ``transport`` replaces the HTTP layer
    (a :class:`Transport` subclass, e.g. one that also models link speed).
    """

    def __init__(
        self,
        coordinator: str,
        *,
        state_dir: Path | str,
        data: Dataset | tuple[np.ndarray, np.ndarray] | Path | str,
        conditions: ConditionsProvider,
        policy: EligibilityPolicy | None = None,
        eval_data: Dataset | tuple[np.ndarray, np.ndarray] | Path | str | None = None,
        config: ClientConfig | None = None,
        cache: BundleCache | None = None,
        trainers: TrainerSource | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        transport: Transport | None = None,
    ) -> None:
        self.config = config or ClientConfig()
        self.state = DeviceState(Path(state_dir).expanduser())
        self.data = as_dataset(data)
        self.eval_data = self.data if eval_data is None else as_dataset(eval_data)
        self.conditions = conditions
        self.policy = policy or EligibilityPolicy()
        self.cache = cache or BundleCache(self.state.root / "bundles")
        self.trainers = trainers or TrainerPool(self.config.backend)
        self._clock = clock
        self._sleep = sleep
        seed = self.config.seed
        self._rng = random.Random(seed)
        self._np_rng = np.random.default_rng(seed)
        self.transport = transport or Transport(
            coordinator,
            timeout=self.config.request_timeout_s,
            retry=self.config.retry,
            sleep=sleep,
            rng=self._rng,
            tls=self.config.tls,
        )
        self._failures = 0
        self._busy = threading.Lock()
        # The step an assignment is in, for the abort's phase (one pass at a time: _busy).
        self._phase = FailurePhase.DOWNLOAD
        # Uploads whose acknowledgement came to a resend on a later pass: that pass's outcome
        # is about its own check-in, so counters of acknowledged uploads need this too.
        self.acknowledged_on_resend = 0

    @property
    def device_id(self) -> str | None:
        creds = self.transport.credentials
        return creds[0] if creds else None

    # -- the loop -----------------------------------------------------------------------------

    def run_once(self) -> Outcome:
        """One pass: conditions, check-in, and the assignment if there is one. Never raises for
        network or coordinator trouble: those come back as ``Outcome("failed")``."""
        with self._busy:
            try:
                outcome = self._run_once()
            except (ClientError, OSError, ValueError) as e:
                log.warning("run failed: %s", e)
                outcome = self._failed(e)
            except (KeyError, TypeError, OverflowError) as e:
                # A coordinator answer without the fields the protocol promises, or with a
                # number no float holds (1e400 decodes to inf, and int() of it overflows).
                log.warning("run failed on a malformed answer", exc_info=True)
                outcome = self._failed(e)
            else:
                if outcome.action != FAILED:
                    self._failures = 0
            finally:
                # Waits between passes last seconds to hours: holding a socket open that long
                # only invites a stale connection (and costs the fleet emulator a descriptor
                # per client). Within a pass the connection is kept alive.
                self.transport.close()
            return outcome

    def run_forever(
        self,
        stop: threading.Event | Callable[[], bool] | None = None,
        *,
        max_runs: int | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> int:
        """Call :meth:`run_once` until ``stop`` is set (or ``max_runs`` runs); returns the runs.

        With a :class:`threading.Event` as ``stop`` and the default ``sleep``, setting the event
        ends a wait at once; with an injected ``sleep`` the wait goes through it.
        """
        runs = 0
        while not _stopped(stop) and (max_runs is None or runs < max_runs):
            outcome = self.run_once()
            runs += 1
            if on_outcome is not None:
                on_outcome(outcome)
            if max_runs is not None and runs >= max_runs:
                break
            if isinstance(stop, threading.Event) and self._sleep is time.sleep:
                stop.wait(outcome.next_run_in_s)
            else:
                self._sleep(outcome.next_run_in_s)
        return runs

    def close(self) -> None:
        self.transport.close()

    # -- steps --------------------------------------------------------------------------------

    def _jittered(self, seconds: float) -> float:
        return max(0.0, seconds) * (1.0 + self.config.checkin_jitter * self._rng.random())

    def _paced(self, answer: Any, default: float) -> float:
        """The jittered wait the coordinator asked for in ``answer``, else ``default``.

        Lenient, unlike a check-in's ``wait``: the report was accepted, and a missing or
        malformed hint (an older coordinator) must not turn that into a failed pass."""
        asked = answer.get("retry_after_s") if isinstance(answer, dict) else None
        if isinstance(asked, (int, float)):
            # float() of an integer too large for a float raises OverflowError: malformed too
            with contextlib.suppress(OverflowError):
                if math.isfinite(seconds := float(asked)):
                    return self._jittered(min(seconds, MAX_ASKED_WAIT_S))
        return self._jittered(default)

    def _failed(self, error: BaseException) -> Outcome:
        self._failures += 1
        backoff = doubling_backoff(
            self.config.failure_backoff_s, self._failures, self.config.max_failure_backoff_s
        )
        if isinstance(error, Overloaded) and error.retry_after_s is not None:
            # Pace steering: the coordinator said when to come back, longer than one request
            # may wait (RetryPolicy.max_delay_s and its budget); coming back sooner only adds to
            # the load it is shedding.
            backoff = max(backoff, min(error.retry_after_s, self.config.max_failure_backoff_s))
        code = getattr(error, "code", None)
        return Outcome(FAILED, self._jittered(backoff), error=code or f"{error}")

    def eligibility(self) -> tuple[DeviceConditions, tuple[str, ...]]:
        """The device's conditions now and why it is not eligible (empty when it is)."""
        conditions = self.conditions.read()
        ok, reasons = self.policy.check(conditions)
        return conditions, () if ok else tuple(reasons)

    def _run_once(self) -> Outcome:
        conditions, reasons = self.eligibility()
        if reasons:
            return Outcome(INELIGIBLE, self._jittered(self.config.ineligible_recheck_s),
                           reasons=reasons)
        self._ensure_registered()
        self._resolve_pending()
        body = {
            "population": self.config.population,
            "runtimes": self._runtimes,
            "conditions": _conditions_json(conditions),
            "capabilities": {"codecs": list(CODECS)},
        }
        try:
            answer = self.transport.call("POST", Route.CHECKIN, body)
        except Unauthorized as e:
            if e.code != ErrorCode.UNAUTHORIZED.value:
                # Not the coordinator's answer (a proxy's or a gateway's 401 page): dropping
                # the identity for it would orphan the device's history and any pending upload.
                raise
            # The coordinator no longer knows this credential (its database was reset): the
            # device registers again instead of failing forever.
            self.state.forget_credentials()
            self.transport.credentials = None
            self._ensure_registered()
            answer = self.transport.call("POST", Route.CHECKIN, body)
        action = answer.get("action") if isinstance(answer, dict) else None
        if action == "wait":
            retry_after_s = float(answer.get("retry_after_s", 60.0))
            # A device told to wait forever never returns; one told a negative wait would
            # check in again at once, pass after pass, against a coordinator already saying no.
            if not math.isfinite(retry_after_s) or retry_after_s < 0:
                raise TransportError(f"check-in answer's retry_after_s is {retry_after_s}")
            return Outcome(WAIT, self._jittered(min(retry_after_s, MAX_ASKED_WAIT_S)),
                           reasons=(str(answer.get("reason", "")),))
        if action in ("train", "evaluate"):
            assignment = answer.get("assignment")
            if not isinstance(assignment, dict):
                raise TransportError(f"check-in answer lacks an assignment: {answer!r}")
            return self._assignment(action, assignment)
        raise TransportError(f"unknown check-in answer {answer!r}")

    def _ensure_registered(self) -> None:
        if self.transport.credentials is not None:
            return
        url = self.transport.base_url
        creds = self.state.load_credentials(url)
        if creds is None:
            answer = self.transport.call(
                "POST",
                Route.REGISTER,
                {
                    "platform": _platform_name(),
                    "arch": platform.machine(),
                    "runtimes": self._runtimes,
                    "population": self.config.population,
                },
                headers=None
                if self.config.enrollment_token is None
                else {HEADER_ENROLLMENT: self.config.enrollment_token},
            )
            creds = Credentials(url, str(answer["device_id"]), str(answer["secret"]))
            if not SAFE_ID.match(creds.device_id) or not _SECRET.match(creds.secret):
                # Stored, it could never be sent (every later pass would fail before reaching
                # the coordinator, with no 401 to make the device register again).
                raise TransportError("registration answer's device id or secret cannot be "
                                     "sent in an Authorization header")
            self.state.save_credentials(creds)
        self.transport.credentials = (creds.device_id, creds.secret)

    @functools.cached_property
    def _runtimes(self) -> list[str]:
        # Once per client: finding the installed runtimes scans the install (about 1 ms), too
        # much for every check-in of a fleet of clients, and it does not change while we run.
        if self.config.backend is not None:
            return [self.config.backend]
        from edge_sdk.trainers import available_backends

        return list(available_backends())

    def _assignment(self, action: str, a: dict[str, Any]) -> Outcome:
        assignment_id = str(a["assignment_id"])
        if not SAFE_ID.match(assignment_id):
            # Refused before any work: an upload kept pending for it could never be sent,
            # and a pending upload is resent before every check-in.
            raise TransportError(f"assignment id {assignment_id!r} is not a protocol id")
        ids: dict[str, Any] = {"assignment_id": assignment_id, "task_id": str(a["task_id"]),
                               "round": int(a["round"])}
        down0 = self.transport.bytes_received
        started = self._clock()
        params_url = str(a["params_url"])
        if not params_url.startswith(API_PREFIX + "/"):
            raise TransportError(f"assignment's params_url {params_url!r} is not an API path")
        self._phase = FailurePhase.DOWNLOAD
        try:
            bundle_dir, manifest = self.cache.fetch(self.transport, str(a["bundle_id"]))
            params = decode_update(
                self.transport.request("GET", params_url).body,
                expected_length=manifest.num_parameters,
            )
            if action == "evaluate":
                return self._evaluate(ids, bundle_dir, manifest, params)
            return self._train(ids, a, bundle_dir, manifest, params, started, down0)
        except ConditionsLapsed as e:
            answer = self._abort(assignment_id, "conditions_lapsed",
                                 FailurePhase.CONDITIONS_LAPSED, DeviceErrorCode.CONDITIONS)
            return Outcome(ABORTED, self._paced(answer, self.config.ineligible_recheck_s),
                           reasons=e.reasons, **ids)
        except (TransportError, ApiError) as e:
            # The coordinator is unreachable or refused. A failed download is still worth
            # one try at telling it (the funnel's download stage); an upload never: it stays
            # pending and is sent again.
            if self._phase is FailurePhase.DOWNLOAD and not isinstance(e, Unauthorized):
                self._abort(assignment_id, "error", FailurePhase.DOWNLOAD, failure_code(e))
            raise
        except Exception as e:
            # A local failure (bad plan, broken bundle, runtime error): free the slot for
            # someone else instead of letting the round wait for the deadline.
            log.exception("assignment %s failed on the device", assignment_id)
            self._abort(assignment_id, "error", self._phase, failure_code(e))
            outcome = self._failed(e)
            return Outcome(FAILED, outcome.next_run_in_s, error=outcome.error, **ids)

    def _train(
        self,
        ids: dict[str, Any],
        a: dict[str, Any],
        bundle_dir: Path,
        manifest: Manifest,
        params: np.ndarray,
        started: float,
        down0: int,
    ) -> Outcome:
        plan = Plan.from_json(a.get("plan"))
        self._phase = FailurePhase.RUNTIME_LOAD
        with self.trainers.lease(bundle_dir, manifest) as trainer:
            self._phase = FailurePhase.TRAINING
            result = train(
                trainer,
                self.data,
                plan,
                params,
                round_=ids["round"],
                rng=self._np_rng,
                recheck=lambda: self.eligibility()[1],
                local=LocalLayers.for_task(self.state.root, ids["task_id"]),
            )
            delta = trainer.get_parameters() - params
        clip = plan_clip(a.get("plan"))
        if clip is not None:  # DP-FedAvg: bound what this update can say before encoding it
            delta = clip_to_norm(delta, clip)
        self._phase = FailurePhase.UPLOAD
        if isinstance(a.get("plan"), dict) and a["plan"].get("secagg") is not None:
            return self._secure_aggregation(ids, a, delta, result.num_examples, {
                "num_examples": result.num_examples, "loss": result.loss, "steps": result.steps,
            })  # fmt: skip
        feedback = self.state.error_feedback(ids["task_id"]) if plan.codec.uses_error_feedback \
            else None
        frame, residual = encode_update(
            delta,
            plan.codec,
            rng=self._np_rng,
            residual=None if feedback is None else feedback.load(delta.size),
        )
        report = {
            "num_examples": result.num_examples,
            "loss": result.loss,
            "steps": result.steps,
            "wall_time_s": self._clock() - started,
            "bytes_down": self.transport.bytes_received - down0,
        }
        assert self.transport.credentials is not None
        pending = PendingUpload(
            coordinator=self.transport.base_url,
            device_id=self.transport.credentials[0],
            assignment_id=ids["assignment_id"],
            task_id=ids["task_id"],
            round=ids["round"],
            key=PendingUpload.key_for(ids["assignment_id"], frame),
            report=report,
            frame=frame,
            uses_feedback=feedback is not None,
            residual=residual if feedback is not None else None,
        )
        # Durable before the first byte leaves: whatever happens to the answer, the next pass
        # can resend exactly this and learn whether it counted.
        self.state.save_pending(pending)
        metrics = {**report, "bytes_up": len(frame)}
        try:
            answer = self._deliver(pending)
        except ApiError as e:
            if isinstance(e, Unauthorized) or e.transient:
                raise
            if not isinstance(e, Conflict):  # a 409's round is closed: no slot left to free
                self._abort(ids["assignment_id"], "error", FailurePhase.UPLOAD,
                            DeviceErrorCode.REFUSED)
            return Outcome(REJECTED, self._jittered(self.config.after_assignment_s),
                           metrics=metrics, error=e.code, **ids)
        return Outcome(TRAINED, self._paced(answer, self.config.after_assignment_s),
                       metrics=metrics, **ids)

    def _secure_aggregation(
        self, ids: dict[str, Any], a: dict[str, Any], delta: np.ndarray, weight: int,
        report: dict[str, Any],
    ) -> Outcome:  # fmt: skip
        """Instead of an upload: the SecAgg+ stages (:mod:`edge_sdk.secagg.loop`). Nothing is
        kept pending: the round's secrets live in memory, and a device that stops is a
        dropout the protocol recovers from."""
        from edge_sdk.secagg.client import SecAggRefused
        from edge_sdk.secagg.loop import SecAggLoop

        up0, down0 = self.transport.bytes_sent, self.transport.bytes_received
        loop = SecAggLoop(self.transport, a, delta, weight, rng=self._np_rng, sleep=self._sleep,
                          clock=self._clock, recheck=lambda: self.eligibility()[1])  # fmt: skip
        try:
            result = loop.run()
        except SecAggRefused as e:  # the server asked for what would expose this update
            log.warning("assignment %s: secure aggregation refused: %s", ids["assignment_id"], e)
            self._abort(ids["assignment_id"], "error", FailurePhase.UPLOAD,
                        DeviceErrorCode.REFUSED)  # fmt: skip
            return Outcome(REJECTED, self._jittered(self.config.after_assignment_s),
                           error="secagg_refused", **ids)  # fmt: skip
        metrics = {**report, "bytes_up": self.transport.bytes_sent - up0,
                   "bytes_down_secagg": self.transport.bytes_received - down0,
                   "secagg": result.outcome}  # fmt: skip
        wait = self._paced({"retry_after_s": result.retry_after_s}, self.config.after_assignment_s)
        if result.counted:
            return Outcome(TRAINED, wait, metrics=metrics, **ids)
        return Outcome(REJECTED, wait, metrics=metrics, error=f"secagg_{result.outcome}", **ids)

    def _deliver(self, pending: PendingUpload, *, resend: bool = False) -> Any:
        """Send ``pending`` and settle it by the answer: acknowledged (the residual moves on;
        returns the coordinator's answer), refused (raises the :class:`ApiError`; the residual
        stays) or its fate unknown (raises; settled as acknowledged, see :func:`_fate_unknown`).
        No answer (:class:`TransportError`, 5xx) leaves it pending. ``resend``: a previous
        pass may have sent it already."""
        path = Route.ASSIGNMENT_UPDATE.format(assignment_id=pending.assignment_id)
        headers = {
            "Content-Type": FRAME_CONTENT_TYPE,
            HEADER_IDEMPOTENCY_KEY: pending.key,
            HEADER_REPORT: json.dumps(pending.report),
        }
        answer: Any = None
        try:
            response = self.transport.request("POST", path, body=pending.frame, headers=headers)
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                answer = response.json()
        except ApiError as e:
            if not _counted_earlier(e):
                if _fate_unknown(e, resend):
                    log.warning("upload %s: the coordinator can no longer say whether it "
                                "counted it (%s); its residual is not sent again",
                                pending.assignment_id, e.code)  # fmt: skip
                    self.state.commit_pending(pending)
                elif not e.transient:
                    # A refusal, not an outage: the coordinator did not count it (a counted
                    # upload's key always gets its stored answer back).
                    self.state.clear_pending()
                raise
        self.state.commit_pending(pending)
        return answer

    def _resolve_pending(self) -> None:
        """Settle an upload a previous pass sent without seeing the answer (before anything
        else: a new encoding must start from the residual that answer decides)."""
        pending = self.state.load_pending()
        if pending is None:
            return
        creds = self.transport.credentials
        if pending.coordinator != self.transport.base_url or creds is None \
                or pending.device_id != creds[0]:
            # Another coordinator or an identity since replaced: nobody can answer for it, so
            # its fate is unknown (see _fate_unknown).
            log.warning("settling pending upload %s of another coordinator or device unsent",
                        pending.assignment_id)
            self.state.commit_pending(pending)
            return
        try:
            self._deliver(pending, resend=True)
        except ApiError as e:
            if e.transient:
                raise
            log.info("pending upload %s settled by a refusal (%s)", pending.assignment_id,
                     e.code)
        else:
            self.acknowledged_on_resend += 1
            log.info("pending upload %s acknowledged on resend", pending.assignment_id)

    def _evaluate(
        self, ids: dict[str, Any], bundle_dir: Path, manifest: Manifest, params: np.ndarray
    ) -> Outcome:
        self._phase = FailurePhase.RUNTIME_LOAD
        with self.trainers.lease(bundle_dir, manifest) as trainer:
            self._phase = FailurePhase.TRAINING
            # FedBN tasks evaluate with the device's own batch norm layers (if it has any yet)
            local = LocalLayers.for_task(self.state.root, ids["task_id"])
            result = evaluate(trainer, self.eval_data, params, local=local)
        metrics: dict[str, Any] = {"num_examples": result.num_examples, "loss": result.loss}
        if result.accuracy is not None:
            metrics["accuracy"] = result.accuracy
        path = Route.ASSIGNMENT_METRICS.format(assignment_id=ids["assignment_id"])
        try:
            answer = self.transport.call("POST", path, metrics)
        except DuplicateUpload as e:
            if not _counted_earlier(e):
                raise
            answer = None
        return Outcome(EVALUATED, self._paced(answer, self.config.after_assignment_s),
                       metrics=metrics, **ids)

    def _abort(
        self, assignment_id: str, reason: str, phase: FailurePhase, code: DeviceErrorCode
    ) -> Any:
        """Tell the coordinator where and why the assignment failed (enumerated codes only:
        never data or free text); its answer (pace steering), or None if there is none."""
        path = Route.ASSIGNMENT_ABORT.format(assignment_id=assignment_id)
        body = {"reason": reason, "phase": phase.value, "code": code.value}
        try:
            return self.transport.call("POST", path, body)
        except Conflict as e:
            # The round closed (goal reached or deadline) while we trained: the coordinator
            # already expired the assignment, so there is no slot left to free.
            log.info("abort of %s came after its round closed: %s", assignment_id, e)
        except (TransportError, ApiError) as e:
            # Best effort: the deadline frees the slot anyway.
            log.warning("could not tell the coordinator about abort of %s: %s", assignment_id, e)
        return None


def failure_code(error: BaseException) -> DeviceErrorCode:
    """The enumerated code a device reports for ``error`` (its message stays on the device)."""
    if isinstance(error, ConditionsLapsed):
        return DeviceErrorCode.CONDITIONS
    if isinstance(error, TransportError | ApiError):
        return DeviceErrorCode.NETWORK
    if isinstance(error, CacheError | BundleError | FrameError):
        return DeviceErrorCode.INTEGRITY
    if isinstance(error, BundleNotSupported):
        return DeviceErrorCode.UNSUPPORTED
    if isinstance(error, MemoryError):
        return DeviceErrorCode.OUT_OF_MEMORY
    if isinstance(error, FloatingPointError):
        return DeviceErrorCode.NON_FINITE
    if isinstance(error, PlanError):
        return DeviceErrorCode.INVALID_PLAN
    if isinstance(error, RuntimeError | OSError | ValueError):
        return DeviceErrorCode.RUNTIME_ERROR
    return DeviceErrorCode.OTHER


# The coordinator does not know the device (deleted after device_inactivity_s, or its database
# reset), lets it no longer see the assignment, or deleted it with the receipts
# (retain_receipts_s): none of these answers says whether an earlier send was counted.
_FORGOTTEN = frozenset({401, 403, 404, 410})


def _fate_unknown(error: ApiError, resend: bool) -> bool:
    """Whether ``error`` leaves open if an earlier send of the upload was counted: it may
    have been (a resend, or a retry within this send) and the coordinator has forgotten.

    Such an upload is settled as if acknowledged: the residual it was encoded with is never
    applied again, since the frame may have delivered it, and the residual it left becomes
    the task's, since no frame carries it. Keeping the old residual instead would send it a
    second time whenever the upload had been counted; the choice made can only lose the one
    update (if it was not counted), never count anything twice.
    """
    return error.status in _FORGOTTEN and (resend or error.attempt > 1)


def _counted_earlier(error: ApiError) -> bool:
    """``duplicate_upload`` on a retry: our first attempt was cut off after the coordinator had
    counted it, so the report was delivered (the same answer on a first attempt is a refusal)."""
    return isinstance(error, DuplicateUpload) and error.attempt > 1


def _stopped(stop: threading.Event | Callable[[], bool] | None) -> bool:
    if stop is None:
        return False
    if isinstance(stop, threading.Event):
        return stop.is_set()
    return bool(stop())


class AsyncClient(Client):
    """A :class:`Client` with coroutines for apps that run an event loop.

    The blocking parts (HTTP, training) run in a worker thread (:func:`asyncio.to_thread`);
    a client runs one pass at a time, so concurrent calls queue up.
    """

    # asyncio is imported here: apps without an event loop do not pay for it at import.
    async def run_once_async(self) -> Outcome:
        import asyncio

        return await asyncio.to_thread(self.run_once)

    async def run_forever_async(
        self, stop: asyncio.Event | None = None, *, max_runs: int | None = None
    ) -> int:
        import asyncio

        runs = 0
        while (stop is None or not stop.is_set()) and (max_runs is None or runs < max_runs):
            outcome = await self.run_once_async()
            runs += 1
            if max_runs is not None and runs >= max_runs:
                break
            if stop is None:
                await asyncio.sleep(outcome.next_run_in_s)
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), outcome.next_run_in_s)
        return runs
