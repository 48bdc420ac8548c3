"""Secure aggregation of a sync task's training rounds, held durably.

:class:`SecAggRounds` is what :class:`~coordinator.rounds.sync.SyncRounds` calls for a task
whose plan has ``secagg``:

* at selection, :meth:`SecAggRounds.start` stores the session's parameters (the chosen
  devices in order, a fresh public graph seed, the ring, the deadlines) as event 0;
* a device's message is checked by the session (nothing changes), stored as the next event
  (a masked vector as a blob first), and only then folded into the session in memory
  (:meth:`SecAggRounds.receive`); a stage that ends is stored the same way
  (:meth:`SecAggRounds.tick`);
* at close, :meth:`SecAggRounds.session` gives the finished session: the unmasked mean of the
  survivors, or why it was abandoned.

What is held in memory (the sessions) is a fold of ``secagg_events`` and is rebuilt from
them when missing (after a restart, or :meth:`SecAggRounds.forget` after an error). The
store holds public keys, share ciphertexts the server cannot open, masked vectors, opened
shares and stage closes: never a device's update in the clear.

Among replicas (:mod:`coordinator.replicas`) every replica appends to the same log, and
each event is stored only at the next free ``seq``: its writer checked it against every
event before it (optimistic concurrency; the log has no gaps). Before a replica answers
from a session it holds, it folds in the events stored since its last one (one read of the
rows past ``seq``); a replica that loses the race for a ``seq`` catches up the same way and
checks its message again (the stage may have closed meanwhile, or the device's retry gone
to another replica), so that a device is never sent back to retry because of another
replica's write. A process alone on its database is the only writer: it reads nothing back.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.blobs import held
from coordinator.errors import InvalidRequest, Overloaded
from coordinator.plan import TaskPlan
from coordinator.rounds.base import PolicyContext
from coordinator.secagg.session import STAGES, Event, SecAggSession
from coordinator.store import Round, SecAggEvent, StoreError, Task
from coordinator.validation import Fields
from edge_sdk.protocol import ErrorCode
from edge_sdk.secagg import ring
from edge_sdk.secagg.client import context_for

__all__ = ["SecAggRounds", "b64decode", "b64encode"]

# Polling: a device waiting for a stage to end asks again after this fraction of the
# stage's timeout (bounded), so a stage that ends early is noticed within a few percent.
POLL_FRACTION = 0.05
POLL_BOUNDS_S = (0.05, 5.0)
# Races lost for the next event's ``seq`` before a device is told to retry (each loss means
# another replica stored an event meanwhile: the session moved on).
RACES = 8


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > 4096:
        raise InvalidRequest(f"{what} must be a base64 string", ErrorCode.SECAGG_INVALID)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest(f"{what} is not base64: {e}", ErrorCode.SECAGG_INVALID) from e


@dataclass
class _Held:
    session: SecAggSession
    seq: int  # the next event's number


class _Raced(Exception):
    """Another writer stored the event at the ``seq`` this one tried."""


class SecAggRounds:
    def __init__(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        self._held: dict[int, _Held] = {}
        self._task_of: dict[int, str] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, task: Task, plan: TaskPlan, rnd: Round, devices: list[str], now: float) -> None:
        """Store event 0 of the round's session (inside the selection's transaction)."""
        assert plan.secagg is not None
        body = {
            "devices": devices,
            # Drawn now, before any key exists, from the OS: nobody picks who neighbours whom.
            "graph_seed": secrets.token_hex(32),
            "length": self.ctx.num_parameters(task),
            "min_survivors": rnd.min_reports,
            "dropout": plan.secagg.graph_dropout(len(devices)),
            "stage_timeout_s": plan.secagg.stage_timeout_s,
            # Devices train before they advertise: the first stage lasts the round's deadline.
            "first_deadline": now + plan.round_deadline_s,
            "enough": rnd.goal,
            "now": now,
            "ring": plan.secagg.client_json(),
        }
        self.ctx.store.add_secagg_event(
            SecAggEvent(rnd.round_id, 0, "start", None, body, None, now)
        )

    def session(self, task: Task, rnd: Round) -> SecAggSession:
        return self._get(task, rnd).session

    def forget(self, task_id: str) -> None:
        for round_id in [r for r, t in self._task_of.items() if t == task_id]:
            self.drop(round_id)

    def drop(self, round_id: int) -> None:
        self._held.pop(round_id, None)
        self._task_of.pop(round_id, None)

    def mark_reported(self, rnd: Round, session: SecAggSession, now: float) -> None:
        """The survivors' assignments reported (inside the commit's transaction)."""
        assert session.result is not None
        store = self.ctx.store
        for device_id in session.result.survivors:
            a = store.assignment_for(rnd.round_id, device_id)
            if a is not None:
                store.update_assignment(a.assignment_id, state="reported", closed_at=now)

    # -- what devices see and send --------------------------------------------------------------

    def state(self, task: Task, rnd: Round, device_id: str, now: float) -> dict[str, Any]:
        """The session as this device sees it, with what it needs for its next message."""
        held = self._get(task, rnd)
        s = held.session
        u = s.index(device_id)
        out: dict[str, Any] = {"stage": s.stage, "index": u, "threshold": s.threshold}
        if s.done:
            if s.reason is not None:
                out["reason"] = s.reason
            return out
        out["deadline_in_s"] = round(max(0.0, s.deadline - now), 3)
        poll = min(max(s.stage_timeout_s * POLL_FRACTION, POLL_BOUNDS_S[0]), POLL_BOUNDS_S[1])
        out["retry_after_s"] = round(min(poll, max(s.deadline - now, POLL_BOUNDS_S[0])), 3)
        if u not in s.cohort[s.stage]:
            out["excluded"] = True  # it missed an earlier stage: nothing more to do
            return out
        out["answered"] = s.has_answered(u)
        if out["answered"]:
            return out  # polling for the next stage: no need to send this one's data again
        if s.stage == "share":
            out["neighbours"] = {
                str(v): {"c_public": b64encode(c), "s_public": b64encode(k)}
                for v, (c, k) in s.neighbour_keys(device_id).items()
            }
        elif s.stage == "mask":
            inbox, sharers = s.inbox(device_id)
            out["sharers"] = sorted(sharers)
            out["inbox"] = {str(v): b64encode(c) for v, c in inbox.items()}
        elif s.stage == "unmask":
            survivors, dropped = s.survivors(device_id)
            out["survivors"] = sorted(survivors)
            out["dropped"] = sorted(dropped)
        return out

    def receive(
        self, task: Task, rnd: Round, device_id: str, stage: str, body: bytes | Any, now: float
    ) -> dict[str, Any]:
        """Check a device's message for ``stage``, store it, fold it, close what is due."""
        if stage not in STAGES:
            raise InvalidRequest(
                f"unknown SecAgg stage {stage!r}; one of {', '.join(STAGES)}",
                ErrorCode.SECAGG_INVALID,
            )

        def check(s: SecAggSession) -> Event:
            s.check_turn(device_id, stage)
            if stage == "mask":
                return s.check_mask(device_id, self._vector(s, body))
            return self._check_json(s, device_id, stage, body)

        self._append(task, rnd, check, now)
        self.tick(task, rnd, now)
        return {"accepted": True, "stage": stage}

    def tick(self, task: Task, rnd: Round, now: float) -> SecAggSession:
        """Close (durably) every stage of the round's session that is due."""
        gone = self._aborted(rnd)
        while self._append(task, rnd, lambda s: s.due(now, gone), now):
            pass
        return self._held[rnd.round_id].session

    def _aborted(self, rnd: Round) -> frozenset[str]:
        """Devices of the round that gave up (an abort): no stage waits for them."""
        store = self.ctx.store
        if not store.assignment_counts(rnd.round_id).get("aborted"):
            return frozenset()
        return frozenset(
            a.device_id for a in store.round_assignments(rnd.round_id) if a.state == "aborted"
        )

    # -- internals ----------------------------------------------------------------------------

    def _append(
        self, task: Task, rnd: Round, make: Callable[[SecAggSession], Event | None], now: float
    ) -> bool:
        """Store, then fold, the event ``make`` derives from the session as stored (None:
        nothing to store; a refusal it raises passes through); whether one was stored."""
        for _ in range(RACES):
            held = self._get(task, rnd)
            event = make(held.session)
            if event is None:
                return False
            try:
                self._record(rnd, held, event, now)
                return True
            except _Raced:
                self._catch_up(held, rnd)  # what the winner stored; then derive again
        self.drop(rnd.round_id)
        raise Overloaded("the round's secure aggregation is busy (other replicas); retry", 1.0)

    @staticmethod
    def _vector(s: SecAggSession, body: Any) -> np.ndarray:
        if not isinstance(body, bytes | bytearray):
            raise InvalidRequest("a masked vector is a binary body", ErrorCode.SECAGG_INVALID)
        try:
            return ring.unpack(bytes(body), s.spec.bits, s.length + 1)
        except ring.RingError as e:
            raise InvalidRequest(f"masked vector: {e}", ErrorCode.SECAGG_INVALID) from e

    @staticmethod
    def _check_json(s: SecAggSession, device_id: str, stage: str, obj: Any) -> Event:
        f = Fields(obj, "body")
        if stage == "advertise":
            c = b64decode(f.raw("c_public"), "body.c_public")
            k = b64decode(f.raw("s_public"), "body.s_public")
            f.done()
            return s.check_advertise(device_id, c, k)
        shares = _indexed(f.raw("shares"), "body.shares")
        f.done()
        if stage == "share":
            return s.check_share(device_id, shares)
        return s.check_unmask(device_id, shares)

    def _record(self, rnd: Round, mine: _Held, event: Event, now: float) -> None:
        kind, who, *args = event
        device_id: str | None = who
        sha: str | None = None
        body: dict[str, Any]
        if kind == "close":
            device_id, body = None, {"stage": who, "now": args[0]}
        elif kind == "advertise":
            body = {"c_public": b64encode(args[0]), "s_public": b64encode(args[1])}
        elif kind == "mask":
            # The blob is durable before the row that names it; a row that then fails leaves
            # an orphan the start-up sweep removes.
            packed = ring.pack(args[0], mine.session.spec.bits)
            sha, body = self.ctx.blobs.put(packed), {}
        else:
            body = {"shares": {str(v): b64encode(c) for v, c in args[0].items()}}
        store = self.ctx.store
        try:
            # A row naming a blob: in a transaction that holds it (another event's row is
            # one statement, its own transaction).
            with store.atomic() if sha is not None else nullcontext():
                if sha is not None and not held(store, self.ctx.blobs, [sha]):
                    self.ctx.blobs.put(packed)  # gone since: written again, as a version is
                store.add_secagg_event(
                    SecAggEvent(rnd.round_id, mine.seq, kind, device_id, body, sha, now)
                )
        except StoreError as e:
            # That step is taken: another coordinator sharing the database advanced the
            # session past what this one holds.
            raise _Raced(str(e)) from e
        mine.seq += 1
        mine.session.apply(event)

    def _get(self, task: Task, rnd: Round) -> _Held:
        held = self._held.get(rnd.round_id)
        if held is None:
            # A task has one open round: one of its sessions held here is of a round that
            # another replica closed.
            self.forget(task.task_id)
            held = self._rebuild(task, rnd)
            self._held[rnd.round_id] = held
            self._task_of[rnd.round_id] = task.task_id
        elif self.ctx.replica is not None:
            self._catch_up(held, rnd)
        return held

    def _catch_up(self, held: _Held, rnd: Round) -> None:
        """Fold the events other writers stored after the last one ``held`` has."""
        self._fold(held, rnd, self.ctx.store.secagg_events(rnd.round_id, since=held.seq))

    def _fold(self, held: _Held, rnd: Round, events: list[SecAggEvent]) -> None:
        for e in events:
            if e.seq != held.seq:  # cannot happen: a writer of seq n read n - 1 first
                self.drop(rnd.round_id)
                raise Overloaded(f"secagg event {held.seq} of round {rnd.round_id} is "
                                 "missing; retry", 1.0)  # fmt: skip
            held.session.apply(self._event(e, held.session))
            held.seq += 1

    def _rebuild(self, task: Task, rnd: Round) -> _Held:
        events = self.ctx.store.secagg_events(rnd.round_id)
        if not events or events[0].kind != "start":
            raise InvalidRequest(
                f"round {rnd.number} has no secure aggregation session", ErrorCode.SECAGG_STAGE
            )
        b = events[0].body
        r = b["ring"]
        spec = ring.RingSpec(
            int(r["bits"]), float(r["clip"]), int(r["levels"]), int(r["max_weight"])
        )
        session = SecAggSession.start(
            list(b["devices"]),
            context=context_for(task.task_id, rnd.number),
            spec=spec,
            length=int(b["length"]),
            min_survivors=int(b["min_survivors"]),
            graph_seed=bytes.fromhex(b["graph_seed"]),
            now=float(b["now"]),
            stage_timeout_s=float(b["stage_timeout_s"]),
            dropout=float(b["dropout"]),
            first_deadline=float(b["first_deadline"]),
            enough=int(b["enough"]),
            record=False,
        )
        held = _Held(session, 1)
        self._fold(held, rnd, events[1:])
        return held

    def _event(self, e: SecAggEvent, s: SecAggSession) -> Event:
        if e.kind == "close":
            return ("close", e.body["stage"], float(e.body["now"]))
        if e.kind == "advertise":
            return ("advertise", e.device_id, base64.b64decode(e.body["c_public"]),
                    base64.b64decode(e.body["s_public"]))  # fmt: skip
        if e.kind == "mask":
            assert e.payload_sha is not None
            vector = ring.unpack(self.ctx.blobs.read(e.payload_sha), s.spec.bits, s.length + 1)
            return ("mask", e.device_id, vector)
        shares = {int(v): base64.b64decode(c) for v, c in e.body["shares"].items()}
        return (e.kind, e.device_id, shares)


def _indexed(raw: Any, what: str) -> dict[int, bytes]:
    """``{"<device index>": base64}`` as ``{index: bytes}``."""
    if not isinstance(raw, Mapping) or len(raw) > 100_000:
        raise InvalidRequest(f"{what} must be an object of device index to base64",
                             ErrorCode.SECAGG_INVALID)  # fmt: skip
    out: dict[int, bytes] = {}
    for key, value in raw.items():
        # canonical only: "01" and "1" would name one device, and one of them be dropped
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 9
                and key == str(int(key))):  # fmt: skip
            raise InvalidRequest(f"{what}: {key!r} is not a device index",
                                 ErrorCode.SECAGG_INVALID)  # fmt: skip
        out[int(key)] = b64decode(value, f"{what}.{key}")
    return out
