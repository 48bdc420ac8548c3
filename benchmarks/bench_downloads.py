"""Model downloads on each event loop the service offers: what uvloop, which has no
``sendfile``, costs the calls that stream a file.

A coordinator process (``fedge serve`` through ``EmbeddedCoordinator``, one process) per
timed phase, on asyncio's loop and on uvloop (``event_loop`` = ``asyncio`` / ``auto``),
alternating in each of ``REPEATS`` repeats so that the shared cores' load falls on both.
Each phase: ``DOWNLOADS`` GETs of a 100k-parameter task's version 0 frame (400 KB, the
file a device fetches before training) by one registered device, on ``CONNECTIONS``
keep-alive connections (``loadgen``). Figures: downloads/s, the server's CPU ms per
download (user + system of its process tree), latency percentiles.

Writes ``results/bench_downloads.json`` and ``bench_downloads.png``; ``quick`` (or
``FEDGE_BENCH_QUICK=1``) runs a short version into the temporary directory.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import loadgen  # noqa: E402
from coordinator.embedded import EmbeddedCoordinator  # noqa: E402
from edge_sdk.protocol import Route  # noqa: E402
from tests.fixtures.coordinator import DeviceHTTP, make_synthetic_bundle  # noqa: E402

QUICK = "quick" in sys.argv[1:] or os.environ.get("FEDGE_BENCH_QUICK", "") not in ("", "0")
RESULTS = Path(tempfile.gettempdir()) if QUICK else Path(__file__).parent / "results"
NUM_PARAMETERS = 100_000
DOWNLOADS = 300 if QUICK else 3000
CONNECTIONS = 16
REPEATS = 1 if QUICK else 3
LOOPS = {"asyncio": "asyncio", "uvloop": "auto"}  # label: CoordinatorConfig.event_loop
PLAN = {"rounds": 1, "goal": 10, "over_selection": 1.0, "selection_window_s": 0.0,
        "round_deadline_s": 3600.0, "robust": "none"}  # fmt: skip


def phase(workdir: Path, bundle: Path, event_loop: str) -> dict[str, Any]:
    with EmbeddedCoordinator(workdir / "fedge.db", subprocess=True,
                             event_loop=event_loop) as coord:  # fmt: skip
        assert coord.process is not None and coord.port is not None
        admin = coord.admin()
        task_id = admin.create_task(admin.upload_bundle(bundle)["bundle_id"], PLAN)["task_id"]
        device = DeviceHTTP(coord)
        size = len(device.params(task_id, 0))
        device.close()
        path = Route.VERSION_PARAMS.format(task_id=task_id, version=0)
        requests = [loadgen.download_request(coord.port, (device.device_id, device.secret),
                                             path, close=False)] * DOWNLOADS  # fmt: skip

        def whole(status: int, body: bytes) -> bool:
            return status == 200 and len(body) == size

        cpu0 = loadgen.tree_cpu_s(coord.process.pid)
        result = loadgen.run(coord.port, requests, CONNECTIONS, whole)
        cpu = loadgen.tree_cpu_s(coord.process.pid) - cpu0
    return {"bytes": size, "downloads_per_s": result.per_s,
            "server_cpu_ms": 1e3 * cpu / DOWNLOADS, "latency_ms": result.latency_ms}  # fmt: skip


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, cpu) = plt.subplots(1, 2, figsize=(10, 4))
    for i, label in enumerate(LOOPS):
        mine = [r for r in runs if r["loop"] == label]
        rate.scatter([i] * len(mine), [r["downloads_per_s"] for r in mine], label=label)
        cpu.scatter([i] * len(mine), [r["server_cpu_ms"] for r in mine], label=label)
    for ax, title in ((rate, "downloads/s (400 KB frame, keep-alive)"),
                      (cpu, "server CPU ms per download")):  # fmt: skip
        ax.set_xticks(range(len(LOOPS)), list(LOOPS))
        ax.set_title(title)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = make_synthetic_bundle(work / "bundle", NUM_PARAMETERS)
        for repeat in range(REPEATS):
            for label, choice in LOOPS.items():
                run = phase(work / f"{label}-{repeat}", bundle, choice)
                runs.append({"loop": label, "repeat": repeat, **run})
                print(f"[bench_downloads] repeat {repeat + 1}/{REPEATS}, {label}: "
                      f"{run['downloads_per_s']:.0f}/s", file=sys.stderr, flush=True)  # fmt: skip
    summary: dict[str, dict[str, float]] = {}
    for label in LOOPS:
        mine = [r for r in runs if r["loop"] == label]
        summary[label] = {
            "downloads_per_s": sum(r["downloads_per_s"] for r in mine) / len(mine),
            "server_cpu_ms": sum(r["server_cpu_ms"] for r in mine) / len(mine),
        }
    ratios = {
        "downloads_uvloop_vs_asyncio":
            summary["uvloop"]["downloads_per_s"] / summary["asyncio"]["downloads_per_s"],
        "server_cpu_uvloop_vs_asyncio":
            summary["uvloop"]["server_cpu_ms"] / summary["asyncio"]["server_cpu_ms"],
    }  # fmt: skip
    print(f"\n{DOWNLOADS} downloads of a {runs[0]['bytes']:,}-byte frame, {CONNECTIONS} "
          "keep-alive connections, one server process; each repeat")  # fmt: skip
    print("| loop | downloads/s | server CPU ms / download | p50 / p99 ms |")
    print("|---|---:|---:|---|")
    for r in runs:
        lat = r["latency_ms"]
        print(f"| {r['loop']} | {r['downloads_per_s']:,.0f} | {r['server_cpu_ms']:.2f} | "
              f"{lat['p50']:.1f} / {lat['p99']:.1f} |")  # fmt: skip
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}x (means)")
    out = {"machine": platform.platform(), "quick": QUICK, "downloads": DOWNLOADS,
           "connections": CONNECTIONS, "num_parameters": NUM_PARAMETERS, "runs": runs,
           "summary": summary, "ratios": ratios, "load_average": os.getloadavg()[0]}  # fmt: skip
    (RESULTS / "bench_downloads.json").write_text(json.dumps(out, indent=1))
    plot(runs, RESULTS / "bench_downloads.png")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"wrote {RESULTS / 'bench_downloads.json'} and bench_downloads.png")


if __name__ == "__main__":
    main()
