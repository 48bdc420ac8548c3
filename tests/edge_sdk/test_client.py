"""SDK clients against a real coordinator on loopback: real HTTP, real SQLite, real ORT steps,
real digits. Conditions come from :class:`ScriptedConditions` (the only thing scripted)."""

from __future__ import annotations

import asyncio
import json
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.bundle import load_manifest
from edge_sdk.cache import BundleCache
from edge_sdk.client import ABORTED, EVALUATED, TRAINED, AsyncClient, Client, ClientConfig, Outcome
from edge_sdk.codecs import decode_update
from edge_sdk.conditions import DeviceConditions, ScriptedConditions
from edge_sdk.data import ArrayDataset, BatchStreamDataset
from edge_sdk.pool import TrainerPool
from edge_sdk.protocol import Route
from edge_sdk.transport import RetryPolicy
from tests.edge_sdk.loopback import CuttingProxy

GOOD = DeviceConditions(charging=True, battery=0.9, idle=True, unmetered=True,
                        free_memory_mb=2048.0, temperature_c=30.0)
UNPLUGGED = GOOD.replace(charging=False, battery=0.7)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


def _parts(digits: tuple[np.ndarray, np.ndarray], n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    x, y = digits
    return [(x[i], y[i]) for i in np.array_split(np.random.default_rng(0).permutation(len(x)), n)]


def _quick_sleep(seconds: float) -> None:
    # Real waits, shortened: the coordinator's pacing asks for seconds to minutes.
    time.sleep(min(seconds, 0.05))


def _task(coord: EmbeddedCoordinator, bundle: Path, **plan: Any) -> str:
    admin = coord.admin()
    bundle_id = admin.upload_bundle(bundle)["bundle_id"]
    full = {"rounds": 1, "goal": 1, "selection_window_s": 0.0, "round_deadline_s": 60.0, **plan}
    return str(admin.create_task(bundle_id, plan=full, name="client-test")["task_id"])


def _run_until(
    clients: list[Client], done: Callable[[], bool], timeout: float = 90.0
) -> dict[int, list[Outcome]]:
    """Run every client's loop in its own thread until ``done()``; outcomes per client."""
    stop = threading.Event()
    outcomes: dict[int, list[Outcome]] = {i: [] for i in range(len(clients))}
    threads = [
        threading.Thread(
            target=c.run_forever, args=(stop,), kwargs={"on_outcome": outcomes[i].append}
        )
        for i, c in enumerate(clients)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    try:
        while not done() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert done(), f"not done after {timeout} s: {outcomes}"
    return outcomes


def _completed(coord: EmbeddedCoordinator, task_id: str) -> Callable[[], bool]:
    admin = coord.admin()
    return lambda: admin.task(task_id)["state"] == "completed"


def _client(coord: EmbeddedCoordinator, state: Path, data: Any, conditions: Any = None,
            **kw: Any) -> Client:
    """A client of ``coord``, enrolled with its token."""
    return Client(coord.url, state_dir=state, data=data,
                  conditions=conditions or ScriptedConditions(GOOD), sleep=_quick_sleep,
                  config=ClientConfig(enrollment_token=coord.enrollment_token), **kw)


def test_round_completes_while_a_client_whose_conditions_lapse_aborts(
    coordinator: EmbeddedCoordinator, digits_bundle: Path, digits: Any, tmp_path: Path
) -> None:
    # goal 3, target ceil(3 x 1.34) = 5: four good devices and one that gets unplugged.
    task_id = _task(coordinator, digits_bundle, goal=3, over_selection=1.34,
                    recheck_every_steps=3, codec={"name": "int8"})
    parts = _parts(digits, 5)
    cache, pool = BundleCache(tmp_path / "cache"), TrainerPool()
    flipper_conditions = ScriptedConditions(GOOD)
    fx, fy = parts[0]

    def unplugged_mid_epoch() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(fx), 32):
            if start == 64:
                flipper_conditions.set(UNPLUGGED)  # the user pulls the plug after 2 batches
            yield fx[start : start + 32], fy[start : start + 32]

    flipper = _client(coordinator, tmp_path / "flipper",
                      BatchStreamDataset(unplugged_mid_epoch, num_examples=len(fx)),
                      flipper_conditions, cache=cache, trainers=pool)
    good = [_client(coordinator, tmp_path / f"good{i}", parts[i], cache=cache, trainers=pool)
            for i in range(1, 5)]
    # The abort only counts in the round if it lands before the goal's third report closes the
    # round (closing expires open assignments). Left to the scheduler, that is a race: the
    # clients share one pool, i.e. one trainer, so the flipper's training can queue behind
    # three whole good epochs. So the order is fixed: two good devices become candidates, the
    # flipper is the third, its check-in starts the round (window 0 s, all 3 of target 5
    # selected) and it trains and aborts within that call, before anyone has an assignment.
    assert [c.run_once().action for c in good[:2]] == ["wait", "wait"]
    first = flipper.run_once()
    assert first.action == ABORTED
    outcomes = _run_until([flipper, *good], _completed(coordinator, task_id))

    flips = [o for o in [first, *outcomes[0]] if o.action == ABORTED]
    assert len(flips) == 1 and flips[0].reasons == ("not charging",)
    assert all(o.action in ("ineligible", "wait") for o in outcomes[0] if o is not flips[0])
    record = coordinator.call(coordinator.service.store.get_assignment, flips[0].assignment_id)
    assert record.state == "aborted" and record.abort_reason.startswith("conditions_lapsed")

    (rnd,) = coordinator.admin().rounds(task_id)
    assert rnd["state"] == "committed" and rnd["metrics"]["reported"] >= 3
    assert rnd["metrics"]["aborted"] == 1
    trained = [o for i in range(1, 5) for o in outcomes[i] if o.action == TRAINED]
    assert len(trained) == rnd["metrics"]["reported"]
    # what the clients say they sent is what the coordinator received
    assert sum(o.metrics["bytes_up"] for o in trained) == rnd["metrics"]["bytes_in"]
    assert sum(o.metrics["num_examples"] for o in trained) == rnd["metrics"]["num_examples"]
    assert coordinator.admin().task(task_id)["model_version"] == 1


@pytest.mark.parametrize("mode", ["request", "response"])
def test_upload_cut_mid_way_is_retried_and_counted_once(
    coordinator: EmbeddedCoordinator, digits_bundle: Path, digits: Any, tmp_path: Path, mode: str
) -> None:
    task_id = _task(coordinator, digits_bundle, goal=1, codec={"name": "fp16"})
    sleeps: list[float] = []
    with CuttingProxy(coordinator.port, b"/update", mode=mode) as proxy:
        client = Client(proxy.url, state_dir=tmp_path / "dev", data=_parts(digits, 4)[0],
                        conditions=ScriptedConditions(GOOD), sleep=sleeps.append,
                        config=ClientConfig(retry=RetryPolicy(max_attempts=3),
                                            enrollment_token=coordinator.enrollment_token))
        outcome = client.run_once()
        while outcome.action == "wait":
            outcome = client.run_once()
        client.close()
    assert outcome.action == TRAINED, outcome
    uploads = [line for line in proxy.request_lines if b"/update" in line]
    assert len(uploads) == 2  # the broken attempt and its retry
    store = coordinator.service.store
    (rnd,) = coordinator.admin().rounds(task_id)
    assert rnd["state"] == "committed" and rnd["metrics"]["reported"] == 1
    assert coordinator.call(store.count_updates) == 1
    assert coordinator.admin().status()["updates_accepted"] == 1


def test_credential_is_kept_private_and_reused(
    coordinator: EmbeddedCoordinator, digits: Any, tmp_path: Path
) -> None:
    state = tmp_path / "dev"
    first = _client(coordinator, state, _parts(digits, 2)[0])
    assert first.run_once().action == "wait"  # no task yet
    creds = state / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    device_id = json.loads(creds.read_text())["device_id"]
    second = _client(coordinator, state, _parts(digits, 2)[0])
    assert second.run_once().action == "wait"
    assert second.device_id == device_id
    assert coordinator.admin().status()["devices_registered"] == 1


def test_registers_again_when_the_coordinator_forgot_the_device(
    coordinator: EmbeddedCoordinator, digits: Any, tmp_path: Path
) -> None:
    state = tmp_path / "dev"
    state.mkdir()
    (state / "credentials.json").write_text(json.dumps(
        {"coordinator": coordinator.url, "device_id": "d-gone", "secret": "stale"}))
    client = _client(coordinator, state, _parts(digits, 2)[0])
    assert client.run_once().action == "wait"
    assert client.device_id not in (None, "d-gone")
    assert coordinator.admin().status()["devices_registered"] == 1


def _forward(params: np.ndarray, manifest: Any, x: np.ndarray) -> np.ndarray:
    """The digits MLP in numpy, from the manifest's layout: an independent reference."""
    w = {p.name: params[p.offset : p.offset + p.size].reshape(p.shape) for p in manifest.parameters}
    hidden = np.maximum(x @ w["fc1.weight"].T + w["fc1.bias"], 0.0)
    return np.asarray(hidden @ w["fc2.weight"].T + w["fc2.bias"])


def test_evaluation_assignment_reports_metrics_of_the_current_model(
    coordinator: EmbeddedCoordinator, digits_bundle: Path, digits: Any, tmp_path: Path
) -> None:
    task_id = _task(coordinator, digits_bundle, goal=1)
    client = _client(coordinator, tmp_path / "dev", _parts(digits, 3)[0])
    _run_until([client], _completed(coordinator, task_id))
    coordinator.admin().evaluate(task_id)
    eval_x, eval_y = _parts(digits, 3)[1]
    evaluator = _client(coordinator, tmp_path / "eval", _parts(digits, 3)[0],
                        eval_data=ArrayDataset(eval_x, eval_y))
    outcome = evaluator.run_once()
    while outcome.action == "wait":
        outcome = evaluator.run_once()
    assert outcome.action == EVALUATED

    # reference: numpy forward pass of the model version the device was given
    frame = evaluator.transport.request(
        "GET", Route.VERSION_PARAMS.format(task_id=task_id, version="current")).body
    params = decode_update(frame)
    manifest = load_manifest(digits_bundle)
    logits = _forward(params, manifest, eval_x)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(eval_y)), eval_y].mean())
    accuracy = float((logits.argmax(axis=1) == eval_y).mean())
    assert outcome.metrics["num_examples"] == len(eval_y)
    assert outcome.metrics["loss"] == pytest.approx(loss, rel=1e-4)
    assert outcome.metrics["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    rounds = coordinator.admin().rounds(task_id)
    assert rounds[-1]["kind"] == "evaluate"


def test_topk_residual_is_kept_per_task_and_adds_up(
    coordinator: EmbeddedCoordinator, digits_bundle: Path, digits: Any, tmp_path: Path
) -> None:
    task_id = _task(coordinator, digits_bundle, goal=1,
                    codec={"name": "topk", "k": 100, "values": "fp32"})
    client = _client(coordinator, tmp_path / "dev", _parts(digits, 3)[0])
    outcomes = _run_until([client], _completed(coordinator, task_id))
    assert [o.action for o in outcomes[0]].count(TRAINED) == 1
    residual = np.load(tmp_path / "dev" / "residuals" / f"{task_id}.npy")
    start = decode_update(client.transport.request(
        "GET", Route.VERSION_PARAMS.format(task_id=task_id, version=0)).body)
    after = decode_update(client.transport.request(
        "GET", Route.VERSION_PARAMS.format(task_id=task_id, version=1)).body)
    sent = after - start  # FedAvg of one update with server lr 1: the decoded upload itself
    k = 100
    assert np.count_nonzero(sent) == k
    # error feedback: the kept part is exactly zero where a value was sent (fp32 values), holds
    # the rest of the delta elsewhere, and every kept value is smaller than every sent one
    assert np.all(residual[sent != 0] == 0)
    assert np.count_nonzero(residual) > k
    assert np.abs(sent).min(initial=np.inf, where=sent != 0) >= np.abs(residual).max()


def test_async_client_keeps_the_event_loop_responsive(
    coordinator: EmbeddedCoordinator, digits_bundle: Path, digits: Any, tmp_path: Path
) -> None:
    task_id = _task(coordinator, digits_bundle, goal=1, epochs=3)
    client = AsyncClient(coordinator.url, state_dir=tmp_path / "dev", data=_parts(digits, 2)[0],
                         conditions=ScriptedConditions(GOOD),
                         config=ClientConfig(enrollment_token=coordinator.enrollment_token))

    async def main() -> tuple[list[Outcome], int]:
        ticks = 0
        stop = asyncio.Event()

        async def heartbeat() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        beat = asyncio.create_task(heartbeat())
        outcomes = []
        for _ in range(20):
            outcomes.append(await client.run_once_async())
            if outcomes[-1].action == TRAINED:
                break
            await asyncio.sleep(0.02)
        stop.set()
        await beat
        return outcomes, ticks

    outcomes, ticks = asyncio.run(main())
    assert outcomes[-1].action == TRAINED
    assert ticks > 5  # the loop ran while the client worked in its thread
    assert coordinator.admin().task(task_id)["rounds_completed"] == 1
