"""The device funnel: SDK clients that fail at each phase, and the counts adding up.

Seven devices share one synchronous round on a real coordinator (real HTTP, SQLite, ORT
steps on digits). Each fails in its own way, for real: the network drops during the download,
the runtime cannot load the bundle, training diverges (inputs near float32's maximum), the
device is unplugged mid-training, the upload arrives corrupted and the coordinator refuses it;
one succeeds and
one (bare HTTP) goes silent after taking its assignment. The dashboard's funnel must put each
at the right stage, with the enumerated phase and code the SDK sent and no free text.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.bundle import Manifest
from edge_sdk.cache import BundleCache
from edge_sdk.client import ABORTED, FAILED, REJECTED, TRAINED, WAIT, Client, ClientConfig
from edge_sdk.conditions import DeviceConditions, ScriptedConditions
from edge_sdk.data import BatchStreamDataset
from edge_sdk.errors import TransportError
from edge_sdk.pool import TrainerPool
from edge_sdk.protocol import Route
from edge_sdk.trainers.base import BundleNotSupported, Trainer
from edge_sdk.transport import Response, RetryPolicy, Transport
from tests.fixtures.coordinator import DeviceHTTP, HttpConnection

GOOD = DeviceConditions(charging=True, battery=0.9, idle=True, unmetered=True,
                        free_memory_mb=2048.0, temperature_c=30.0)
UNPLUGGED = GOOD.replace(charging=False, battery=0.7)
FATES = ("download", "runtime_load", "training", "conditions_lapsed", "upload", "success")


class DropsDownloads(Transport):
    """The network fails while the version's parameters come down (after retries)."""

    def request(self, method: str, path: str, *, body: bytes = b"",
                headers: Mapping[str, str] | None = None) -> Response:
        if method == "GET" and path.endswith("/params"):
            raise TransportError(f"GET {path}: connection reset (test)")
        return super().request(method, path, body=body, headers=headers)


class CorruptsUploads(Transport):
    """One byte of the update frame flips on the way (its checksum no longer matches)."""

    def request(self, method: str, path: str, *, body: bytes = b"",
                headers: Mapping[str, str] | None = None) -> Response:
        if method == "POST" and path.endswith("/update"):
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        return super().request(method, path, body=body, headers=headers)


class NoRuntime:
    """A device whose runtime cannot load the bundle's training graph."""

    def lease(self, bundle_dir: Path, manifest: Manifest) -> AbstractContextManager[Trainer]:
        raise BundleNotSupported("ort-step: the runtime on this device is too old (test)")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


def _client(coord: EmbeddedCoordinator, state: Path, fate: str, data: Any,
            shared: dict[str, Any]) -> Client:
    kw: dict[str, Any] = {"cache": shared["cache"], "trainers": shared["pool"]}
    conditions = ScriptedConditions(GOOD)
    config = ClientConfig(enrollment_token=getattr(coord, "enrollment_token", None), seed=1,
                          retry=RetryPolicy(max_attempts=1))
    transport_cls: type[Transport] | None = {
        "download": DropsDownloads, "upload": CorruptsUploads
    }.get(fate)
    if transport_cls is not None:
        kw["transport"] = transport_cls(coord.url, timeout=30, retry=config.retry)
    if fate == "runtime_load":
        kw["trainers"] = NoRuntime()
    x, y = data
    if fate == "training":
        data = (np.full_like(x, 3e38), y)  # finite inputs whose loss overflows
    if fate == "conditions_lapsed":
        def unplugged_mid_epoch() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for start in range(0, len(x), 16):
                if start == 32:
                    conditions.set(UNPLUGGED)
                yield x[start : start + 16], y[start : start + 16]

        data = BatchStreamDataset(unplugged_mid_epoch, num_examples=len(x))
    return Client(coord.url, state_dir=state, data=data, conditions=conditions, config=config,
                  sleep=lambda s: time.sleep(min(s, 0.01)), **kw)


