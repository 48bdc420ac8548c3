"""Devices that run SecAgg+ against a real coordinator over HTTP, with nothing but
``http.client`` and the device-side primitives (:class:`edge_sdk.secagg.client.SecAggDevice`):
independent of the SDK's own loop (:mod:`edge_sdk.secagg.loop`), so a fault in one does not
hide one in the other.

:class:`SecAggRound` sets up a sync task with plan ``secagg`` on a coordinator with a fake
clock, registers ``n`` devices, selects them and hands out their assignments; each
:class:`Peer` then answers the stage its session is at (:meth:`Peer.answer`), and the test
decides who answers and when the clock moves past a deadline.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from coordinator.admin import AdminClient
from edge_sdk.codecs import decode_update
from edge_sdk.protocol import Route
from edge_sdk.secagg import ring
from edge_sdk.secagg.client import SecAggDevice
from edge_sdk.secagg.noise import DeviceNoise
from tests.fixtures.coordinator import DeviceHTTP, check

PARAMS = 64
STAGE_S = 30.0
TRAIN_S = 100.0


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Peer:
    def __init__(
        self, http: DeviceHTTP, assignment: dict[str, Any], delta: np.ndarray, weight: int
    ) -> None:
        self.http = http
        self.assignment = assignment
        self.id = assignment["assignment_id"]
        self.delta = delta
        self.weight = weight
        plan = assignment["plan"]["secagg"]
        self.spec = ring.RingSpec(plan["bits"], plan["clip"], plan["levels"], plan["max_weight"])
        self.noise = DeviceNoise.from_json(plan.get("dp"))  # distributed DP
        self.device: SecAggDevice | None = None
        self.inbox: dict[int, bytes] = {}

    @property
    def context(self) -> bytes:
        a = self.assignment
        return f"fedge/secagg/v1/{a['task_id']}/{a['round']}".encode()

    def state(self) -> dict[str, Any]:
        status, _, data = self.http.raw("GET", Route.SECAGG_STATE.format(assignment_id=self.id))
        return check(status, data)  # type: ignore[no-any-return]

    def post(self, stage: str, payload: Any) -> tuple[int, dict[str, Any]]:
        path = Route.SECAGG_MESSAGE.format(assignment_id=self.id, stage=stage)
        if isinstance(payload, bytes):
            body, kind = payload, "application/octet-stream"
        else:
            body, kind = json.dumps(payload).encode(), "application/json"
        status, _, data = self.http.raw("POST", path, body, {"Content-Type": kind})
        return status, json.loads(data)

    def message(self, state: dict[str, Any]) -> tuple[str, Any]:
        """The message this device sends at the session's current stage."""
        stage = state["stage"]
        if self.device is None:
            self.device = SecAggDevice(state["index"], self.context)
        dev = self.device
        if stage == "advertise":
            c, s = dev.advertise()
            return stage, {"c_public": b64(c), "s_public": b64(s)}
        if stage == "share":
            keys = {int(v): (base64.b64decode(k["c_public"]), base64.b64decode(k["s_public"]))
                    for v, k in state["neighbours"].items()}  # fmt: skip
            shares = dev.share(keys, state["threshold"])
            return stage, {"shares": {str(v): b64(c) for v, c in shares.items()}}
        if stage == "mask":
            self.inbox = {int(v): base64.b64decode(c) for v, c in state["inbox"].items()}
            y = dev.mask(self.delta, self.weight, self.spec, set(state["sharers"]),
                         np.random.default_rng(self.weight), self.noise)  # fmt: skip
            return stage, ring.pack(y, self.spec.bits)
        opened = dev.unmask(self.inbox, set(state["survivors"]), set(state["dropped"]))
        return stage, {"shares": {str(u): b64(s) for u, s in opened.items()}}

    def answer(self) -> dict[str, Any]:
        state = self.state()
        stage, payload = self.message(state)
        status, body = self.post(stage, payload)
        assert status == 200, body
        return body


class Front(Protocol):
    """Where a round is set up: an :class:`~coordinator.embedded.EmbeddedCoordinator`, or
    anything with its admin client and a clock whose ``advance`` passes a window."""

    clock: Any

    def admin(self) -> AdminClient: ...


class SecAggRound:
    def __init__(
        self, coord: Front, bundle: Any, n: int, *, goal: int | None = None,
        seed: int = 0, extra: dict[str, Any] | None = None,
        devices: Sequence[DeviceHTTP] | None = None, **secagg: Any,
    ) -> None:  # fmt: skip
        """``devices``: ``n`` registered devices (default: new ones on ``coord``)."""
        self.coord = coord
        self.admin = coord.admin()
        bundle_id = self.admin.upload_bundle(bundle)["bundle_id"]
        goal = goal or n
        plan = {"goal": goal, "over_selection": n / goal, "selection_window_s": 1.0,
                "round_deadline_s": TRAIN_S, "min_reporting_fraction": 0.3, "rounds": 5,
                "secagg": {"stage_timeout_s": STAGE_S, "max_weight": 100, "clip": 2.0,
                           **secagg}, **(extra or {})}  # fmt: skip
        self.task = self.admin.create_task(bundle_id, plan)
        self.task_id = self.task["task_id"]
        rng = np.random.default_rng(seed)
        self.http = list(devices) if devices is not None else [DeviceHTTP(coord) for _ in range(n)]
        for d in self.http:  # candidates
            d.check_in()
        coord.clock.advance(1.0)  # the selection window ends
        self.peers: list[Peer] = []
        for d in self.http:
            answer = d.check_in()
            assert answer["action"] == "train", answer
            self.peers.append(Peer(d, answer["assignment"], rng.normal(0, 0.3, PARAMS),
                                   int(rng.integers(1, 150))))  # fmt: skip
        rounds = self.admin.rounds(self.task_id)
        assert rounds[-1]["state"] == "reporting"
        self.base = self.version(0)

    def by_index(self) -> list[Peer]:
        """The peers in session order (index = position in the session's cohort)."""
        return sorted(self.peers, key=lambda p: p.state()["index"])

    def expected_mean(self, survivors: list[Peer]) -> tuple[np.ndarray, float]:
        """numpy's weighted mean of the survivors' clipped deltas (weights capped), and the
        quantisation bound of the decoded mean."""
        spec = survivors[0].spec
        w = np.array([min(p.weight, spec.max_weight) for p in survivors], dtype=np.float64)
        clipped = []
        for p in survivors:
            norm = float(np.linalg.norm(p.delta))
            clipped.append(p.delta * min(1.0, spec.clip / norm) if norm > 0 else p.delta)
        mean = (w[:, None] * np.array(clipped)).sum(axis=0) / w.sum()
        step = spec.max_weight * spec.clip / spec.levels  # one rounding unit of one vector
        return mean, len(survivors) * step / w.sum() + 1e-6

    def version(self, number: int) -> np.ndarray:
        frame = self.http[0].params(self.task_id, number)
        return decode_update(frame, expected_length=PARAMS).astype(np.float64)

    def close(self) -> None:
        self.admin.close()
        for d in self.http:
            d.close()
