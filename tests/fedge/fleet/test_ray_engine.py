"""The fleet's parts as Ray tasks: the same fleet as on spawned processes (real coordinator,
real HTTP, real ORT steps, a private local Ray), a part that fails, two nodes of the caller's
Ray, the clock across hosts, and what the engine refuses (``fedge fleet --engine`` runs and
option errors: tests/fedge/commands/test_fleet.py)."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.config import PacingConfig
from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.client import ClientConfig
from fedge.cli import main
from fedge.fleet.clock import SimClock
from fedge.fleet.emulator import FleetSummary
from fedge.fleet.processes import Engine, ProcessEngine, ProcessFleet, merge_summaries
from fedge.fleet.ray_engine import ClockError, ClusterError, HostClock, RayEngine
from fedge.fleet.sources import DigitsPartitions, NpzPartitions
from tests.fixtures.requirements import unavailable

FAST_PACING = PacingConfig(min_retry_s=1.0, max_retry_s=30.0, no_task_retry_s=5.0)
GOAL, ROUNDS, DEVICES = 4, 2, 24
FEDAVG: dict[str, object] = {"goal": GOAL, "rounds": ROUNDS, "over_selection": 1.0,
                             "robust": "none", "server_optimizer": {"name": "fedavg"},
                             "selection_window_s": 2.0, "round_deadline_s": 120.0, "steps": 5,
                             "batch_size": 16, "lr": 0.2, "codec": {"name": "fp32"}}
# Light on a shared 2-core machine: two logical CPUs (the private Ray the engine starts has
# an 80 MB object store and no dashboard).
LOCAL_RAY = {"num_cpus": 2}


def _needs_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        unavailable("Ray is not installed (the cluster extra: pip install -e '.[cluster]')")


def _ray_engine() -> RayEngine:
    _needs_ray()
    return RayEngine(**LOCAL_RAY, stop_timeout_s=60.0)


def _device_ids(state_root: Path) -> dict[str, int]:
    """Coordinator device id -> global device index, from the devices' own credential files
    (``device-IIIII/credentials.json``, whichever part ran it): which device registered, seen
    from the device."""
    ids = {}
    for creds in state_root.glob("device-*/credentials.json"):
        ids[json.loads(creds.read_text())["device_id"]] = int(creds.parent.name.split("-")[1])
    return ids


def _run_fleet(engine: Engine, digits_bundle: Path, state_root: Path) -> dict[str, Any]:
    """One fleet of DEVICES devices in 2 parts on ``engine`` until the FedAvg task completes;
    what the coordinator and the devices' state directories say about it."""
    clock = SimClock(speedup=20.0)
    source = DigitsPartitions(DEVICES, "dirichlet:0.5", seed=3)
    with EmbeddedCoordinator(clock=clock.unix(), pacing=FAST_PACING, seed=0) as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(digits_bundle)["bundle_id"]
        task_id = admin.create_task(bundle_id, FEDAVG)["task_id"]
        fleet = ProcessFleet(
            coord.url, source, processes=2, engine=engine, clock=clock, state_root=state_root,
            client_config=ClientConfig(backend="ort-step",
                                       enrollment_token=coord.enrollment_token),
        )
        with fleet:
            done = fleet.wait_for(
                lambda: admin.task(task_id)["state"] == "completed"
                and admin.status()["devices_registered"] == DEVICES, 150)
        summary = fleet.summary()
        parts = engine.latest()
        assert done, admin.task(task_id)
        store = coord.service.store
        committed = coord.call(lambda: [r.round_id for r in store.list_rounds(task_id)
                                        if r.kind == "train" and r.state == "committed"])
        updates = coord.call(lambda: [u for r in committed for u in store.round_updates(r)])
        registered = admin.status()["devices_registered"]
    ids = _device_ids(state_root)
    sizes = [len(d.y) for d in source(0, DEVICES)]
    return {
        "summary": summary, "parts": parts, "registered": registered,
        "indices": sorted(ids.values()), "rounds": len(committed),
        # Each accepted update's example count against the data the device of that index holds.
        "examples": [(u.num_examples, sizes[ids[u.device_id]]) for u in updates],
        "updates": len(updates),
    }


