"""What the dashboard and ``/metrics`` cost the coordinator's one worker thread, by history size.

A dashboard left open polls every 2 s and a Prometheus server scrapes every 15 s or so; both
read the store on the same worker thread that serves device check-ins and uploads, so their
cost is time the devices wait. The store holds one synchronous task with ``R`` closed rounds
(8 assignments each: 5 reported with their updates, 1 aborted with a phase and code,
2 expired) and one open round; for each ``R`` the run measures, on one thread:

* ``task (first poll)``: the task page's endpoint with nothing cached (after a restart);
* ``task (next polls)``: the same once settled rounds are cached (:class:`RoundFacts`) and
  nothing moved: the usual poll;
* ``task (a round closed)``: a poll right after a round closed (or every ``RELIST_S``), which
  reads the task's list of rounds again but no settled round's assignments;
* ``population``: the population endpoint (all tasks' funnel, device groups), cached;
* ``overview``, ``service``: the overview and service endpoints;
* ``metrics scrape``: ``/metrics`` (store figures plus the registry's text rendering), on the
  rounds the dashboard's cache keeps current, as the app wires it, with event counters for
  every route and outcome (:func:`fill_events`);
* ``metrics publish (every 2 s)``: what a process of ``fedge serve --processes K`` spends
  every 2 s writing its event counters for its siblings (on its event loop, not the worker);
* ``metrics scrape, 2 processes``: the scrape summing its own and a sibling's counters;
* ``check-in`` (the reference): a device check-in answered ``selecting`` on the same store.

Each figure is the median of ``--repeats`` calls; compare the ratios to a check-in within a
run. The database lives in a temporary directory (``--dir``, default /dev/shm when present):
the figures are about reading, and writing the history faster keeps the run short.

Run: ``./dev bench bench_dashboard`` (about a minute; ``--quick`` for a smoke run). Writes
``benchmarks/results/bench_dashboard.json`` and ``bench_dashboard.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
N_PARAMS = 2410  # the digits MLP


def build(root: Path, rounds: int) -> tuple[Any, Any, str, Any]:
    """A coordinator whose store holds the history described in the module docstring."""
    from coordinator.config import CoordinatorConfig
    from coordinator.dashboard.history import RoundFacts
    from coordinator.metrics import ServiceMetrics
    from coordinator.service import Coordinator, DeviceIdentity
    from coordinator.store import Assignment, Device, Round, Task, Update, Version

    coord = Coordinator(CoordinatorConfig(db_path=str(root / "fedge.db"), seed=0))
    facts = RoundFacts(coord.store)
    metrics = ServiceMetrics(coord, lambda: 0, lambda task: facts.history(task).rounds)
    store = coord.store
    manifest = {"bundle_id": "b" * 64, "num_parameters": N_PARAMS, "files": {},
                "backends": {"ort-step": {"supported": True, "reason": None}}}
    store.add_bundle(manifest["bundle_id"], manifest, 0.0)
    plan = {"rounds": rounds + 10, "goal": 5, "selection_window_s": 86400.0,
            "selection_timeout_s": 86400.0}
    task = Task("t-bench", "bench", manifest["bundle_id"], "sync", "default", plan, "running",
                rounds, rounds, 0, 0.0)
    store.add_task(task)
    store.add_version(Version(task.task_id, 0, "0" * 64, None, None, 0.0))
    devices = [f"d-{i:04d}" for i in range(64)]
    for d in devices:
        store.add_device(Device(d, "00" * 16, "0" * 64, "linux", "x86_64", ("ort-step",),
                                "default", 0.0))
    now = time.time()
    t = now - 60.0 * rounds - 100.0
    for number in range(1, rounds + 1):
        rnd = store.add_round(Round(0, task.task_id, number, "train", "reporting", number - 1,
                                    5, 8, 4, t, t + 1, t + 1, t + 61))
        chosen = [devices[(number * 8 + k) % len(devices)] for k in range(8)]
        ids = [f"a-{number}-{k}" for k in range(8)]
        with store.atomic():
            store.add_assignments([
                Assignment(a, rnd.round_id, task.task_id, d, "train", "delivered", t + 1,
                           delivered_at=t + 2)
                for a, d in zip(ids, chosen, strict=True)
            ])
            for k, (a, d) in enumerate(zip(ids[:5], chosen[:5], strict=True)):
                store.add_update(Update(a, rnd.round_id, task.task_id, d, "k", f"{k:064x}",
                                        620 * 4, 50, 0.5, {"num_examples": 50, "loss": 0.5},
                                        t + 10 + k, {"accepted": True}))
            store.update_assignment(ids[5], state="aborted", closed_at=t + 9,
                                    abort_reason="error [training/non_finite]")
            store.expire_assignments(rnd.round_id, t + 30)
            metrics_json = {"reported": 5, "bytes_in": 5 * 620 * 4, "loss": 0.5,
                            "model_version": number, "outcome": "committed"}
            store.update_round(rnd.round_id, state="committed", closed_at=t + 30,
                               metrics=metrics_json)
        t += 60
    # The open round's window lasts the run: each check-in below is answered "selecting".
    store.add_round(Round(0, task.task_id, rounds + 1, "train", "selecting", rounds, 5, 8, 4,
                          now, now + 86400.0))
    who = DeviceIdentity(devices[0], "default")
    return coord, metrics, json.dumps({"runtimes": ["ort-step"], "conditions": {
        "charging": True, "idle": True, "unmetered": True, "battery": 0.9}}), who


def fill_events(metrics: Any) -> None:
    """Every route with three statuses, every check-in and upload outcome: the series a
    service that has run a while holds in its event counters."""
    from edge_sdk.protocol import Route

    routes = [v for k, v in vars(Route).items() if k.isupper() and isinstance(v, str)]
    for route, status in itertools.product(routes, ("200", "400", "503")):
        metrics._child(metrics.requests, "POST", route, status).inc(7)
        metrics._child(metrics.latency, route).observe(0.004)
        metrics._child(metrics.bytes_in, route).inc(900)
        metrics._child(metrics.bytes_out, route).inc(300)
    for outcome in ("train", "evaluate", "selecting", "window_full", "ineligible", "paused",
                    "no_task", "unauthorized", "invalid_request"):  # fmt: skip
        metrics._child(metrics.checkins, outcome).inc(5)
    for outcome in ("accepted", "malformed_frame", "duplicate_upload", "round_closed"):
        metrics._child(metrics.uploads, outcome).inc(3)


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def measure(rounds: int, repeats: int, root: Path) -> dict[str, float]:
    from coordinator.dashboard import views
    from coordinator.dashboard.history import RELIST_S, RoundFacts
    from coordinator.metrics_sharing import SharedCounters

    coord, metrics, checkin_body, who = build(root, rounds)
    task_id = "t-bench"
    out: dict[str, float] = {}
    cold = [median_ms(lambda: views.task_detail(coord, metrics, RoundFacts(coord.store),
                                                task_id), 1) for _ in range(repeats)]
    out["task (first poll)"] = statistics.median(cold)
    cache = RoundFacts(coord.store)
    views.task_detail(coord, metrics, cache, task_id)
    out["task (next polls)"] = median_ms(
        lambda: views.task_detail(coord, metrics, cache, task_id), repeats)
    # A round that closed (or RELIST_S passed) makes the next poll read the list of rounds
    # again; the settled rounds' facts stay cached. A clock that jumps makes every poll so.
    ticks = itertools.count(step=RELIST_S + 1)
    relisting = RoundFacts(coord.store, clock=lambda: float(next(ticks)))
    views.task_detail(coord, metrics, relisting, task_id)
    out["task (a round closed)"] = median_ms(
        lambda: views.task_detail(coord, metrics, relisting, task_id), repeats)
    out["population"] = median_ms(lambda: views.population(coord, metrics, cache), repeats)
    out["overview"] = median_ms(lambda: views.overview(coord), repeats)
    out["service"] = median_ms(lambda: views.service(coord, metrics), repeats)
    fill_events(metrics)
    out["metrics scrape"] = median_ms(lambda: metrics.render(metrics.reader.read()), repeats)
    with tempfile.TemporaryDirectory(prefix="fedge-bench-metrics-", dir=root) as d:
        metrics.shared = SharedCounters(Path(d), metrics.events)
        SharedCounters(Path(d), metrics.events).publish()  # a sibling with as many series
        counted = metrics._child(metrics.checkins, "train")

        def publish() -> None:
            counted.inc()  # an unchanged snapshot is not written again
            metrics.shared.publish()

        out["metrics publish (every 2 s)"] = median_ms(publish, repeats)
        out["metrics scrape, 2 processes"] = median_ms(
            lambda: metrics.render(metrics.reader.read()), repeats)
        metrics.shared = None
    body = checkin_body.encode()
    answer = coord.checkin(who, body)
    assert answer.get("reason") == "selecting", answer  # the reference path, not an error
    out["check-in"] = median_ms(lambda: coord.checkin(who, body), repeats)
    coord.close()
    return out


def plot(results: dict[int, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results)
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    for name in results[sizes[0]]:
        ax.plot(sizes, [results[n][name] for n in sizes], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("closed rounds in the store (8 assignments each)")
    ax.set_ylabel("ms on the worker thread (median)")
    ax.set_title("Dashboard and /metrics reads vs a device check-in")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(results: dict[int, dict[str, float]]) -> str:
    sizes = sorted(results)
    names = list(results[sizes[0]])
    width = max(len(n) for n in names)
    lines = [f"{'rounds':<{width}}" + "".join(f"{n:>16,}" for n in sizes)]
    for name in names:
        cells = "".join(
            f"{results[n][name]:>9.2f} ms {results[n][name] / results[n]['check-in']:>4.0f}x"
            if name != "check-in" else f"{results[n][name]:>9.2f} ms   1x"
            for n in sizes
        )
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--dir", type=Path,
                   default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    sizes = (30, 100) if args.quick else (100, 300, 1000, 3000)
    repeats = 3 if args.quick else args.repeats
    results: dict[int, dict[str, float]] = {}
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="fedge-bench-dash-", dir=args.dir) as d:
            results[n] = measure(n, repeats, Path(d))
        print(f"  {n} rounds done", flush=True)
    print(table(results))
    name = "bench_dashboard_quick" if args.quick else "bench_dashboard"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({
        "machine": platform.platform(), "repeats": repeats,
        "ms": {str(n): r for n, r in results.items()},
    }, indent=2) + "\n")
    plot(results, args.out / f"{name}.png")
    print(f"wrote {args.out / (name + '.json')} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
