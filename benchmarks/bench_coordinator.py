"""Coordinator throughput and memory on loopback: check-ins/s, uploads/s, peak RSS.

The coordinator runs as its own process (``fedge serve`` through ``EmbeddedCoordinator``,
real SQLite file with fsync, real HTTP); simulated devices are threads of this process, each
with one keep-alive connection, speaking the wire protocol with ``http.client``. The model is a
synthetic 100,000-parameter bundle; updates are int8 frames (block 256), 16 distinct deltas
cycled (the coordinator decodes, checks and folds every one).

Measured:

* registrations/s, and check-ins/s of two kinds: *candidate* (admitted to a selection window:
  one database write) and *steered* (round full: answered with pace steering, no write);
* uploads/s: acknowledged int8 updates (decode, NaN/norm checks, blob fsync, SQLite commit,
  fold), 4 client threads;
* peak coordinator RSS (``VmHWM`` of the server process) for one round of 1,000 updates versus
  one of 10, each in a fresh process: streaming aggregation must keep it flat, and RSS sampled
  every 50 uploads during the 1,000-update round (plotted).

Run: ``./dev bench bench_coordinator`` (about 2 min). Writes
``benchmarks/results/bench_coordinator.json`` and ``bench_coordinator.png``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coordinator.embedded import EmbeddedCoordinator  # noqa: E402
from edge_sdk.codecs import encode_update  # noqa: E402
from tests.fixtures.coordinator import DeviceHTTP, make_synthetic_bundle  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NUM_PARAMETERS = 100_000
CODEC = {"name": "int8", "bits": 8, "block": 256}
THREADS = 4
# Uploads in flight at once (client threads, one new connection per upload): group commit
# batches what arrives together, so both configurations get the same concurrent load.
UPLOAD_THREADS = 32


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_s(pid: int) -> float:
    """CPU time (user + system) a process has used so far: what a figure costs whatever
    else the shared cores are doing."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Costs:
    """CPU milliseconds per item from now on, of the coordinator and of this (client)
    process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.server, self.client = cpu_s(pid), time.process_time()

    def per_item(self, n: int) -> dict[str, float]:
        return {
            "server": (cpu_s(self.pid) - self.server) / n * 1e3,
            "client": (time.process_time() - self.client) / n * 1e3,
        }


def timed(n: int, fn: Callable[[int], Any], threads: int = THREADS) -> tuple[float, list[Any]]:
    """Run fn(0..n-1) on a thread pool; returns (items per second, results)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        out = list(pool.map(fn, range(n)))
    return n / (time.perf_counter() - t0), out