@pytest.mark.slow
def test_ray_runs_the_fleet_the_processes_run(digits_bundle: Path, tmp_path: Path) -> None:
    ray_run = _run_fleet(_ray_engine(), digits_bundle, tmp_path / "ray")
    proc_run = _run_fleet(ProcessEngine(), digits_bundle, tmp_path / "processes")
    import ray

    assert not ray.is_initialized()  # the engine started its own Ray and shut it down
    for run in (ray_run, proc_run):
        summary: FleetSummary = run["summary"]
        # Every device of both parts registered, as itself: its state directory holds the
        # credentials of a device the coordinator counts.
        assert run["registered"] == DEVICES and run["indices"] == list(range(DEVICES))
        assert run["rounds"] == ROUNDS and run["updates"] == ROUNDS * GOAL
        got, want = zip(*run["examples"], strict=True)
        assert got == want  # device i trained on device i's data, whichever part held it
        # The parts' own finals add up to the fleet's summary, split as the fleet was cut.
        finals = run["parts"]
        assert [s.devices for s in finals] == [DEVICES // 2, DEVICES // 2]
        assert merge_summaries(finals) == summary
        assert summary.failures == 0 and summary.devices_registered == DEVICES
        # Acknowledged by the coordinator (which may hold a last upload the stop cut short of
        # being recorded by its device).
        assert GOAL <= summary.uploads_acknowledged <= run["updates"]
    assert ray_run["rounds"] == proc_run["rounds"] and ray_run["indices"] == proc_run["indices"]


@pytest.mark.slow
def test_a_failing_part_ends_the_fleet_and_stop_names_it(
    coordinator: EmbeddedCoordinator, tmp_path: Path,
) -> None:
    data = tmp_path / "partitions"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        np.savez(data / f"device-{i}.npz", x=rng.normal(size=(10, 64)).astype(np.float32),
                 y=rng.integers(0, 10, 10))
    (data / "device-6.npz").write_bytes(b"not an npz")  # in part 1 (devices 4..7) only
    fleet = ProcessFleet(coordinator.url, NpzPartitions(data, num_classes=10), processes=2,
                         engine=_ray_engine(), enrollment_token=coordinator.enrollment_token)
    fleet.start()
    fleet.wait_for(lambda: not fleet.alive(), 60)
    assert not fleet.alive()  # part 1's task ended on its own
    with pytest.raises(RuntimeError, match=r"fleet parts \[1\] failed: part 1: SourceError.*"
                                           r"device-6\.npz"):
        fleet.stop()
    import ray

    assert not ray.is_initialized()


@pytest.mark.slow
def test_parts_on_two_nodes_of_the_callers_ray(
    coordinator: EmbeddedCoordinator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Ray of two nodes (two raylets of one CPU each, on this host: Ray's own test cluster)
    that the caller started: each part holds one node's CPU, every device registers, and the
    engine leaves the caller's Ray running."""
    _needs_ray()
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 80 * 1024**2, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=80 * 1024**2)
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        fleet = ProcessFleet(coordinator.url, DigitsPartitions(8, "iid"), processes=2,
                             engine=RayEngine(), state_root=tmp_path,
                             enrollment_token=coordinator.enrollment_token)
        with fleet:
            assert fleet.wait_for(
                lambda: coordinator.admin().status()["devices_registered"] == 8, 60)
            # Two parts of one CPU on two one-CPU nodes: one part on each. Ray's view of the
            # free resources follows the raylets' reports, so it may lag the placement.
            assert fleet.wait_for(lambda: ray.available_resources().get("CPU", 0.0) == 0.0, 30)
        assert ray.is_initialized()  # the caller's Ray: the engine did not shut it down
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert sorted(_device_ids(tmp_path).values()) == list(range(8))
    assert fleet.summary().devices_registered == 8


@pytest.mark.slow
def test_busy_cpus_and_another_cluster_s_address_are_refused_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The caller's Ray (2 CPUs, one held by an actor of theirs): a fleet of two one-CPU
    parts is refused at start, naming the CPUs needed and free, whether the engine is given
    no address, the cluster's own or a loopback name of it; an address of another cluster
    is refused as such (not ignored). Nothing is submitted, the caller's Ray and actor
    stay."""
    _needs_ray()
    import ray

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=80 * 1024**2)  # fmt: skip
    try:

        @ray.remote(num_cpus=1)
        class Busy:
            def ping(self) -> int:
                return 1

        busy = Busy.remote()  # type: ignore[attr-defined]
        assert ray.get(busy.ping.remote()) == 1
        # Ray's view of the free resources follows the nodes' reports a moment later.
        deadline = time.monotonic() + 30.0
        while ray.available_resources().get("CPU", 0.0) != 1.0:
            assert time.monotonic() < deadline, ray.available_resources()
            time.sleep(0.05)
        gcs = ray.get_runtime_context().gcs_address
        port = gcs.rpartition(":")[2]

        def start(engine: RayEngine) -> None:
            fleet = ProcessFleet("http://127.0.0.1:9", DigitsPartitions(4, "iid"),
                                 processes=2, engine=engine)  # fmt: skip
            fleet.start()

        for address in (None, gcs, f"127.0.0.1:{port}"):
            with pytest.raises(ClusterError, match=r"2 parts of 1 CPUs need 2 CPUs; only 1 "
                                                   r"of the Ray cluster's 2 are free"):
                start(RayEngine(address, stop_timeout_s=5.0))
        other = f"127.0.0.1:{int(port) + 1}"
        with pytest.raises(ClusterError, match=f"already initialised in this process, on the "
                                               f"cluster at {gcs}, not at {other}"):
            start(RayEngine(other, stop_timeout_s=5.0))
        assert ray.is_initialized() and ray.get(busy.ping.remote()) == 1
        assert ray.available_resources().get("CPU", 0.0) == 1.0  # no part holds one
    finally:
        ray.shutdown()


# -- refusals: the clock across hosts, a cluster too small or not there (no Ray started) ----


def test_a_clock_read_on_its_own_host_is_its_spec_and_elsewhere_only_at_speedup_1() -> None:
    real_time = SimClock(speedup=1.0, start=50.0)
    anchored = HostClock.on(real_time.spec(), "10.0.0.1")
    assert anchored.spec_on("10.0.0.1") == real_time.spec()
    # Another host re-derives the origin from the wall clock: here, the same machine, it must
    # read the same emulated time (to the wall/monotonic read jitter).
    elsewhere = SimClock(*anchored.spec_on("10.0.0.2"))
    assert abs(elsewhere.now() - real_time.now()) < 0.05
    fast = HostClock.on(SimClock(speedup=20.0).spec(), "10.0.0.1")
    fast.check(["10.0.0.1", "10.0.0.1"])
    assert fast.spec_on("10.0.0.1") == fast.spec
    with pytest.raises(ClockError, match="speedup 20"):
        fast.check(["10.0.0.1", "10.0.0.2"])
    with pytest.raises(ClockError):
        fast.spec_on("10.0.0.2")


class _FakeRay(types.SimpleNamespace):
    """Just enough of a connected Ray for :meth:`RayEngine.start`'s checks: a two-node
    cluster whose GCS is at 10.0.0.1:6379; submitting anything is a test failure."""

    def __init__(self, cpus: float, free: float) -> None:
        super().__init__(
            exceptions=types.SimpleNamespace(RayError=RuntimeError),
            util=types.SimpleNamespace(get_node_ip_address=lambda: "10.0.0.1"),
            get_runtime_context=lambda: types.SimpleNamespace(gcs_address="10.0.0.1:6379"),
        )
        self.cpus, self.free = cpus, free

    def is_initialized(self) -> bool:
        return True

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": self.cpus}

    def available_resources(self) -> dict[str, float]:
        return {"CPU": self.free}

    def nodes(self) -> list[dict[str, Any]]:
        return [{"NodeManagerAddress": "10.0.0.1", "Alive": True},
                {"NodeManagerAddress": "10.0.0.2", "Alive": True},
                {"NodeManagerAddress": "10.0.0.3", "Alive": False}]

    def remote(self, *_: object, **__: object) -> Any:
        raise AssertionError("a part was submitted")


@pytest.mark.parametrize("speedup, cpus, free, error, message", [
    (20.0, 8.0, 8.0, ClockError, r"speedup 20 but the Ray cluster spans hosts \['10.0.0.1', "
                                 r"'10.0.0.2'\]"),
    (1.0, 1.0, 1.0, ClusterError, "2 parts of 1 CPUs need 2 CPUs; the Ray cluster has 1"),
    (1.0, 8.0, 1.0, ClusterError, "2 parts of 1 CPUs need 2 CPUs; only 1 of the Ray "
                                  "cluster's 8 are free"),
])
def test_the_engine_refuses_a_cluster_it_cannot_run_the_fleet_on(
    monkeypatch: pytest.MonkeyPatch, speedup: float, cpus: float, free: float,
    error: type[Exception], message: str,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", _FakeRay(cpus, free))
    fleet = ProcessFleet("http://10.0.0.1:8080", DigitsPartitions(4, "iid"), processes=2,
                         clock=SimClock(speedup), engine=RayEngine("10.0.0.1:6379"))
    with pytest.raises(error, match=message):
        fleet.start()
    assert fleet.engine.stop() == []  # nothing ran


def test_an_address_nobody_serves_is_a_clear_error_at_once() -> None:
    _needs_ray()
    with socket.socket() as s:  # a port just freed: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fleet = ProcessFleet("http://127.0.0.1:9", DigitsPartitions(4, "iid"), processes=2,
                         engine=RayEngine(f"127.0.0.1:{port}"))
    with pytest.raises(ClusterError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        fleet.start()


def test_the_engine_without_ray_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    fleet = ProcessFleet("http://127.0.0.1:9", DigitsPartitions(4, "iid"), processes=2,
                         engine=RayEngine())
    with pytest.raises(ImportError, match=r"pip install 'fedge\[cluster\]'"):
        fleet.start()


# -- fedge fleet --engine ray without Ray ----------------------------------------------------


def test_the_ray_engine_option_without_ray_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    code = main(["fleet", "--coordinator", "http://127.0.0.1:9", "--devices", "4",
                 "--engine", "ray"])
    assert code == 2
    assert "pip install 'fedge[cluster]'" in capsys.readouterr().err


def test_digit_windows_give_a_fleet_of_any_size() -> None:
    """``--partition windows:SIZE``: the data a 50,000-device command needs (digits split any
    other way run out of examples), each device its own SIZE consecutive digits."""
    from fedge.cli import build_parser
    from fedge.commands.fleet import _source
    from fedge.fleet.datasets import load_digits

    args = build_parser().parse_args(["fleet", "--coordinator", "http://127.0.0.1:9",
                                      "--devices", "50000", "--partition", "windows:8"])
    source = _source(args)
    train, _ = load_digits(seed=0)
    for i in (0, 49_999):
        [device] = source(i, 1)
        rows = (i * 8 + np.arange(8)) % len(train.y)
        np.testing.assert_array_equal(device.x, train.x[rows])
