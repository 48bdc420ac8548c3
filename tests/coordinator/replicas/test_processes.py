"""``fedge serve --processes 2`` on one SQLite file, driven as the benchmark drives it
(:class:`~coordinator.embedded.EmbeddedCoordinator` with ``processes``): devices on their own
connections reach both serving processes through one port, each process folds what it
acknowledges into its own partial sum (its replica id names its pid), and the round commits
numpy's FedAvg of every acknowledged update, also when one process is SIGKILLed mid-round
and the supervisor starts another."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.config import CoordinatorConfig, PacingConfig
from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.frame import decode_tensor
from fedge.cli import main
from fedge.supervisor import Supervisor
from tests.coordinator.replicas.fleet import (
    by_pid,
    fedavg,
    partial_rows,
    serving_children,
    shares,
    wait_for,
)
from tests.fixtures.coordinator import DeviceHTTP, select_devices

N = 64
GOAL = 16  # devices on their own connections: all on one process with chance 2**-15
WINDOW = 1.0
PLAN = {"rounds": 1, "goal": GOAL, "over_selection": 1.0, "min_reporting_fraction": 1.0,
        "selection_window_s": WINDOW, "round_deadline_s": 300.0, "robust": "none",
        "eligibility": {"require_charging": False}}  # fmt: skip


def _delta(seed: int) -> np.ndarray:
    return np.random.default_rng(4000 + seed).normal(0, 0.01, N).astype(np.float32)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[EmbeddedCoordinator]:
    with EmbeddedCoordinator(tmp_path / "fedge.db", subprocess=True, processes=2) as coord:
        assert coord.process is not None
        supervisor = coord.process.pid
        wait_for(lambda: len(serving_children(supervisor)) == 2, what="two serving processes")
        yield coord


def _round(coord: EmbeddedCoordinator, bundle: Path) -> tuple[str, list[tuple[DeviceHTTP, str]]]:
    admin = coord.admin()
    task_id = admin.create_task(admin.upload_bundle(bundle)["bundle_id"], PLAN)["task_id"]
    devices = [DeviceHTTP(coord) for _ in range(GOAL)]
    chosen = select_devices(devices, lambda: time.sleep(WINDOW + 0.5))
    assert len(chosen) == GOAL
    return task_id, chosen


def _upload(chosen: list[tuple[DeviceHTTP, str]], ks: range,
            sent: list[tuple[np.ndarray, float]]) -> None:  # fmt: skip
    for k in ks:
        d, assignment_id = chosen[k]
        status, body = d.upload(assignment_id, _delta(k), 3 + k)
        assert status == 200 and body["accepted"] is True, body
        sent.append((_delta(k), 3 + k))


def _committed(coord: EmbeddedCoordinator, task_id: str, device: DeviceHTTP,
               sent: list[tuple[np.ndarray, float]]) -> None:  # fmt: skip
    admin = coord.admin()
    wait_for(lambda: admin.task(task_id)["model_version"] == 1, what="the commit")
    base = decode_tensor(device.params(task_id, 0))
    got = decode_tensor(device.params(task_id, 1))
    np.testing.assert_allclose(got, base + fedavg(sent), rtol=1e-6, atol=1e-7)
    [rnd] = admin.rounds(task_id)
    assert rnd["state"] == "committed" and rnd["metrics"]["reported"] == len(sent)


def test_two_processes_share_the_port_and_commit_the_numpy_reference(
    node: EmbeddedCoordinator, tiny_bundle: Path
) -> None:
    assert node.process is not None
    children = serving_children(node.process.pid)
    task_id, chosen = _round(node, tiny_bundle)
    sent: list[tuple[np.ndarray, float]] = []
    _upload(chosen, range(GOAL - 1), sent)
    folded = by_pid(shares(str(node.db_path)))
    assert set(folded) == children  # both processes acknowledged uploads
    assert sum(folded.values()) == GOAL - 1
    _upload(chosen, range(GOAL - 1, GOAL), sent)
    _committed(node, task_id, chosen[0][0], sent)
    assert partial_rows(str(node.db_path)) == []  # folded into the version


@pytest.mark.slow
def test_sigkill_of_one_process_mid_round_loses_nothing_and_it_is_replaced(
    node: EmbeddedCoordinator, tiny_bundle: Path
) -> None:
    assert node.process is not None
    supervisor = node.process.pid
    task_id, chosen = _round(node, tiny_bundle)
    sent: list[tuple[np.ndarray, float]] = []
    _upload(chosen, range(GOAL // 2), sent)
    folded = by_pid(shares(str(node.db_path)))
    victim = max(folded, key=lambda pid: folded[pid])
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: (len(now := serving_children(supervisor)) == 2 and victim not in now),
             what="a new serving process")  # fmt: skip
    # Its acknowledged updates live on in its partial sum; devices it served reconnect.
    assert by_pid(shares(str(node.db_path)))[victim] == folded[victim]
    _upload(chosen, range(GOAL // 2, GOAL), sent)
    _committed(node, task_id, chosen[0][0], sent)
    # The supervisor killed too: its children do not serve on.
    survivors = serving_children(supervisor)
    node.kill()
    wait_for(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in survivors),
        what="the children's exit",
    )


def test_each_child_paces_for_every_process_sharing_the_devices(tmp_path: Path) -> None:
    pacing = PacingConfig(replicas=2)  # two such nodes behind one address
    node = Supervisor(CoordinatorConfig(db_path=str(tmp_path / "f.db"), processes=3,
                                        pacing=pacing))  # fmt: skip
    child = node._child_config()
    assert (child.processes, child.replica, child.pacing.replicas) == (1, True, 6)
    assert child.pacing.horizon_s == pacing.horizon_s


def test_several_processes_need_subprocess_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="subprocess mode"):
        EmbeddedCoordinator(tmp_path / "fedge.db", processes=2)


@pytest.mark.parametrize("shared", [False, True])  # True: as another supervisor binds it
def test_a_port_taken_by_another_program_is_refused_before_any_child_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], shared: bool
) -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(shared))
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--db", str(tmp_path / "f.db"), "--processes", "2",
                     "--port", port]) == 2  # fmt: skip
    assert f"cannot bind 127.0.0.1:{port}" in capsys.readouterr().err
