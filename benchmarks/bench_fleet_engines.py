"""One fleet, two engines: its parts as spawned processes here or as tasks on a (local) Ray.

The same 2,000 devices (uniform, always eligible, ``DigitsWindows(size=8)``), cut into 2
parts, run in real time against a ``fedge serve`` subprocess with a running sync task (goal
50), once on :class:`~fedge.fleet.processes.ProcessEngine` and once on
:class:`~fedge.fleet.ray_engine.RayEngine` (a private local Ray of 2 logical CPUs, as
``fedge fleet --engine ray`` starts without ``--ray-address``). Reported per engine:

* start-up: real seconds from ``fleet.start()`` until every part has reported (Ray's own
  start included), and ``fleet.stop()`` (Ray's shutdown included);
* over a window after the devices' start spread: check-ins and acknowledged uploads per second
  (the fleet's summaries), rounds the coordinator committed, CPU share of each part;
* memory: RSS of each part's process, and for Ray the RSS of its own processes (GCS, raylet,
  agents, the board actor).

On this 2-core machine both engines share the cores with the coordinator: the comparison is
what the engine costs, not what a cluster gains (that is the cores of more machines).

Run: ``./dev bench bench_fleet_engines [quick]`` (about 4 minutes; ``quick``: 200 devices,
a 10 s window, to try the benchmark itself; writes nothing). Writes
``benchmarks/results/bench_fleet_engines.json`` and ``.png``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import cli
from benchmarks.loadgen import tree_cpu, tree_pids

RESULTS = Path(__file__).parent / "results"
PARTS = 2
ENGINES = ("processes", "ray")
# A task that keeps running: rounds of 50 on the demo's digits model.
PLAN = {"rounds": 1000, "goal": 50, "selection_window_s": 5.0, "round_deadline_s": 60.0,
        "steps": 10, "batch_size": 8, "lr": 0.1, "codec": {"name": "int8"}}
# devices, start spread, window (s); `quick`: a trial of the benchmark itself, not a figure.
FULL, QUICK = (2000, 20.0, 60.0), (200, 5.0, 10.0)
DEVICES, START_SPREAD_S, WINDOW_S = QUICK if "quick" in sys.argv[1:] else FULL


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _part_pids(engine: Any) -> list[int]:
    """The process of each part: a ProcessEngine's children, or the Ray workers running the
    parts' tasks (Ray titles a worker after the task it runs: ``ray::fedge-fleet-part-K``)."""
    from fedge.fleet.processes import ProcessEngine

    if isinstance(engine, ProcessEngine):
        return [p.pid for p in engine._procs]
    titled: dict[int, int] = {}
    for pid in tree_pids(os.getpid()):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if title.startswith("ray::fedge-fleet-part-"):
            titled[int(title.rsplit("-", 1)[1])] = pid
    return [titled[k] for k in sorted(titled)]


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    """One process's own memory (not its children's), MB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in text.splitlines()
                 if line.startswith(field + ":")), 0.0)


def engine_bench(name: str) -> dict[str, Any]:
    from coordinator.config import CoordinatorConfig, PacingConfig
    from coordinator.embedded import EmbeddedCoordinator
    from edge_sdk.client import ClientConfig
    from fedge.demo import demo_bundle
    from fedge.fleet import SimClock
    from fedge.fleet.processes import Engine, ProcessEngine, ProcessFleet
    from fedge.fleet.ray_engine import RayEngine
    from fedge.fleet.sources import DigitsWindows

    bundle = demo_bundle(say=lambda _m: None)
    pacing = PacingConfig(min_retry_s=5.0, max_retry_s=60.0, no_task_retry_s=10.0)
    with EmbeddedCoordinator(subprocess=True, config=CoordinatorConfig(pacing=pacing)) as coord:
        assert coord.process is not None
        admin = coord.admin()
        task_id = admin.create_task(admin.upload_bundle(bundle)["bundle_id"], PLAN)["task_id"]
        engine: Engine = RayEngine(num_cpus=PARTS) if name == "ray" else ProcessEngine()
        fleet = ProcessFleet(
            coord.url, DigitsWindows(size=8), devices=DEVICES, processes=PARTS, engine=engine,
            clock=SimClock(1.0), start_spread_s=START_SPREAD_S,
            client_config=ClientConfig(backend="ort-step",
                                       enrollment_token=coord.enrollment_token),
        )
        t_start = time.monotonic()
        fleet.start()
        try:
            fleet.wait_for(lambda: all(s is not None for s in engine.latest()), 300, poll_s=0.1)
            ready_s = time.monotonic() - t_start
            parts = _part_pids(engine)
            time.sleep(START_SPREAD_S)  # every device has made its first pass
            s0, t0 = fleet.summary(), time.monotonic()
            cpu0 = [sum(tree_cpu(p).values()) for p in parts]
            server0 = sum(tree_cpu(coord.process.pid).values())
            committed0 = _committed(admin, task_id)
            time.sleep(WINDOW_S)
            s1, t1 = fleet.summary(), time.monotonic()
            cpu1 = [sum(tree_cpu(p).values()) for p in parts]
            server1 = sum(tree_cpu(coord.process.pid).values())
            committed1 = _committed(admin, task_id)
            rss = [_rss_mb(p) for p in parts]
            hwm = [_rss_mb(p, "VmHWM") for p in parts]
            # Ray's own processes: everything this driver started but the parts' workers.
            ray_rss = (sum(_rss_mb(p) for p in tree_pids(os.getpid())
                           if p not in parts and p != os.getpid()) if name == "ray" else 0.0)
            alive = fleet.alive()
        finally:
            t_stop = time.monotonic()
            final = fleet.stop()
            stop_s = time.monotonic() - t_stop
            fleet.close()
    window = t1 - t0
    return {
        "engine": name, "devices": DEVICES, "parts": PARTS, "alive": alive,
        "ready_s": ready_s, "stop_s": stop_s, "window_s": window,
        "checkins_per_s": (s1.checkins - s0.checkins) / window,
        "uploads_per_s": (s1.uploads_acknowledged - s0.uploads_acknowledged) / window,
        "rounds_committed_in_window": committed1 - committed0,
        "part_cpu_share": [(b - a) / window for a, b in zip(cpu0, cpu1, strict=True)],
        "coordinator_cpu_share": (server1 - server0) / window,
        "part_rss_mb": rss, "part_peak_rss_mb": hwm, "ray_daemons_rss_mb": ray_rss,
        "registered": final.devices_registered, "failures": final.failures,
        "lag_p95_s": s1.lag_p95_s,
    }


def _committed(admin: Any, task_id: str) -> int:
    return int(admin.task(task_id)["rounds_completed"])


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4), dpi=110)
    names = [r["engine"] for r in results]
    x = range(len(results))
    a.bar([i - 0.2 for i in x], [r["checkins_per_s"] for r in results], 0.4, label="check-ins/s")
    a.bar([i + 0.2 for i in x], [r["uploads_per_s"] for r in results], 0.4, label="uploads/s")
    a.set_xticks(list(x), names)
    a.set_title(f"{DEVICES} devices in {PARTS} parts, real time", fontsize=9)
    a.legend(fontsize=8)
    a.grid(alpha=0.3, axis="y")
    b.bar([i - 0.2 for i in x], [r["ready_s"] for r in results], 0.4,
          label="start: all parts report")
    b.bar([i + 0.2 for i in x], [r["stop_s"] for r in results], 0.4, label="stop")
    b.set_xticks(list(x), names)
    b.set_ylabel("real seconds")
    b.legend(fontsize=8)
    b.grid(alpha=0.3, axis="y")
    parts = [sum(r["part_rss_mb"]) for r in results]
    b_ray = [r["ray_daemons_rss_mb"] for r in results]
    c.bar(names, parts, label="the parts' processes")
    c.bar(names, b_ray, bottom=parts, label="Ray's own processes")
    c.set_ylabel("RSS, MB")
    c.legend(fontsize=8)
    c.grid(alpha=0.3, axis="y")
    fig.suptitle("One fleet, two engines: spawned processes and a local Ray; the coordinator "
                 "a subprocess on the same 2 cores")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def main() -> int:
    cli.words(__doc__)
    logging.getLogger("edge_sdk").setLevel(logging.ERROR)
    results = []
    for name in ENGINES:
        log(f"{DEVICES} devices in {PARTS} parts on the {name} engine ...")
        results.append(engine_bench(name))
    print(f"\n{DEVICES} devices in {PARTS} parts, real time, {WINDOW_S:.0f} s window")
    print(f"{'engine':>10} {'ready s':>8} {'stop s':>7} {'check-ins/s':>11} {'uploads/s':>9} "
          f"{'rounds':>6} {'part CPU':>11} {'part RSS MB':>12} {'Ray own MB':>10} "
          f"{'coord CPU':>9}")
    for r in results:
        cpu = "/".join(f"{c:.2f}" for c in r["part_cpu_share"])
        rss = "/".join(f"{m:.0f}" for m in r["part_rss_mb"])
        print(f"{r['engine']:>10} {r['ready_s']:>8.1f} {r['stop_s']:>7.1f} "
              f"{r['checkins_per_s']:>11.1f} {r['uploads_per_s']:>9.2f} "
              f"{r['rounds_committed_in_window']:>6} {cpu:>11} {rss:>12} "
              f"{r['ray_daemons_rss_mb']:>10.0f} {r['coordinator_cpu_share']:>9.2f}")
    if (DEVICES, START_SPREAD_S, WINDOW_S) == QUICK:
        return 0  # a trial: its figures are not results
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_fleet_engines.json"
    out.write_text(json.dumps({
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "start_spread_s": START_SPREAD_S, "results": results,
    }, indent=1))
    plot(results, RESULTS / "bench_fleet_engines.png")
    print(f"\nwrote {out} and bench_fleet_engines.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
