"""A device's SecAgg+ round over HTTP: poll the session, answer each stage once.

After training, a device whose assignment's plan has ``secagg`` does not upload its delta;
it runs :class:`SecAggLoop` (docs/protocol.md, "Secure aggregation")::

    GET  /v1/assignments/{id}/secagg         -> the stage, and what the device needs for it
    POST /v1/assignments/{id}/secagg/{stage} -> its message: keys, share ciphertexts, the
                                               masked ring vector, the opened shares

It waits ``retry_after_s`` between polls while its answer for the current stage is in, and
stops when the session is ``closed`` (the round committed or was abandoned), when it is
``excluded`` (it missed a stage: its neighbours' shares cover it), when its conditions
lapse (it simply stops answering: a dropout the protocol tolerates), or past its own bound.
Its secrets (two X25519 private keys, the self-mask seed) live in memory only: a device that
restarts mid-round is a dropout, never a second participant.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_sdk.errors import ApiError, ConditionsLapsed, Overloaded, TransportError
from edge_sdk.protocol import ErrorCode, Route
from edge_sdk.secagg import ring
from edge_sdk.secagg.client import SecAggDevice, SecAggRefused, context_for
from edge_sdk.secagg.noise import DeviceNoise
from edge_sdk.transport import Transport

__all__ = ["SecAggLoop", "SecAggPlan", "SecAggResult"]

STAGES = ("advertise", "share", "mask", "unmask")
# Answers that say the device's message is already in (its own retry after a lost answer)
# or that the stage moved on without it.
_ALREADY_IN = ErrorCode.SECAGG_REPLAY.value
_TOO_LATE = (ErrorCode.SECAGG_STAGE.value, ErrorCode.SECAGG_EXCLUDED.value,
             ErrorCode.ROUND_CLOSED.value)  # fmt: skip


@dataclass(frozen=True)
class SecAggPlan:
    """The assignment plan's ``secagg`` part: the ring, the stage timeout, and the noise of
    distributed DP (None without)."""

    spec: ring.RingSpec
    stage_timeout_s: float
    noise: DeviceNoise | None = None

    @classmethod
    def from_json(cls, raw: Any) -> SecAggPlan:
        try:
            spec = ring.RingSpec(int(raw["bits"]), float(raw["clip"]), int(raw["levels"]),
                                 int(raw["max_weight"]))  # fmt: skip
            timeout = float(raw["stage_timeout_s"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"plan 'secagg' is malformed: {e!r}") from e
        if not (1 <= spec.bits <= 64 and spec.clip > 0 and math.isfinite(spec.clip)
                and spec.levels >= 1 and spec.max_weight >= 1 and timeout > 0):  # fmt: skip
            raise ValueError(f"plan 'secagg' is out of range: {raw!r}")
        return cls(spec, timeout, DeviceNoise.from_json(raw.get("dp")))


@dataclass(frozen=True)
class SecAggResult:
    outcome: str  # committed | abandoned | excluded | timeout
    stage: str  # the last stage this device answered ("" if none)
    reason: str | None = None
    retry_after_s: float | None = None  # pace steering, from the closed session's answer

    @property
    def counted(self) -> bool:
        """The round committed with this device's masked vector in its sum."""
        return self.outcome == "committed" and self.stage in ("mask", "unmask")


