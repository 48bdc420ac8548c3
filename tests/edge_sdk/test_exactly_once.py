"""Exactly-once on the device, against a real coordinator (real HTTP, SQLite, ORT, digits).

An upload's acknowledgement can be lost after the coordinator counted it (the network drops
the answer), or the device can die between the acknowledgement and saving its state. Either
way the next pass must resend the same bytes with the same key, the coordinator must count the
update once, and the error-feedback residual must move on exactly once: the next encoding
starts from the residual the counted frame left, which the test checks against numpy
(``decode(frame) + residual == delta + previous residual``, the codec's conservation law).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_sdk.client as client_module
from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.client import FAILED, TRAINED, Client, ClientConfig, Outcome
from edge_sdk.codecs import decode_update
from edge_sdk.conditions import DeviceConditions, ScriptedConditions
from edge_sdk.state import DeviceState
from edge_sdk.transport import RetryPolicy
from tests.edge_sdk.loopback import CuttingProxy

GOOD = DeviceConditions(charging=True, battery=0.9, idle=True, unmetered=True,
                        free_memory_mb=2048.0, temperature_c=30.0)
K = 40  # top-k entries sent; error feedback keeps the rest


@dataclass
class Encoding:
    delta: np.ndarray
    residual_in: np.ndarray | None
    frame: bytes
    residual_out: np.ndarray | None


@pytest.fixture
def encodings(monkeypatch: pytest.MonkeyPatch) -> list[Encoding]:
    """Every encoding the client makes, with what went in and came out."""
    seen: list[Encoding] = []
    real = client_module.encode_update

    def recording(delta: np.ndarray, spec: Any, **kw: Any) -> tuple[bytes, np.ndarray | None]:
        residual_in = kw.get("residual")
        frame, residual = real(delta, spec, **kw)
        seen.append(Encoding(delta.copy(), None if residual_in is None else residual_in.copy(),
                             frame, None if residual is None else residual.copy()))
        return frame, residual

    monkeypatch.setattr(client_module, "encode_update", recording)
    return seen


@pytest.fixture
def task(coordinator: EmbeddedCoordinator, digits_bundle: Path) -> Iterator[str]:
    admin = coordinator.admin()
    bundle_id = admin.upload_bundle(digits_bundle)["bundle_id"]
    plan = {"rounds": 2, "goal": 1, "selection_window_s": 0.0, "round_deadline_s": 120.0,
            "steps": 2, "codec": {"name": "topk", "k": K}}
    yield str(admin.create_task(bundle_id, plan=plan, name="exactly-once")["task_id"])


def _data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x[:200] / 16.0).astype(np.float32), y[:200].astype(np.int64)


def _client(url: str, state: Path, coord: EmbeddedCoordinator, **config: Any) -> Client:
    return Client(url, state_dir=state, data=_data(), conditions=ScriptedConditions(GOOD),
                  sleep=lambda s: time.sleep(min(s, 0.05)),
                  config=ClientConfig(backend="ort-step", seed=0,
                                      enrollment_token=coord.enrollment_token, **config))


def _until_not_waiting(client: Client, tries: int = 100) -> Outcome:
    for _ in range(tries):
        outcome = client.run_once()
        if outcome.action != "wait":
            return outcome
        time.sleep(0.02)
    raise AssertionError("the client kept waiting")


def _stored(coord: EmbeddedCoordinator, task_id: str) -> list[Any]:
    """The updates the coordinator counted for the task, round by round."""
    store = coord.service.store

    def read() -> list[Any]:
        rounds = sorted(store.list_rounds(task_id), key=lambda r: r.number)
        return [u for r in rounds for u in store.round_updates(r.round_id)]

    return coord.call(read)


def _check_residual_moved_on_once(coord: EmbeddedCoordinator, task_id: str,
                                  encodings: list[Encoding], state: Path) -> None:
    first, second = encodings  # one encoding per round: a resend never re-encodes
    assert first.residual_in is None and first.residual_out is not None
    # the counted frame plus what it left is exactly the first delta (numpy reference)
    sent = decode_update(first.frame, expected_length=first.delta.size)
    np.testing.assert_allclose(sent + first.residual_out, first.delta, rtol=0, atol=1e-6)
    # the second round started from that residual: applied once, neither lost nor reused
    assert second.residual_in is not None
    np.testing.assert_array_equal(second.residual_in, first.residual_out)
    stored = DeviceState(state).error_feedback(task_id).load(first.delta.size)
    np.testing.assert_array_equal(stored, second.residual_out)
    assert DeviceState(state).load_pending() is None
    updates = _stored(coord, task_id)
    assert len(updates) == 2  # one per round: the first counted once despite the resend
    assert updates[0].payload_sha == hashlib.sha256(first.frame).hexdigest()
    assert updates[1].payload_sha == hashlib.sha256(second.frame).hexdigest()


def test_a_lost_acknowledgement_is_resolved_by_resending_the_same_upload(
    coordinator: EmbeddedCoordinator, task: str, encodings: list[Encoding], tmp_path: Path
) -> None:
    state = tmp_path / "dev"
    # Two cuts: the first try and the transport's free reopen of a keep-alive connection.
    with CuttingProxy(coordinator.port, b"/update", mode="response", cuts=2) as proxy:
        client = _client(proxy.url, state, coordinator, retry=RetryPolicy(max_attempts=1))
        lost = _until_not_waiting(client)
        # the coordinator counted it, the device never heard: the upload stays pending
        assert lost.action == FAILED, lost
        assert len(_stored(coordinator, task)) == 1
        pending = DeviceState(state).load_pending()
        assert pending is not None and pending.frame == encodings[0].frame
        assert DeviceState(state).error_feedback(task).load(encodings[0].delta.size) is None
        assert client.acknowledged_on_resend == 0

        # next pass: the pending upload goes first (same key), then round 2 trains
        outcome = _until_not_waiting(client)
        client.close()
    assert outcome.action == TRAINED and outcome.round == 2, outcome
    assert client.acknowledged_on_resend == 1  # what an upload counter adds to TRAINED passes
    uploads = [line for line in proxy.request_lines if b"/update" in line]
    assert len(uploads) == 4  # round 1 (answer lost twice), its resend, round 2
    assert uploads[0] == uploads[1] == uploads[2]
    _check_residual_moved_on_once(coordinator, task, encodings, state)


class Crash(BaseException):
    """The process dies here (nothing in the client catches a BaseException)."""


def test_a_crash_between_acknowledgement_and_saving_state_is_resolved_on_restart(
    coordinator: EmbeddedCoordinator, task: str, encodings: list[Encoding], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = tmp_path / "dev"

    def die(self: DeviceState, pending: Any) -> None:
        raise Crash

    with CuttingProxy(coordinator.port, None) as relay:  # counts requests, breaks none
        with monkeypatch.context() as m:
            m.setattr(DeviceState, "commit_pending", die)
            doomed = _client(relay.url, state, coordinator)
            with pytest.raises(Crash):
                _until_not_waiting(doomed)
        assert len(_stored(coordinator, task)) == 1  # acknowledged and counted
        assert DeviceState(state).load_pending() is not None
        # a new process on the same state directory
        restarted = _client(relay.url, state, coordinator)
        outcome = _until_not_waiting(restarted)
        restarted.close()
    assert outcome.action == TRAINED and outcome.round == 2, outcome
    uploads = [line for line in relay.request_lines if b"/update" in line]
    # round 1, its resend after the restart (answered from the store), round 2
    assert len(uploads) == 3 and uploads[0] == uploads[1]
    _check_residual_moved_on_once(coordinator, task, encodings, state)


@pytest.mark.parametrize("forgotten", ["device", "assignment"])
def test_a_resend_the_coordinator_can_no_longer_answer_never_reapplies_the_old_residual(
    coordinator: EmbeddedCoordinator, digits_bundle: Path, encodings: list[Encoding],
    tmp_path: Path, forgotten: str,
) -> None:
    """Round 2's upload is counted but its answer lost; then the coordinator forgets the
    device (``device_inactivity_s``: 401 to the resend) or the assignment (404). Whether round
    2 counted is unknown to the device: the residual it was encoded with must not be sent
    again, so round 3 starts from the residual round 2 left."""
    admin = coordinator.admin()
    bundle_id = admin.upload_bundle(digits_bundle)["bundle_id"]
    plan = {"rounds": 3, "goal": 1, "selection_window_s": 0.0, "round_deadline_s": 120.0,
            "steps": 2, "codec": {"name": "topk", "k": K}}  # fmt: skip
    task_id = str(admin.create_task(bundle_id, plan=plan)["task_id"])
    state = tmp_path / "dev"
    store = coordinator.service.store
    # one address throughout (the credential and the pending upload are per coordinator URL)
    with CuttingProxy(coordinator.port, b"/update", mode="response", cuts=0) as proxy:
        client = _client(proxy.url, state, coordinator, retry=RetryPolicy(max_attempts=1))
        assert _until_not_waiting(client).action == TRAINED  # round 1: residual R1 stored
        proxy.cuts_left = 2  # the try and the transport's free reopen
        assert _until_not_waiting(client).action == FAILED  # round 2 counted, answer lost
        assert len(_stored(coordinator, task_id)) == 2
        pending = DeviceState(state).load_pending()
        assert pending is not None
        if forgotten == "device":
            assert coordinator.call(store.delete_devices, time.time() + 3600) == 1
        else:  # as receipts retention or a reset would: the assignment is gone
            for table in ("updates", "assignments"):
                coordinator.call(lambda t=table: store._execute(  # type: ignore[attr-defined]
                    f"delete from {t} where assignment_id = ?", [pending.assignment_id]))
        outcome = _until_not_waiting(client)
        client.close()
    assert outcome.action == TRAINED and outcome.round == 3, outcome
    assert DeviceState(state).load_pending() is None
    first, second, third = encodings  # one encoding per round: a resend never re-encodes
    assert second.residual_in is not None and second.residual_out is not None
    np.testing.assert_array_equal(second.residual_in, first.residual_out)  # R1
    # round 2's frame carried R1; what it left (R2) is what round 3 starts from, never R1
    np.testing.assert_array_equal(third.residual_in, second.residual_out)
    sent = decode_update(second.frame, expected_length=second.delta.size)
    np.testing.assert_allclose(sent + second.residual_out, second.delta + second.residual_in,
                               rtol=0, atol=1e-6)  # fmt: skip
