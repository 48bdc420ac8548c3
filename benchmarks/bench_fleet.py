"""The fleet emulator's own costs: wall time per round, and idle devices one process sustains.

1. **Rounds.** The demo's task, coordinator and fleet (:mod:`fedge.demo`: digits, Dirichlet 1.0,
   10 local steps, int8, goal x1.3, 5 % dropouts, speedup 20) for 30 and 300 devices.
   Reported: real and emulated seconds per committed round.
2. **Idle capacity.** N devices that are eligible but get no work (there is no task): each
   checks in, is told to come back in ``no_task_retry_s`` (10 s, jitter +-50 %, plus the
   client's own 0-10 %), sleeps, checks in again: real HTTP, real time (speedup 1). The
   coordinator runs as a separate process (``fedge serve``), on the same 2 cores. For each N:
   check-ins per second achieved against the rate the schedule asks for (N / mean interval),
   how late passes start (p50/p95 lag), the fleet process's CPU per check-in and RSS.
   "Sustained" = at least 95 % of the asked rate and p95 lag under 1 s.

Run: ``./dev bench bench_fleet``. Writes ``benchmarks/results/bench_fleet.json`` and ``.png``.
"""

from __future__ import annotations

import json
import logging
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
IDLE_SIZES = (500, 2000, 4000, 8000, 12000)
IDLE_INTERVAL_S = 10.0
IDLE_WINDOW_S = 30.0


def log(msg: str, end: str = "\n") -> None:
    print(msg, end=end, file=sys.stderr, flush=True)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rounds_bench(devices: int, goal: int, rounds: int) -> dict[str, Any]:
    from fedge.demo import DemoConfig, demo_bundle, demo_coordinator, demo_fleet
    from fedge.fleet import SimClock, load_digits, partition

    config = DemoConfig(devices=devices, goal=goal, rounds=rounds)
    bundle = demo_bundle(say=lambda _m: None)
    train, _ = load_digits(seed=0)
    parts = [train.subset(p) for p in
             partition(train.y, devices, f"dirichlet:{config.alpha}", np.random.default_rng(0))]
    clock = SimClock(speedup=config.speedup)
    with demo_coordinator(config, clock) as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(bundle)["bundle_id"]
        task_id = admin.create_task(bundle_id, config.plan())["task_id"]
        fleet = demo_fleet(coord.url, parts, config, clock, coord.enrollment_token)
        real0, emu0 = time.monotonic(), clock.now()
        with fleet:
            done = fleet.wait_for(lambda: admin.task(task_id)["state"] == "completed", 600)
        real, emulated = time.monotonic() - real0, clock.now() - emu0
        summary = fleet.summary().as_dict()
        fleet.close()
        n = admin.task(task_id)["rounds_completed"]
    return {
        "devices": devices, "goal": goal, "rounds": n, "completed": done,
        "real_s_per_round": real / max(n, 1), "emulated_s_per_round": emulated / max(n, 1),
        "speedup": config.speedup, "fleet": summary,
    }


def idle_bench(n: int) -> dict[str, Any]:
    from coordinator.config import CoordinatorConfig, PacingConfig
    from coordinator.embedded import EmbeddedCoordinator
    from fedge.fleet import Heterogeneity, SimClock, load_digits
    from fedge.fleet.emulator import Fleet

    train, _ = load_digits(seed=0)
    # Idle devices never train: a few examples each are enough (and keep memory honest).
    parts = [train.subset(np.arange(i % 1000, i % 1000 + 8)) for i in range(n)]
    pacing = PacingConfig(no_task_retry_s=IDLE_INTERVAL_S, jitter=0.5)
    config = CoordinatorConfig(pacing=pacing)
    with EmbeddedCoordinator(subprocess=True, config=config) as coord:
        built, rss0 = time.monotonic(), _rss_mb()
        fleet = Fleet(coord.url, parts, seed=0, clock=SimClock(1.0),
                      heterogeneity=Heterogeneity.uniform(), start_spread_s=IDLE_INTERVAL_S,
                      enrollment_token=coord.enrollment_token)
        build_s = time.monotonic() - built
        with fleet:
            # Warm-up: every device registered and into its steady rhythm.
            fleet.wait_for(lambda: fleet.summary().devices_registered >= n, 120, poll_s=0.5)
            time.sleep(IDLE_INTERVAL_S)
            s0, t0 = fleet.summary(), time.monotonic()
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            time.sleep(IDLE_WINDOW_S)
            s1, t1 = fleet.summary(), time.monotonic()
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            rss = _rss_mb()
        fleet.close()
    window = t1 - t0
    checkins = s1.checkins - s0.checkins
    # Mean interval asked: the coordinator's U(0.5, 1.5) x 10 s, then the client's +U(0, 10 %).
    asked_rate = n / (IDLE_INTERVAL_S * 1.05)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    achieved = checkins / window
    return {
        "devices": n, "registered": s1.devices_registered, "build_s": build_s,
        "checkins_per_s": achieved, "asked_per_s": asked_rate, "ratio": achieved / asked_rate,
        "lag_p50_s": s1.lag_p50_s, "lag_p95_s": s1.lag_p95_s,
        "fleet_cpu_ms_per_checkin": 1000 * cpu / max(checkins, 1),
        "fleet_cpu_share": cpu / window, "rss_mb": rss,
        "kb_per_device": 1024 * (rss - rss0) / n,
        "failures": s1.failures - s0.failures,
        "sustained": bool(achieved >= 0.95 * asked_rate and s1.lag_p95_s < 1.0),
    }