def test_funnel_counts_add_up_across_stages(
    coordinator: EmbeddedCoordinator, digits_bundle: Path, digits: Any, tmp_path: Path
) -> None:
    coord = coordinator
    admin = coord.admin()
    bundle_id = admin.upload_bundle(digits_bundle)["bundle_id"]
    plan = {"rounds": 1, "goal": 7, "over_selection": 1.0, "selection_window_s": 0.0,
            "round_deadline_s": 600.0, "recheck_every_steps": 1, "batch_size": 16,
            "epochs": 1}
    task_id = admin.create_task(bundle_id, plan=plan, name="funnel")["task_id"]
    x, y = digits
    shared = {"cache": BundleCache(tmp_path / "cache"), "pool": TrainerPool()}
    parts = np.array_split(np.arange(len(x)), len(FATES))
    clients = {
        fate: _client(coord, tmp_path / fate, fate, (x[idx], y[idx]), shared)
        for fate, idx in zip(FATES, parts, strict=True)
    }
    silent = DeviceHTTP(coord)

    # Everyone becomes a candidate; the seventh check-in fills the round, which selects all.
    assert silent.check_in()["action"] == "wait"
    first = {fate: c.run_once() for fate, c in clients.items()}
    assert [o.action for o in first.values()][:-1] == [WAIT] * (len(FATES) - 1)
    outcomes = {
        fate: first[fate] if first[fate].action != WAIT else c.run_once()
        for fate, c in clients.items()
    }
    assert silent.check_in()["action"] == "train"  # it takes its assignment and goes quiet
    assert {f: o.action for f, o in outcomes.items()} == {
        "download": FAILED, "runtime_load": FAILED, "training": FAILED,
        "conditions_lapsed": ABORTED, "upload": REJECTED, "success": TRAINED,
    }

    http = HttpConnection(coord.url)
    auth = {"Authorization": f"Bearer {coord.admin_token}"}
    detail = http.json("GET", Route.ADMIN_DASHBOARD_TASK.format(task_id=task_id), headers=auth)
    population = http.json("GET", Route.ADMIN_DASHBOARD_POPULATION, headers=auth)
    funnel = detail["funnel"]
    assert population["funnel"] == funnel  # the only task: the same assignments

    reached = {s["stage"]: s["devices"] for s in funnel["stages"]}
    lost = {s["stage"]: s["lost"] for s in funnel["stages"]}
    # The reference: each device's scripted fate says where it must have stopped.
    assert reached == {"delivered": 7, "downloaded": 5, "runtime_loaded": 4, "trained": 2,
                       "uploaded": 1, "accepted": 1}
    assert lost == {
        "delivered": {"download/network": 1, "in_flight": 1},
        "downloaded": {"runtime_load/unsupported": 1},
        "runtime_loaded": {"conditions_lapsed/conditions": 1, "training/non_finite": 1},
        "trained": {"upload/refused": 1},
        "uploaded": {},
        "accepted": {},
    }
    stages = funnel["stages"]
    for here, after in itertools.pairwise(stages):
        assert here["devices"] - after["devices"] == sum(here["lost"].values())
    assert stages[0]["devices"] == len(FATES) + 1
    assert funnel["in_flight"] == 1 and funnel["dropped"] == 0

    # The round's page names each device's phase and code; nothing else was stored.
    (rnd,) = detail["rounds"]
    assert {k: rnd[k] for k in ("selected", "reported", "aborted", "refused", "in_flight")} == {
        "selected": 7, "reported": 1, "aborted": 4, "refused": 1, "in_flight": 1}
    page = http.json("GET", Route.ADMIN_DASHBOARD_ROUND.format(task_id=task_id, number=1),
                     headers=auth)
    by_device = {a["device_id"]: a for a in page["assignments"]}
    for fate, c in clients.items():
        row = by_device[c.device_id]
        if fate == "success":
            assert row["state"] == "reported" and row["abort_phase"] is None
            continue
        assert row["state"] == "aborted"
        assert row["abort_phase"] == fate
    assert by_device[clients["upload"].device_id]["upload_refused"] == "malformed_frame"
    records = coord.call(coord.service.store.round_assignments, _round_id(coord, task_id))
    notes = sorted(a.abort_reason for a in records if a.abort_reason is not None)
    assert notes == sorted([
        "error [download/network]", "error [runtime_load/unsupported]",
        "error [training/non_finite]", "conditions_lapsed [conditions_lapsed/conditions]",
        "error [upload/refused]",
    ])
    http.close()


def _round_id(coord: EmbeddedCoordinator, task_id: str) -> int:
    (rnd,) = coord.call(coord.service.store.list_rounds, task_id)
    return int(rnd.round_id)


def test_abort_with_an_unknown_phase_or_code_changes_nothing(
    coordinator: EmbeddedCoordinator, tiny_bundle: Path
) -> None:
    admin = coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    admin.create_task(bundle_id, {"goal": 1, "over_selection": 1.0, "selection_window_s": 0.0})
    dev = DeviceHTTP(coordinator)
    answer = dev.check_in()
    if answer["action"] == "wait":
        answer = dev.check_in()
    path = Route.ASSIGNMENT_ABORT.format(assignment_id=answer["assignment"]["assignment_id"])
    before = coordinator.call(coordinator.service.store.snapshot)
    for body in ({"reason": "error", "phase": "somewhere"},
                 {"reason": "error", "phase": "download", "code": "my battery is sad"},
                 {"reason": "error", "phase": "download", "code": 3}):
        status, err = dev.post_json(path, body)
        assert status == 400, err
        assert err["error"]["code"] == "invalid_request"
        assert coordinator.call(coordinator.service.store.snapshot) == before
    status, ok = dev.post_json(path, {"reason": "error", "phase": "download", "code": "network"})
    assert status == 200 and ok["aborted"] is True
    assert json.dumps(ok)  # a JSON answer with pace steering
