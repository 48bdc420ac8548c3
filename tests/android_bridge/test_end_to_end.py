"""End to end: a JVM process running the Kotlin client joins a real coordinator's rounds next
to Python SDK clients, over HTTP on loopback, in a sync task with int8 uploads and then an async
(FedBuff) task with top-k uploads. Every committed version must equal the numpy reference
computed from exactly the updates the coordinator acknowledged (decoded from the bytes each
client sent), the JVM client's included."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.config import PacingConfig
from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.client import Client, ClientConfig
from edge_sdk.codecs import decode_update
from edge_sdk.conditions import DeviceConditions, ScriptedConditions
from edge_sdk.frame import decode_tensor
from edge_sdk.protocol import device_auth_header
from edge_sdk.transport import Response, Transport
from fedge.bundle_cache import digits_bundle
from fedge.fleet.datasets import load_digits
from tests.android_bridge.jvm import KotlinTools, write_raw_data
from tests.fixtures.coordinator import HttpConnection

pytestmark = pytest.mark.slow

# Short waits: the test's devices come back within a second or two.
PACING = PacingConfig(
    min_retry_s=0.3, max_retry_s=1.5, no_task_retry_s=0.5, selection_return_spread_s=0.5
)
# "robust": "none": plain (undefended) FedAvg, so that numpy can recompute every version.
COMMON_PLAN: dict[str, Any] = {"steps": 4, "batch_size": 16, "lr": 0.05, "round_deadline_s": 60.0,
                               "robust": "none"}  # fmt: skip
GOOD = DeviceConditions(charging=True, battery=0.9, idle=True, unmetered=True)


@dataclass(frozen=True)
class Ack:
    """An update the coordinator acknowledged (200): who sent it, its bytes and the answer."""

    sender: str
    frame: bytes
    num_examples: int
    answer: Mapping[str, Any]


class RecordingTransport(Transport):
    """The SDK transport, noting every acknowledged update upload."""

    def __init__(self, url: str, sender: str, acks: list[Ack], lock: threading.Lock) -> None:
        super().__init__(url)
        self._sender, self._acks, self._lock = sender, acks, lock

    def request(self, method: str, path: str, *, body: bytes = b"",
                headers: Mapping[str, str] | None = None) -> Response:  # fmt: skip
        response = super().request(method, path, body=body, headers=headers)
        if method == "POST" and path.endswith("/update"):
            report = json.loads((headers or {})["X-Fedge-Report"])
            with self._lock:
                self._acks.append(Ack(self._sender, body, int(report["num_examples"]),
                                      response.json()))  # fmt: skip
        return response


def _jvm_acks(log: Path) -> list[Ack]:
    acks: list[Ack] = []
    if not log.exists():  # the JVM is still starting
        return acks
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry["action"] == "trained":
            frame = base64.b64decode(entry["frame_b64"])
            acks.append(Ack("jvm", frame, int(entry["metrics"]["num_examples"]), entry["answer"]))
    return acks


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


@pytest.fixture
def fleet(kotlin_tools: KotlinTools, tmp_path: Path) -> Iterator[dict[str, Any]]:
    train, _ = load_digits(seed=0)
    parts = np.array_split(np.random.default_rng(0).permutation(len(train.y)), 3)
    with EmbeddedCoordinator(tmp_path / "fedge.db", pacing=PACING, seed=7) as coord:
        acks: list[Ack] = []
        lock = threading.Lock()
        stop = threading.Event()
        clients = []
        for i in (1, 2):
            url = coord.url
            client = Client(
                url,
                state_dir=tmp_path / f"py{i}",
                data=(train.x[parts[i]], train.y[parts[i]]),
                conditions=ScriptedConditions(GOOD),
                config=ClientConfig(
                    backend="ort-step",
                    enrollment_token=coord.enrollment_token,
                    seed=i,
                    after_assignment_s=0.2,
                ),
                sleep=lambda s: time.sleep(min(s, 1.0)),
                transport=RecordingTransport(url, f"py{i}", acks, lock),
            )
            clients.append(client)
        threads = [
            threading.Thread(target=c.run_forever, kwargs={"stop": stop.is_set}, daemon=True)
            for c in clients
        ]
        data = write_raw_data(tmp_path / "jvm-data", train.x[parts[0]], train.y[parts[0]])
        stop_file, log = tmp_path / "jvm.stop", tmp_path / "jvm.jsonl"
        jvm = kotlin_tools.popen(
            "device", "--coordinator", coord.url, "--state", str(tmp_path / "jvm-state"),
            "--data", str(data), "--enrollment-token", str(coord.enrollment_token),
            "--seed", "3", "--stop-file", str(stop_file), "--log", str(log),
            "--max-wait-s", "1.5",
            log=tmp_path / "jvm.out",
        )  # fmt: skip
        for t in threads:
            t.start()
        try:
            yield {"coord": coord, "acks": acks, "lock": lock, "jvm_log": log,
                   "jvm_state": tmp_path / "jvm-state", "jvm": jvm, "clients": clients}  # fmt: skip
        finally:
            stop.set()
            stop_file.touch()
            try:
                jvm.wait(timeout=60)
            except Exception:
                jvm.kill()
            for t in threads:
                t.join(timeout=30)
            for c in clients:
                c.close()


def _run_task(fleet: dict[str, Any], mode: str, plan: dict[str, Any]) -> tuple[str, list[Ack]]:
    """Create the task, wait until it completes; the acknowledged updates made meanwhile (tasks
    run one after the other, so these are the task's own)."""
    coord = fleet["coord"]
    admin = coord.admin()
    with fleet["lock"]:
        py_before = len(fleet["acks"])
    jvm_before = len(_jvm_acks(fleet["jvm_log"]))
    bundle_id = admin.upload_bundle(digits_bundle())["bundle_id"]
    task_id = admin.create_task(bundle_id, {**COMMON_PLAN, **plan}, mode=mode)["task_id"]
    _wait_for(lambda: admin.task(task_id)["state"] == "completed", 240, f"{mode} task to complete")
    time.sleep(2.0)  # the JVM's log line for its last upload
    with fleet["lock"]:
        py = fleet["acks"][py_before:]
    acks = py + _jvm_acks(fleet["jvm_log"])[jvm_before:]
    return task_id, [a for a in acks if a.answer.get("accepted")]


def _params(fleet: dict[str, Any], task_id: str, version: int) -> np.ndarray:
    """A version's parameters, read with a Python client's device credential."""
    creds = fleet["clients"][0].transport.credentials
    http = HttpConnection(fleet["coord"].url)
    status, _, data = http.request(
        "GET", f"/v1/tasks/{task_id}/versions/{version}/params",
        headers={"Authorization": device_auth_header(*creds)},
    )  # fmt: skip
    http.close()
    assert status == 200, data
    return decode_tensor(data)


def _deltas(acks: list[Ack], n: int) -> list[np.ndarray]:
    return [decode_update(a.frame, expected_length=n).astype(np.float64) for a in acks]


def test_jvm_client_joins_sync_int8_and_async_topk_rounds(fleet: dict[str, Any]) -> None:
    coord = fleet["coord"]
    admin = coord.admin()

    # -- sync, int8: every round needs all three devices (goal 3, no over-selection) ----------
    sync_plan = {
        "rounds": 3,
        "goal": 3,
        "over_selection": 1.0,
        "selection_window_s": 1.5,
        "selection_timeout_s": 60.0,
        "codec": {"name": "int8", "bits": 8, "block": 64},
    }
    task_id, acks = _run_task(fleet, "sync", sync_plan)
    rounds = [r for r in admin.rounds(task_id) if r["state"] == "committed"]
    assert len(rounds) == 3
    for r in rounds:
        mine = [a for a in acks if a.answer["round"] == r["round"] and
                a.answer["model_version"] == r["base_version"]]  # fmt: skip
        assert len(mine) == r["metrics"]["reported"] == 3
        assert {a.sender for a in mine} == {"jvm", "py1", "py2"}
        base = _params(fleet, task_id, r["base_version"]).astype(np.float64)
        n = np.array([a.num_examples for a in mine], float)
        deltas = _deltas(mine, base.size)
        expected = (base + sum(w * d for w, d in zip(n, deltas, strict=True)) / n.sum())
        np.testing.assert_allclose(
            _params(fleet, task_id, r["metrics"]["model_version"]), expected.astype(np.float32),
            rtol=1e-6, atol=1e-7,
        )  # fmt: skip

    # -- async (FedBuff), top-k with error feedback: versions every 2 accepted updates --------
    async_plan = {"rounds": 4, "buffer_k": 2, "max_concurrency": 3,
                  "codec": {"name": "topk", "fraction": 0.1}}  # fmt: skip
    task_id, acks = _run_task(fleet, "async", async_plan)
    ours = [a for a in acks if a.answer.get("round") is not None]
    history = admin.rounds(task_id)
    committed = [r for r in history if r["state"] == "committed"]
    assert [r["metrics"]["model_version"] for r in committed] == [1, 2, 3, 4]
    jvm_versions = set()
    coord = fleet["coord"]
    store = coord.service.store
    round_ids = {x.number: x.round_id for x in coord.call(store.list_rounds, task_id)}
    for r in committed:
        version = r["metrics"]["model_version"]
        # The buffer an update was folded into is the coordinator's record (an answer names
        # the assignment's round, and an update can land in a later buffer than that).
        rid = round_ids[r["round"]]
        stored = coord.call(lambda rid=rid: list(store.round_updates(rid)))
        shas = {u.payload_sha for u in stored}
        folded = [a for a in ours if hashlib.sha256(a.frame).hexdigest() in shas]
        assert len(folded) == len(stored) == 2, [(a.sender, a.answer) for a in ours]
        staleness = np.array([version - 1 - a.answer["model_version"] for a in folded], float)
        w = np.array([a.num_examples for a in folded], float) / np.sqrt(1.0 + staleness)
        base = _params(fleet, task_id, version - 1).astype(np.float64)
        deltas = _deltas(folded, base.size)
        expected = base + sum(wi * d for wi, d in zip(w, deltas, strict=True)) / w.sum()
        np.testing.assert_allclose(_params(fleet, task_id, version), expected.astype(np.float32),
                                   rtol=1e-6, atol=1e-7)  # fmt: skip
        if any(a.sender == "jvm" for a in folded):
            jvm_versions.add(version)
    assert jvm_versions, "the JVM client's top-k updates made no version"
    # top-k kept what it did not send: the residual the JVM client stores between rounds
    residual = fleet["jvm_state"] / "residuals" / f"{task_id}.f32frame"
    assert residual.is_file() and np.abs(decode_update(residual.read_bytes())).sum() > 0