def plot(idle: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    ns = [r["devices"] for r in idle]
    a.plot(ns, [r["asked_per_s"] for r in idle], "--", color="grey", label="asked by the schedule")
    a.plot(ns, [r["checkins_per_s"] for r in idle], "o-", label="achieved")
    a.set_xlabel("idle devices in one process")
    a.set_ylabel("check-ins per second")
    a.legend()
    a.grid(alpha=0.3)
    b.plot(ns, [r["lag_p95_s"] for r in idle], "o-", color="tab:red", label="p95 lag")
    b.plot(ns, [r["lag_p50_s"] for r in idle], "o-", color="tab:orange", label="p50 lag")
    b.set_xlabel("idle devices in one process")
    b.set_ylabel("pass start lag, s")
    b.set_yscale("symlog", linthresh=0.01)
    b.legend()
    b.grid(alpha=0.3)
    fig.suptitle(f"fedge fleet: idle devices checking in every ~{IDLE_INTERVAL_S:.0f} s "
                 "(coordinator in its own process, same 2 cores)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    logging.getLogger("edge_sdk").setLevel(logging.ERROR)
    RESULTS.mkdir(exist_ok=True)
    rounds = []
    for devices, goal, n in ((30, 15, 10), (300, 30, 5)):
        log(f"rounds: {devices} devices, goal {goal}, {n} rounds ...")
        rounds.append(rounds_bench(devices, goal, n))
    idle = []
    for n in IDLE_SIZES:
        log(f"idle capacity: {n} devices ...")
        idle.append(idle_bench(n))
        log(f"  {idle[-1]['checkins_per_s']:.0f}/s of {idle[-1]['asked_per_s']:.0f}/s asked, "
            f"p95 lag {idle[-1]['lag_p95_s']:.3f} s")
    print("\nrounds (speedup 20, 5 % dropouts)")
    print(f"{'devices':>8} {'goal':>5} {'rounds':>7} {'real s/round':>13} {'emulated s/round':>17}")
    for r in rounds:
        print(f"{r['devices']:>8} {r['goal']:>5} {r['rounds']:>7} {r['real_s_per_round']:>13.2f}"
              f" {r['emulated_s_per_round']:>17.1f}")
    print(f"\nidle devices checking in every ~{IDLE_INTERVAL_S:.0f} s (real time)")
    print(f"{'devices':>8} {'asked/s':>8} {'got/s':>7} {'ratio':>6} {'lag p50':>8} {'lag p95':>8}"
          f" {'cpu ms/ci':>10} {'fleet cpu':>9} {'kB/device':>9} {'sustained':>9}")
    for r in idle:
        print(f"{r['devices']:>8} {r['asked_per_s']:>8.1f} {r['checkins_per_s']:>7.1f} "
              f"{r['ratio']:>6.2f} {r['lag_p50_s']:>8.3f} {r['lag_p95_s']:>8.3f} "
              f"{r['fleet_cpu_ms_per_checkin']:>10.2f} {r['fleet_cpu_share']:>9.2f} "
              f"{r['kb_per_device']:>9.0f} {r['sustained']!s:>9}")
    out = RESULTS / "bench_fleet.json"
    plot(idle, RESULTS / "bench_fleet.png")
    out.write_text(json.dumps({
        "machine": {"python": platform.python_version(), "cpus": 2},
        "rounds": rounds, "idle": idle,
        "idle_interval_s": IDLE_INTERVAL_S, "idle_window_s": IDLE_WINDOW_S,
    }, indent=1))
    print(f"\nwrote {out} and bench_fleet.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
