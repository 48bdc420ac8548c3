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
  fold), 32 uploads in flight, in one run each way: group commit off (each upload made
  durable on its own on the worker thread: file, directory and SQLite fsyncs) and on
  (``coordinator/group_commit.py``);
* the coordinator's CPU milliseconds per upload and per steered check-in (``/proc`` CPU time
  over the timed interval): unlike rates, not diluted by what else runs on the shared cores;
* peak coordinator RSS (``VmHWM`` of the server process) for one round of 1,000 updates versus
  one of 10, each in a fresh process: streaming aggregation must keep it flat, and RSS sampled
  every 50 uploads during the 1,000-update rounds (plotted).

Run: ``./dev bench bench_coordinator`` (about 3 min). Writes
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

from coordinator.admin import tar_directory  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.embedded import EmbeddedCoordinator  # noqa: E402
from coordinator.service import Coordinator  # noqa: E402
from edge_sdk.codecs import encode_update  # noqa: E402
from edge_sdk.protocol import device_auth_header  # noqa: E402
from tests.fixtures.coordinator import (  # noqa: E402
    GOOD_CONDITIONS,
    DeviceHTTP,
    make_synthetic_bundle,
)

RESULTS = Path(__file__).parent / "results"
NUM_PARAMETERS = 100_000
CODEC = {"name": "int8", "bits": 8, "block": 256}
THREADS = 4
# Uploads in flight at once (client threads, one new connection per upload): group commit
# batches what arrives together, so both configurations get the same concurrent load.
UPLOAD_THREADS = 32
REPEATS = 2
DURABLE_UPDATES = 320  # uploads of the in-process durable-path comparison, each way


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
    db = Path(tempfile.mkdtemp(dir=workdir)) / "fedge.db"
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


def schedstat() -> tuple[float, float]:
    """Seconds this thread has run on a CPU and waited for one (runnable, not running):
    the rest of its wall time it was blocked (here: on the disk)."""
    tid = threading.get_native_id()
    run_ns, wait_ns, _ = Path(f"/proc/self/task/{tid}/schedstat").read_text().split()
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


