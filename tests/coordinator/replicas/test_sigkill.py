"""Replicas as ``fedge serve --replica`` processes on the system clock, killed with SIGKILL:
one in the middle of a round (its acknowledged updates live on in its partial sum), and the
one closing the round, holding its lock (the others take the round over). Nothing
acknowledged is lost: the committed version is the numpy reference of every one of them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pytest

from coordinator.admin import AdminClient
from edge_sdk.frame import decode_tensor
from tests.coordinator.replicas.fleet import (
    ServedReplica,
    Spread,
    fedavg,
    serve_replica,
    shares,
    start_task,
    wait_for,
)
from tests.fixtures.coordinator import HttpConnection, select_devices

pytestmark = pytest.mark.slow

N = 64
WINDOW = 1.0
PLAN = {"rounds": 1, "goal": 6, "over_selection": 1.0, "min_reporting_fraction": 1.0,
        "selection_window_s": WINDOW, "round_deadline_s": 300.0, "robust": "none",
        "eligibility": {"require_charging": False}}  # fmt: skip


def _delta(seed: int) -> np.ndarray:
    return np.random.default_rng(3000 + seed).normal(0, 0.01, N).astype(np.float32)


def _round(reps: list[ServedReplica], tiny_bundle: Path) -> tuple[AdminClient, str, list[Spread],
                                                                   list[str]]:  # fmt: skip
    admin, task_id, devices = start_task([r.url for r in reps], tiny_bundle, PLAN, 6)
    chosen = select_devices(devices, lambda: time.sleep(WINDOW + 0.5))
    assert [d for d, _ in chosen] == devices
    return admin, task_id, devices, [aid for _, aid in chosen]


def _only(devices: list[Spread], urls: list[str]) -> None:
    """The load balancer's health check dropped the dead replica."""
    for d in devices:
        d.close()
        d.conns = [HttpConnection(u) for u in urls]


def test_sigkill_mid_round_loses_no_acknowledged_update(
    replica_db: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    blobs = tmp_path / "blobs"
    with ExitStack() as stack:
        reps = [stack.enter_context(serve_replica(replica_db, blobs, tmp_path / f"r{i}.log"))
                for i in range(3)]  # fmt: skip
        admin, task_id, devices, chosen = _round(reps, tiny_bundle)
        base = decode_tensor(devices[0].params(task_id, 0))
        sent = []
        for k in range(3):  # one acknowledged by each replica
            status, body = devices[k].to(k).upload(chosen[k], _delta(k), 4 + k)
            assert status == 200 and body["accepted"], body
            sent.append((_delta(k), 4 + k))
        assert sorted(shares(replica_db).values()) == [1, 1, 1]
        reps[1].kill()
        _only(devices, [reps[0].url, reps[2].url])
        for k in range(3, 6):
            status, body = devices[k].upload(chosen[k], _delta(k), 4 + k)
            assert status == 200 and body["accepted"], body
            sent.append((_delta(k), 4 + k))
        wait_for(lambda: admin.task(task_id)["model_version"] == 1, what="the commit")
        got = decode_tensor(devices[0].params(task_id, 1))
        np.testing.assert_allclose(got, base + fedavg(sent), rtol=1e-6, atol=1e-7)
        assert admin.rounds(task_id)[0]["metrics"]["reported"] == 6


@contextmanager
def _dying_and_two_others(
    replica_db: str, tmp_path: Path
) -> Iterator[tuple[ServedReplica, list[ServedReplica]]]:
    """A replica that dies as it starts a close or commit, and two that tick slowly (so that
    the dying one closes first), on one database and blob directory."""
    blobs = tmp_path / "blobs"
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps({"tick_interval_s": 3.0}))
    with ExitStack() as stack:
        dying = stack.enter_context(serve_replica(
            replica_db, blobs, tmp_path / "dying.log", "tests.coordinator.replicas.dying_replica"
        ))  # fmt: skip
        others = [stack.enter_context(serve_replica(replica_db, blobs, tmp_path / f"r{i}.log",
                                                    "fedge.cli", "--config", str(slow)))
                  for i in range(2)]  # fmt: skip
        yield dying, others


def test_sigkill_of_the_replica_closing_the_round(
    replica_db: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """The last upload goes to a replica that dies as it starts the close, before it answers:
    the device resends it to another replica (a replay), which closes the round once the
    dead one's transaction is gone."""
    with _dying_and_two_others(replica_db, tmp_path) as (dying, others):
        reps = [dying, *others]
        admin, task_id, devices, chosen = _round(reps, tiny_bundle)
        base = decode_tensor(devices[0].params(task_id, 0))
        sent = []
        for k in range(5):
            status, body = devices[k].to(1 + k % 2).upload(chosen[k], _delta(k), 4 + k)
            assert status == 200, body
            sent.append((_delta(k), 4 + k))
        with pytest.raises(ConnectionError):
            devices[5].to(0).upload(chosen[5], _delta(5), 9, key="last")
        sent.append((_delta(5), 9))
        wait_for(lambda: not dying.alive(), what="the closing replica's death")
        assert dying.process.returncode == -9
        _only(devices, [r.url for r in others])
        status, body = devices[5].upload(chosen[5], _delta(5), 9, key="last")
        assert status == 200 and body["accepted"], body  # stored before the close began
        wait_for(lambda: admin.task(task_id)["model_version"] == 1, what="the takeover")
        got = decode_tensor(devices[0].params(task_id, 1))
        np.testing.assert_allclose(got, base + fedavg(sent), rtol=1e-6, atol=1e-7)
        rounds = admin.rounds(task_id)
        assert [r["state"] for r in rounds] == ["committed"]
        assert rounds[0]["metrics"]["reported"] == 6


def test_sigkill_of_the_replica_committing_an_async_buffer(
    replica_db: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """The K-th update of a buffer goes to a replica that dies as it starts the commit; the
    others commit the buffer (every replica's partial buffer, the dead one's included)."""
    plan = {"rounds": 1, "buffer_k": 4, "max_concurrency": 4, "round_deadline_s": 300.0,
            "robust": "none", "eligibility": {"require_charging": False}}  # fmt: skip
    with _dying_and_two_others(replica_db, tmp_path) as (dying, others):
        urls = [r.url for r in (dying, *others)]
        admin, task_id, devices = start_task(urls, tiny_bundle, plan, 4, "async")
        aids = [d.check_in()["assignment"]["assignment_id"] for d in devices]
        base = decode_tensor(devices[0].params(task_id, 0))
        sent = []
        for k in range(3):
            assert devices[k].to(k).upload(aids[k], _delta(k), 4 + k)[0] == 200
            sent.append((_delta(k), 4 + k))
        with pytest.raises(ConnectionError):
            devices[3].to(0).upload(aids[3], _delta(3), 9, key="last")
        sent.append((_delta(3), 9))
        wait_for(lambda: not dying.alive(), what="the committing replica's death")
        _only(devices, [r.url for r in others])
        status, body = devices[3].upload(aids[3], _delta(3), 9, key="last")
        assert status == 200 and body["accepted"], body
        wait_for(lambda: admin.task(task_id)["model_version"] == 1, what="the takeover")
        got = decode_tensor(devices[0].params(task_id, 1))
        np.testing.assert_allclose(got, base + fedavg(sent), rtol=1e-6, atol=1e-7)
        assert admin.task(task_id)["state"] == "completed"
