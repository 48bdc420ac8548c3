"""A fleet split over processes, and a fleet process without torch: real coordinator, real
HTTP, real ORT steps, each part a spawned interpreter."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.config import PacingConfig
from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.bundle import load_manifest
from edge_sdk.client import ClientConfig
from edge_sdk.codecs import decode_update
from fedge.fleet.clock import SimClock
from fedge.fleet.emulator import Fleet, FleetSummary
from fedge.fleet.heterogeneity import Heterogeneity
from fedge.fleet.processes import (
    Part,
    PartsFailed,
    ProcessFleet,
    merge_summaries,
    run_part,
)
from fedge.fleet.sources import DigitsPartitions

FAST_PACING = PacingConfig(min_retry_s=1.0, max_retry_s=30.0, no_task_retry_s=5.0)
GOAL = 4
FEDAVG: dict[str, object] = {"goal": GOAL, "over_selection": 1.0, "robust": "none",
          "server_optimizer": {"name": "fedavg"}, "selection_window_s": 2.0,
          "round_deadline_s": 120.0, "steps": 5, "batch_size": 16, "lr": 0.2,
          "codec": {"name": "fp32"}}


def _summary(**counts: int) -> FleetSummary:
    zero = {f.name: 0 for f in dataclasses.fields(FleetSummary)}
    return FleetSummary(**{**zero, **counts})


def test_merged_summary_adds_counts_and_keeps_the_worst_times() -> None:
    a = dataclasses.replace(_summary(devices=3, checkins=10, uploads_acknowledged=2),
                            wall_s=5.0, lag_p95_s=0.1, speedup=20.0)
    b = dataclasses.replace(_summary(devices=4, checkins=7, bytes_up=100),
                            wall_s=6.0, lag_p95_s=0.3, speedup=20.0)
    m = merge_summaries([a, b])
    assert (m.devices, m.checkins, m.uploads_acknowledged, m.bytes_up) == (7, 17, 2, 100)
    assert (m.wall_s, m.lag_p95_s, m.speedup) == (6.0, 0.3, 20.0)
    with pytest.raises(ValueError):
        merge_summaries([])


def test_a_part_whose_engine_fails_stops_its_devices(tmp_path: Path) -> None:
    """The engine's stop call raises (Ray's board not answering) after the part started: the
    part raises, and its fleet's devices do not go on running in the worker, which an engine
    may reuse."""
    part = Part(0, 0, 3, DigitsPartitions(3, "iid"), "http://127.0.0.1:9", SimClock().spec(),
                {"state_root": tmp_path})  # fmt: skip
    calls = []

    def stop() -> bool:
        calls.append(1)
        if len(calls) > 1:
            raise TimeoutError("the board did not answer")
        return False

    before = {t for t in threading.enumerate() if t.name == "fedge-fleet"}
    with pytest.raises(TimeoutError, match="board"):
        run_part(part, lambda _: None, stop)
    running = {t for t in threading.enumerate() if t.name == "fedge-fleet"} - before
    assert not running, running


class _SlowStartEngine:
    """Parts that report only ``start_s`` real seconds after their start (spawned
    interpreters importing ORT and loading data; Ray's start-up takes about 20 s)."""

    def __init__(self, start_s: float, fails: bool = False) -> None:
        self.start_s, self.fails = start_s, fails
        self.started = self.stopped = math.inf
        self.parts = 0

    def start(self, parts: Any) -> None:
        self.started, self.parts = time.monotonic(), len(parts)

    def _up(self) -> bool:
        return time.monotonic() - self.started >= self.start_s

    def latest(self) -> list[FleetSummary | None]:
        return [_summary(devices=1) if self._up() else None] * self.parts

    def alive(self) -> bool:
        return not (self.fails and self._up())

    def stop(self) -> list[FleetSummary]:
        self.stopped = time.monotonic()
        return [_summary(devices=1)] * self.parts


@pytest.mark.parametrize("start_s", [0.0, 1.5])
def test_the_duration_counts_from_when_every_part_runs(start_s: float) -> None:
    """``emulated_s`` is the devices' running time: before, a run of 10 emulated seconds at
    speedup 20 (half a real second) ended before a part that needed longer to start had
    run any device. A part that fails while starting ends the run at once."""
    engine = _SlowStartEngine(start_s)
    fleet = ProcessFleet("http://127.0.0.1:9", DigitsPartitions(4, "iid"), processes=2,
                         engine=engine, clock=SimClock(20.0))
    fleet.run(emulated_s=10.0, poll_s=0.01)
    assert engine.stopped - engine.started >= start_s + 0.5
    failing = _SlowStartEngine(1.0, fails=True)
    fleet = ProcessFleet("http://127.0.0.1:9", DigitsPartitions(4, "iid"), processes=2,
                         engine=failing, clock=SimClock(0.001))  # 10 s: 10,000 real ones
    fleet.run(emulated_s=10.0, poll_s=0.01)
    assert failing.stopped - failing.started < 30.0


def test_parts_are_the_devices_of_one_fleet(tmp_path: Path) -> None:
    """Cutting 10 devices into 3 parts covers each index once, in order, and each part's
    devices get the profiles a one-process fleet would give them."""
    model = Heterogeneity.realistic()
    fleet = ProcessFleet("http://127.0.0.1:9", DigitsPartitions(10, "iid"), processes=3,
                         heterogeneity=model, seed=4, state_root=tmp_path)
    covered = [i for p in fleet.parts for i in range(p.first, p.first + p.count)]
    assert covered == list(range(10))
    assert len({p.options["cache_root"] for p in fleet.parts}) == 3  # a cache per process
    for part in fleet.parts:
        # What run_part builds: profiles drawn at the global index.
        assert part.options["heterogeneity"] == model and part.options["seed"] == 4
    with pytest.raises(ValueError, match="holds 10 devices"):
        ProcessFleet("http://127.0.0.1:9", DigitsPartitions(10, "iid"), devices=11)
    with pytest.raises(ValueError):
        ProcessFleet("http://127.0.0.1:9", DigitsPartitions(10, "iid"), processes=0)


def test_a_part_starts_each_device_when_one_fleet_would(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Device i's first pass waits the same emulated delay in a part as in a one-process
    fleet. Before, the delays came from one generator seeded with the fleet's seed and drawn
    in the part's order, so a part starting at device 3 gave its devices the delays of
    devices 0, 1, ...: every part's first devices checked in together."""
    delays: dict[str, dict[int, float]] = {}

    async def record(fleet: Fleet, device: Any, executor: object, delay_s: float) -> None:
        delays.setdefault(str(fleet.state_root), {})[device.index] = delay_s

    monkeypatch.setattr(Fleet, "_device", record)
    data = DigitsPartitions(5, "iid")
    for name, first, count in (("whole", 0, 5), ("part", 3, 2)):
        with Fleet("http://127.0.0.1:9", data(first, count), seed=7, first_index=first,
                   state_root=tmp_path / name):
            pass
    whole, part = delays[str(tmp_path / "whole")], delays[str(tmp_path / "part")]
    assert len(set(whole.values())) == 5  # the spread is still a spread
    assert part == {3: whole[3], 4: whole[4]}


def test_a_part_killed_mid_run_is_reported_with_its_exit(tmp_path: Path) -> None:
    """A part's process dies without a word (SIGKILL, the OOM killer): the fleet stops being
    alive, stop() returns at once and says which part ended and how. Before, the reason was
    empty: "fleet parts [1] failed: "."""
    fleet = ProcessFleet("http://127.0.0.1:9", DigitsPartitions(4, "iid"), processes=2,
                         state_root=tmp_path)
    fleet.start()
    try:
        assert fleet.wait_for(lambda: all(s is not None for s in fleet.engine.latest()), 60)
        victim = fleet.engine._procs[1]  # type: ignore[attr-defined]
        os.kill(victim.pid, signal.SIGKILL)
        assert fleet.wait_for(lambda: False, 30) is False and not fleet.alive()
    finally:
        with pytest.raises(PartsFailed) as failed:
            fleet.stop()
    assert str(failed.value) == (
        "fleet parts [1] failed: part 1: its process ended without a final summary "
        "(killed by signal 9)"
    )


def test_a_state_dir_holds_each_device_where_any_split_finds_it(tmp_path: Path) -> None:
    """Device i keeps its state directory (its credential) under a state root whatever the
    number of parts, as it keeps its profile and data; only the bundle caches are per part
    (a cache serves one process). Before, part k kept its devices under part-k/: a fleet run
    again over another number of processes found none of its devices' credentials and
    registered every device a second time (a different population on the coordinator)."""
    url, data = "http://127.0.0.1:9", DigitsPartitions(5, "iid")
    one = Fleet(url, data(0, 5), state_root=tmp_path)
    expected = [d.client.state.root for d in one.devices]
    caches = {one.cache.root}
    for processes in (2, 3):
        for part in ProcessFleet(url, data, processes=processes, state_root=tmp_path).parts:
            fleet = Fleet(url, data(part.first, part.count), clock=SimClock(*part.clock),
                          first_index=part.first, **part.options)
            assert [d.client.state.root for d in fleet.devices] == \
                expected[part.first : part.first + part.count]
            caches.add(fleet.cache.root)
    assert len(caches) == 1 + 3  # the one fleet's, one per part index (0, 1, 2)


@pytest.mark.slow
def test_a_fleet_over_two_processes_trains_a_fedavg_task(digits_bundle: Path) -> None:
    """Two spawned parts of one fleet on the coordinator's emulated clock complete a plain
    FedAvg task; every acknowledged upload is one the coordinator counted, and the committed
    model moved."""
    clock = SimClock(speedup=20.0)
    with EmbeddedCoordinator(clock=clock.unix(), pacing=FAST_PACING, seed=0) as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(digits_bundle)["bundle_id"]
        task_id = admin.create_task(bundle_id, {**FEDAVG, "rounds": 3})["task_id"]
        fleet = ProcessFleet(
            coord.url, DigitsPartitions(8, "dirichlet:1.0"), processes=2, clock=clock,
            client_config=ClientConfig(backend="ort-step",
                                       enrollment_token=coord.enrollment_token),
        )
        with fleet:
            done = fleet.wait_for(lambda: admin.task(task_id)["state"] == "completed", 180)
        summary = fleet.summary()
        fleet.close()
        assert done, admin.task(task_id)
        rounds = [r for r in admin.rounds(task_id) if r["kind"] == "train"]
        reported = sum(r["metrics"]["reported"] for r in rounds if r["state"] == "committed")
        assert summary.devices == 8 and summary.failures == 0
        # The coordinator is the reference; the fleet's count is at least the first two rounds'
        # (the stop may cut the last round's passes short of recording their outcome).
        assert reported == 3 * GOAL and summary.uploads_acknowledged >= 2 * GOAL
        assert GOAL <= summary.devices_registered <= 8
        # Devices of both parts took part: part 1 holds devices 4..7.
        assert summary.checkins > 8
        n = load_manifest(digits_bundle).num_parameters
        v0, v3 = (decode_update(coord.call(coord.service.version_params, None, task_id, v),
                                expected_length=n) for v in ("0", "3"))
        assert np.all(np.isfinite(v3)) and not np.allclose(v0, v3)


_CHILD = textwrap.dedent("""
    import json, sys
    from edge_sdk.client import ClientConfig
    from fedge.fleet.clock import SimClock
    from fedge.fleet.emulator import Fleet
    from fedge.fleet.sources import DigitsPartitions

    url, token, speedup, start, origin = sys.argv[1:6]
    fleet = Fleet(url, DigitsPartitions(6, "iid")(0, 6),
                  clock=SimClock(float(speedup), float(start), float(origin)),
                  client_config=ClientConfig(backend="ort-step", enrollment_token=token))
    summary = fleet.run(until=lambda: fleet.summary().uploads_acknowledged >= 4,
                        timeout_s=120)
    fleet.close()
    print(json.dumps({"torch": "torch" in sys.modules,
                      "onnxruntime": "onnxruntime" in sys.modules,
                      "training": "onnxruntime.training" in sys.modules,
                      "uploads": summary.uploads_acknowledged}))
""")


@pytest.mark.slow
def test_a_fleet_process_trains_without_importing_torch(digits_bundle: Path) -> None:
    clock = SimClock(speedup=20.0)
    with EmbeddedCoordinator(clock=clock.unix(), pacing=FAST_PACING, seed=0) as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(digits_bundle)["bundle_id"]
        admin.create_task(bundle_id, {**FEDAVG, "rounds": 2})
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, coord.url, str(coord.enrollment_token),
             *map(str, clock.spec())],
            capture_output=True, text=True, timeout=180, check=True,
            cwd=Path(__file__).resolve().parents[3],
        )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # It really trained (ORT loaded, uploads acknowledged) and never loaded torch.
    assert result["uploads"] >= 4 and result["onnxruntime"]
    assert not result["torch"] and not result["training"]


def test_the_sim_clock_reads_the_same_time_from_its_spec() -> None:
    clock = SimClock(speedup=50.0, start=100.0)
    twin = SimClock(*clock.spec())
    assert abs(twin.now() - clock.now()) < 0.5  # 10 ms of real time apart at most
    assert twin.speedup == 50.0
    assert np.isclose(SimClock(*clock.spec()).spec()[2], clock.spec()[2])