def run_round(
    bundle: Path, updates: int, frames: list[bytes], workdir: Path, group_commit: bool = True
) -> dict[str, Any]:
    """One coordinator process, one round of ``updates`` reports; returns figures."""
    # over_selection 1: exactly `updates` devices are selected, later ones are steered away
    plan = {
        "rounds": 1,
        "goal": updates,
        "over_selection": 1.0,
        "selection_window_s": 0.0,
        "round_deadline_s": 3600.0,
        "codec": CODEC,
        "max_update_norm": None,
        # Plain FedAvg: the running sum is folded as uploads arrive. The robust defaults
        # (adaptive clipping) read every payload back at the commit, which is not the
        # upload path measured here.
        "robust": "none",
    }
    db = workdir / f"round{updates}-{'gc' if group_commit else 'single'}.db"
    coord = EmbeddedCoordinator(db, subprocess=True, group_commit=group_commit).start()
    assert coord.process is not None
    pid = coord.process.pid
    try:
        admin = coord.admin()
        task_id = admin.create_task(admin.upload_bundle(bundle)["bundle_id"], plan)["task_id"]
        rss_idle = proc_kib(pid, "VmRSS")
        local = threading.local()

        def register(_: int) -> DeviceHTTP:
            dev = DeviceHTTP(coord)
            dev.close()  # like a phone: connect, ask, go away (no idle keep-alive socket)
            return dev

        def check_in(i: int) -> dict[str, Any]:
            try:
                return devices[i].check_in()
            finally:
                devices[i].close()

        reg_rate, devices = timed(updates, register)
        cand_rate, first = timed(updates, check_in)
        assert sum(a["action"] == "train" for a in first) <= 1 or updates <= 1
        _, second = timed(updates, check_in)
        aids = {}
        for i, a in enumerate(second):
            answer = a if a["action"] == "train" else first[i]
            aids[i] = answer["assignment"]["assignment_id"]
        extra = 1000 if updates >= 1000 else 0
        steer_rate, steer_cost = None, None
        if extra:

            def steered(i: int) -> None:
                dev = getattr(local, "dev", None)
                if dev is None:  # one device (and connection) per client thread
                    dev = local.dev = DeviceHTTP(coord)
                assert dev.check_in()["reason"] == "window_full"

            costs = Costs(pid)
            steer_rate, _ = timed(extra, steered)
            steer_cost = costs.per_item(extra)
        rss_reporting = proc_kib(pid, "VmRSS")
        samples: list[tuple[int, int]] = [(0, rss_reporting)]
        done = [0]
        lock = threading.Lock()

        def upload(i: int) -> None:
            status, body = devices[i].upload_raw(
                aids[i], frames[i % len(frames)], report={"num_examples": 20 + i % 7}
            )
            devices[i].close()
            assert status == 200, body
            with lock:
                done[0] += 1
                if done[0] % 50 == 0 or done[0] == updates:
                    samples.append((done[0], proc_kib(pid, "VmRSS")))

        costs = Costs(pid)
        up_rate, _ = timed(updates, upload, UPLOAD_THREADS)
        up_cost = costs.per_item(updates)
        rounds = admin.rounds(task_id)
        assert rounds[0]["state"] == "committed", rounds
        status = admin.status()
        assert status["updates_accepted"] == updates and status["model_version"] == 1
        return {
            "updates": updates,
            "group_commit": group_commit,
            "registrations_per_s": reg_rate,
            "checkins_candidate_per_s": cand_rate,
            "checkins_steered_per_s": steer_rate,
            "uploads_per_s": up_rate,
            "upload_cpu_ms": up_cost,
            "checkin_steered_cpu_ms": steer_cost,
            "upload_bytes": len(frames[0]),
            "rss_idle_mib": rss_idle / 1024,
            "rss_before_uploads_mib": rss_reporting / 1024,
            "rss_peak_mib": proc_kib(pid, "VmHWM") / 1024,
            "rss_samples_mib": [(n, kib / 1024) for n, kib in samples],
            "round_duration_s": rounds[0]["metrics"]["duration_s"],
        }
    finally:
        coord.stop()


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for run in results["runs"]:
        xs, ys = zip(*run["rss_samples_mib"], strict=True)
        ax.plot(xs, ys, marker="o", ms=3, label=f"round of {run['updates']} updates")
        ax.axhline(run["rss_peak_mib"], ls="--", lw=0.8, color=ax.lines[-1].get_color())
    ax.set_xlabel("updates accepted in the round")
    ax.set_ylabel("coordinator RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title("Streaming aggregation: 100k-param int8 updates (dashed: peak)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    rng = np.random.default_rng(0)
    frames = [
        encode_update(rng.normal(0, 0.01, NUM_PARAMETERS).astype(np.float32), CODEC, rng=rng)[0]
        for _ in range(16)
    ]
    with tempfile.TemporaryDirectory(prefix="bench-coordinator-") as tmp:
        work = Path(tmp)
        bundle = make_synthetic_bundle(work / "bundle", NUM_PARAMETERS)
        runs = []
        for n in (10, 1000):
            print(f"[bench_coordinator] round of {n} updates ...", file=sys.stderr, flush=True)
            runs.append(run_round(bundle, n, frames, work))
    small, big = runs
    results = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "num_parameters": NUM_PARAMETERS,
        "codec": CODEC,
        "client_threads": THREADS,
        "runs": runs,
        "rss_peak_ratio_1000_vs_10": big["rss_peak_mib"] / small["rss_peak_mib"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_coordinator.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, RESULTS / "bench_coordinator.png")
    print(f"| {'figure':38} | {'10 updates':>12} | {'1,000 updates':>14} |")
    print(f"|{'-' * 40}|{'-' * 14}:|{'-' * 15}:|")
    rows = [
        ("registrations/s", "registrations_per_s", "{:.0f}"),
        ("check-ins/s, candidate (1 DB write)", "checkins_candidate_per_s", "{:.0f}"),
        ("check-ins/s, steered away (no write)", "checkins_steered_per_s", "{:.0f}"),
        ("uploads/s (int8, acknowledged)", "uploads_per_s", "{:.1f}"),
        ("upload frame bytes", "upload_bytes", "{:,}"),
        ("coordinator RSS idle (MiB)", "rss_idle_mib", "{:.1f}"),
        ("coordinator RSS before uploads (MiB)", "rss_before_uploads_mib", "{:.1f}"),
        ("coordinator RSS peak (MiB)", "rss_peak_mib", "{:.1f}"),
    ]
    for label, key, fmt in rows:
        cells = ["-" if r[key] is None else fmt.format(r[key]) for r in runs]
        print(f"| {label:38} | {cells[0]:>12} | {cells[1]:>14} |")
    print(f"\npeak RSS ratio, 1,000 vs 10 updates: {results['rss_peak_ratio_1000_vs_10']:.3f}")


if __name__ == "__main__":
    main()