class SecAggLoop:
    def __init__(
        self,
        transport: Transport,
        assignment: dict[str, Any],
        delta: np.ndarray,
        weight: int,
        *,
        rng: np.random.Generator,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        recheck: Callable[[], tuple[str, ...]] | None = None,
    ) -> None:
        self.transport = transport
        self.assignment_id = str(assignment["assignment_id"])
        self.context = context_for(str(assignment["task_id"]), int(assignment["round"]))
        self.plan = SecAggPlan.from_json(assignment["plan"]["secagg"])
        self.delta = delta
        self.weight = weight
        self.rng = rng
        self.sleep = sleep
        self.clock = clock
        self.recheck = recheck
        # Past the round's training deadline and every later stage's (with slack), the
        # coordinator has closed the session whatever happened: stop asking.
        deadline = float(assignment.get("deadline_in_s", 0.0))
        self.give_up_at = clock() + deadline + 5 * self.plan.stage_timeout_s
        self.device: SecAggDevice | None = None
        self.inbox: dict[int, bytes] = {}
        self._sent: dict[str, Any] = {}
        self.answered = ""

    def run(self) -> SecAggResult:
        while self.clock() < self.give_up_at:
            try:
                state = self.transport.call(
                    "GET", Route.SECAGG_STATE.format(assignment_id=self.assignment_id)
                )
            except Overloaded as e:
                # Busy past the transport's own retries (a whole cohort polls one worker):
                # the stage's deadline is what counts, so wait and ask again.
                self._busy(e)
                continue
            stage = state.get("stage")
            if stage == "closed":
                return SecAggResult(str(state.get("outcome")), self.answered, state.get("reason"),
                                    state.get("retry_after_s"))  # fmt: skip
            if state.get("excluded"):
                return SecAggResult("excluded", self.answered, f"missed stage {stage}")
            if stage in STAGES and not state.get("answered"):
                if self.recheck is not None and (reasons := self.recheck()):
                    raise ConditionsLapsed(reasons, step=0)
                self._answer(stage, state)
                continue
            # No longer than the session can last: an absurd wait (or Infinity) would
            # overflow the sleep, or outlive the round it waits for.
            left = self.give_up_at - self.clock()
            self.sleep(max(0.01, min(float(state.get("retry_after_s", 1.0)), left)))
        return SecAggResult("timeout", self.answered)

    def _answer(self, stage: str, state: dict[str, Any]) -> None:
        # Built once per stage: a resend (its first answer lost, or a 503) repeats the same
        # bytes. A fresh mask would round the update anew under the same masks, and the
        # difference of two such vectors is the difference of two roundings, in the clear.
        payload = self._sent.get(stage)
        if payload is None:
            payload = self._sent[stage] = self._message(stage, state)
        path = Route.SECAGG_MESSAGE.format(assignment_id=self.assignment_id, stage=stage)
        try:
            if isinstance(payload, bytes):
                binary = {"Content-Type": "application/octet-stream"}
                self.transport.request("POST", path, body=payload, headers=binary)
            else:
                self.transport.call("POST", path, payload)
        except Overloaded as e:
            self._busy(e)
            return  # not in (or its answer lost): the next poll says, a resend may be a replay
        except ApiError as e:
            if e.code != _ALREADY_IN and e.code not in _TOO_LATE:
                raise
            if e.code in _TOO_LATE:
                return  # the next poll says where the session is
        self.answered = stage

    def _busy(self, e: Overloaded) -> None:
        wait = e.retry_after_s if e.retry_after_s is not None else self.plan.stage_timeout_s / 20
        self.sleep(min(max(wait, 0.1), self.plan.stage_timeout_s / 4))

    def _message(self, stage: str, state: dict[str, Any]) -> Any:
        if self.device is None:
            self.device = SecAggDevice(int(state["index"]), self.context)
        dev = self.device
        try:
            if stage == "advertise":
                c, s = dev.advertise()
                return {"c_public": _b64(c), "s_public": _b64(s)}
            if stage == "share":
                keys = {int(v): (_unb64(k["c_public"]), _unb64(k["s_public"]))
                        for v, k in state["neighbours"].items()}  # fmt: skip
                shares = dev.share(keys, int(state["threshold"]))
                return {"shares": {str(v): _b64(c) for v, c in shares.items()}}
            if stage == "mask":
                self.inbox = {int(v): _unb64(c) for v, c in state["inbox"].items()}
                sharers = {int(v) for v in state["sharers"]}
                y = dev.mask(self.delta, self.weight, self.plan.spec, sharers, self.rng,
                             self.plan.noise)  # fmt: skip
                return ring.pack(y, self.plan.spec.bits)
            survivors = {int(v) for v in state["survivors"]}
            dropped = {int(v) for v in state["dropped"]}
            opened = dev.unmask(self.inbox, survivors, dropped)
            return {"shares": {str(u): _b64(s) for u, s in opened.items()}}
        except (KeyError, TypeError, ValueError, binascii.Error) as e:
            if isinstance(e, SecAggRefused):
                raise
            raise TransportError(f"secagg {stage}: malformed session state: {e!r}") from e


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any) -> bytes:
    return base64.b64decode(value, validate=True)