def durable_path(
    bundle: Path, updates: int, frames: list[bytes], workdir: Path, batch: int, rep: int
) -> dict[str, Any]:
    """The service without HTTP (one thread, real SQLite file and blob directory on the
    disk): ``updates`` uploads made durable one by one (``batch`` 1: ``Coordinator.upload``,
    three fsyncs each) or in batches (the group-commit steps, fsyncs on a thread pool). The
    thread's wall time split into CPU, waiting for a CPU (the shared cores' load) and blocked
    (the fsyncs)."""
    root = workdir / f"durable-{batch}-{rep}"
    root.mkdir(parents=True, exist_ok=True)
    plan = {"rounds": 1, "goal": updates, "over_selection": 1.0, "selection_window_s": 0.0,
            "round_deadline_s": 3600.0, "codec": CODEC, "max_update_norm": None,
            "robust": "none"}  # fmt: skip
    coord = Coordinator(CoordinatorConfig(db_path=str(root / "fedge.db"), open_registration=True))
    try:
        bundle_id = coord.add_bundle(tar_directory(bundle))["bundle_id"]
        body = json.dumps({"bundle_id": bundle_id, "plan": plan}).encode()
        coord.create_task(body)
        checkin = json.dumps({"runtimes": ["ort-step"], "conditions": GOOD_CONDITIONS}).encode()
        devices = []
        for _ in range(updates):
            reg = coord.register(json.dumps({"runtimes": ["ort-step"]}).encode())
            devices.append(coord.authenticate(device_auth_header(reg["device_id"], reg["secret"])))
        for who in devices:
            coord.checkin(who, checkin)
        work = [(who, coord.checkin(who, checkin)["assignment"]["assignment_id"])
                for who in devices]  # fmt: skip
        report = json.dumps({"num_examples": 20})
        t0, (c0, q0) = time.perf_counter(), schedstat()
        if batch == 1:
            for i, (who, aid) in enumerate(work):
                coord.upload(who, aid, f"k{i}", report, frames[i % len(frames)])
        else:
            with ThreadPoolExecutor(batch) as syncers:
                for start in range(0, updates, batch):
                    staged = [
                        coord.stage_upload(coord.admit_upload(who, aid, f"k{i}", report),
                                           frames[i % len(frames)])
                        for i, (who, aid) in enumerate(work[start : start + batch], start)
                    ]  # fmt: skip
                    coord.install_uploads(staged, syncers)
                    assert all(isinstance(a, dict) for a in coord.accept_uploads(staged))
        wall, (c1, q1) = time.perf_counter() - t0, schedstat()
        cpu, queued = c1 - c0, q1 - q0
        assert coord.store.list_tasks()[0].model_version == 1  # the round committed
        per = 1e3 / updates
        return {"batch": batch, "updates": updates, "uploads_per_s": updates / wall,
                "cpu_ms_per_upload": cpu * per, "runqueue_ms_per_upload": queued * per,
                "blocked_ms_per_upload": (wall - cpu - queued) * per}  # fmt: skip
    finally:
        coord.close()


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rss, rates) = plt.subplots(1, 2, figsize=(11, 3.8))
    for run in results["runs"]:
        xs, ys = zip(*run["rss_samples_mib"], strict=True)
        rss.plot(xs, ys, marker="o", ms=3, label=label(run))
        rss.axhline(run["rss_peak_mib"], ls="--", lw=0.8, color=rss.lines[-1].get_color())
    rss.set_xlabel("updates accepted in the round")
    rss.set_ylabel("coordinator RSS (MiB)")
    rss.set_ylim(bottom=0)
    rss.set_title("Coordinator RSS, 100k-param int8 updates (dashed: peak)")
    rss.legend(fontsize=8)
    names = ("uploads/s", "steered check-ins/s", "uploads/s, in-process")
    xs = np.arange(len(names))
    for offset, on in ((-0.2, False), (0.2, True)):
        runs = [r for r in results["runs"][1:] if r["group_commit"] == on]
        durable = [d for d in results["durable_path"] if (d["batch"] > 1) == on]
        figures = [
            ([r["uploads_per_s"] for r in runs], [r["upload_cpu_ms"]["server"] for r in runs]),
            ([r["checkins_steered_per_s"] for r in runs],
             [r["checkin_steered_cpu_ms"]["server"] for r in runs]),
            ([d["uploads_per_s"] for d in durable], [d["cpu_ms_per_upload"] for d in durable]),
        ]  # fmt: skip
        means = [float(np.mean(rate)) for rate, _ in figures]
        rates.bar(xs + offset, means, 0.4, label=f"group commit {'on' if on else 'off'}")
        for x, (rate, cpu) in zip(xs + offset, figures, strict=True):
            rates.plot([x] * len(rate), rate, "k.", ms=4)  # each repeat
            top = (x, max(rate))
            rates.annotate(f"{np.mean(cpu):.2f} ms\nCPU", top, ha="center", va="bottom", fontsize=7)
    rates.set_xticks(xs, names)
    rates.set_ylim(top=rates.get_ylim()[1] * 1.15)
    rates.set_title("1,000-update rounds, alternating (dots: each repeat)")
    rates.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def label(run: dict[str, Any]) -> str:
    return f"{run['updates']} updates, group commit {'on' if run['group_commit'] else 'off'}"


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
        # The configurations alternate, so that the shared cores' changing load falls on both.
        for n, group_commit in ((10, True), *[(1000, False), (1000, True)] * REPEATS):
            print(f"[bench_coordinator] {label({'updates': n, 'group_commit': group_commit})}",
                  file=sys.stderr, flush=True)  # fmt: skip
            runs.append(run_round(bundle, n, frames, work, group_commit))
        print("[bench_coordinator] durable path in-process", file=sys.stderr, flush=True)
        durable = [durable_path(bundle, DURABLE_UPDATES, frames, work, b, rep)
                   for rep in range(REPEATS) for b in (1, 32)]  # fmt: skip
    small = runs[0]
    befores = [r for r in runs[1:] if not r["group_commit"]]
    afters = [r for r in runs[1:] if r["group_commit"]]
    results = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average": os.getloadavg(),
        },
        "num_parameters": NUM_PARAMETERS,
        "codec": CODEC,
        "client_threads": THREADS,
        "upload_threads": UPLOAD_THREADS,
        "runs": runs,
        "durable_path": durable,
        "rss_peak_ratio_1000_vs_10": max(r["rss_peak_mib"] for r in afters) / small["rss_peak_mib"],
        "uploads_ratio_group_commit": float(np.mean([r["uploads_per_s"] for r in afters]))
        / float(np.mean([r["uploads_per_s"] for r in befores])),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_coordinator.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, RESULTS / "bench_coordinator.png")
    heads = ["10, on"] + [f"1,000, {'on' if r['group_commit'] else 'off'}" for r in runs[1:]]
    print(f"| {'figure (group commit on/off)':40} | " + " | ".join(f"{h:>12}" for h in heads)
          + " |")  # fmt: skip
    print(f"|{'-' * 42}|" + "|".join("-" * 13 + ":" for _ in heads) + "|")
    rows = [
        ("registrations/s", lambda r: r["registrations_per_s"], "{:.0f}"),
        ("check-ins/s, candidate (1 DB write)", lambda r: r["checkins_candidate_per_s"], "{:.0f}"),
        ("check-ins/s, steered away (no write)", lambda r: r["checkins_steered_per_s"], "{:.0f}"),
        ("  coordinator CPU ms per steered check-in",
         lambda r: r["checkin_steered_cpu_ms"] and r["checkin_steered_cpu_ms"]["server"], "{:.2f}"),
        ("uploads/s (int8, acknowledged)", lambda r: r["uploads_per_s"], "{:.1f}"),
        ("  coordinator CPU ms per upload", lambda r: r["upload_cpu_ms"]["server"], "{:.2f}"),
        ("  client CPU ms per upload", lambda r: r["upload_cpu_ms"]["client"], "{:.2f}"),
        ("upload frame bytes", lambda r: r["upload_bytes"], "{:,}"),
        ("coordinator RSS idle (MiB)", lambda r: r["rss_idle_mib"], "{:.1f}"),
        ("coordinator RSS before uploads (MiB)", lambda r: r["rss_before_uploads_mib"], "{:.1f}"),
        ("coordinator RSS peak (MiB)", lambda r: r["rss_peak_mib"], "{:.1f}"),
    ]  # fmt: skip
    for name, get, fmt in rows:
        cells = ["-" if get(r) is None else fmt.format(get(r)) for r in runs]
        print(f"| {name:40} | " + " | ".join(f"{c:>12}" for c in cells) + " |")
    print("\nin-process, no HTTP (durable path):")
    for d in durable:
        print(f"  batch {d['batch']:>2}: {d['uploads_per_s']:6.1f} uploads/s; per upload "
              f"{d['cpu_ms_per_upload']:.2f} ms CPU, {d['runqueue_ms_per_upload']:.2f} ms "
              f"waiting for a CPU, {d['blocked_ms_per_upload']:.2f} ms blocked")  # fmt: skip
    ratio = results["uploads_ratio_group_commit"]
    print(f"\nuploads/s with group commit vs without (means): {ratio:.2f}x")
    print(f"peak RSS ratio, 1,000 vs 10 updates: {results['rss_peak_ratio_1000_vs_10']:.3f}")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
