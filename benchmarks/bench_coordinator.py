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
  every 50 uploads during the 1,000-update rounds (plotted);
* before and after the one-node speed work of issue 15, in the same run: the 1,000-update
  round also runs against a coordinator started from the source tree of commit ``BASELINE``
  (``git archive`` into a temporary directory; the server process imports from there), so
  that both see the same load on the shared cores. The implied capacity of one core is
  1,000 / (server CPU ms per request): the load generator shares the 2 cores, so achieved
  rates understate what the server alone would take.

Every upload carries a payload of its own (1,000 distinct frames): identical payloads would
share one content-addressed blob and skip its fsync.

Run: ``./dev bench bench_coordinator`` (about 10 min at a load of 30 on 2 cores). Writes
``benchmarks/results/bench_coordinator.json`` and ``bench_coordinator.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coordinator import embedded  # noqa: E402
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
STEERED = 2000  # steered check-ins timed in a 1,000-update round
# The tree before the one-node speed work (decode, query layer, batched worker hand-off,
# check-in commits without fsync); FEDGE_BENCH_BASELINE names another commit, "" skips it.
BASELINE = os.environ.get("FEDGE_BENCH_BASELINE", "4d5d502")


def baseline_tree(workdir: Path) -> Path | None:
    """The source tree of commit ``BASELINE`` (read from git, nothing in the work tree
    changes), or None without one."""
    if not BASELINE:
        return None
    out = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE],
                         capture_output=True, check=False)  # fmt: skip
    if out.returncode != 0:
        print(f"[bench_coordinator] no baseline {BASELINE}: {out.stderr.decode().strip()}",
              file=sys.stderr)  # fmt: skip
        return None
    dest = workdir / "baseline"
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


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


@contextlib.contextmanager
def _served_from(source: Path | None) -> Iterator[None]:
    """Start a coordinator process from ``source`` (None: this tree): ``python -m`` puts its
    working directory first on the module path; the config file it is given holds only the
    keys that tree's ``CoordinatorConfig`` knows (newer ones keep their defaults there)."""
    if source is None:
        yield
        return
    probe = ("import dataclasses, json, coordinator.config as c; "
             "print(json.dumps([f.name for f in dataclasses.fields(c.CoordinatorConfig)]))")
    known = set(json.loads(subprocess.run([sys.executable, "-c", probe], cwd=source, check=True,
                                          capture_output=True, text=True).stdout))  # fmt: skip

    def asdict(config: Any) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(config).items() if k in known}

    shim = types.SimpleNamespace(asdict=asdict, replace=dataclasses.replace)
    with contextlib.chdir(source), mock.patch.object(embedded, "dataclasses", shim):
        yield


def run_round(
    bundle: Path, updates: int, frames: list[bytes], workdir: Path, group_commit: bool = True,
    source: Path | None = None,
) -> dict[str, Any]:
    """One coordinator process, one round of ``updates`` reports; returns figures. With
    ``source`` the server runs that source tree (``python -m`` puts its working directory
    first on the module path)."""
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
    coord = EmbeddedCoordinator(db, subprocess=True, group_commit=group_commit)
    with _served_from(source):
        coord.start()
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
        extra = STEERED if updates >= 1000 else 0
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
            "code": "before" if source else "after",
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


def decode_cpu_ms(frame: bytes, baseline: Path | None) -> dict[str, float]:
    """CPU ms to decode one int8 payload of the model, median of 5 x 200, with this tree's
    codec and (``before``) the baseline tree's ``quantize.py`` loaded beside it; both must
    decode to the same vector."""
    import importlib.util

    from edge_sdk.codecs.quantize import QuantizedCodec
    from edge_sdk.frame import decode_frame

    payload = decode_frame(frame).payload
    codecs = {"after": QuantizedCodec()}
    if baseline is not None:
        spec = importlib.util.spec_from_file_location(
            "baseline_quantize", baseline / "edge_sdk" / "codecs" / "quantize.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        codecs["before"] = module.QuantizedCodec()
        before = codecs["before"].decode(payload, NUM_PARAMETERS)
        assert np.array_equal(before, codecs["after"].decode(payload, NUM_PARAMETERS))
    times: dict[str, list[float]] = {name: [] for name in codecs}
    for _ in range(5):
        for name, codec in codecs.items():
            t0 = time.process_time()
            for _ in range(200):
                codec.decode(payload, NUM_PARAMETERS)
            times[name].append((time.process_time() - t0) / 200 * 1e3)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def label(run: dict[str, Any]) -> str:
    gc = "on" if run["group_commit"] else "off"
    return f"{run['updates']} updates, {run.get('code', 'after')}, group commit {gc}"


# The configurations of the 1,000-update rounds: (code, group commit).
CONFIGS = (("before", True), ("after", False), ("after", True))


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rss, rates) = plt.subplots(1, 2, figsize=(12, 4.2))
    for run in results["runs"]:
        xs, ys = zip(*run["rss_samples_mib"], strict=True)
        rss.plot(xs, ys, marker="o", ms=3, label=label(run))
    rss.set_xlabel("updates accepted in the round")
    rss.set_ylabel("coordinator RSS (MiB)")
    rss.set_ylim(bottom=0)
    rss.set_title("Coordinator RSS, 100k-param int8 updates")
    rss.legend(fontsize=7)
    names = ("uploads/s", "steered check-ins/s")
    keys = (("uploads_per_s", "upload_cpu_ms"),
            ("checkins_steered_per_s", "checkin_steered_cpu_ms"))  # fmt: skip
    xs = np.arange(len(names))
    width = 0.8 / len(CONFIGS)
    for k, (code, gc) in enumerate(CONFIGS):
        runs = [r for r in results["runs"][1:] if r["code"] == code and r["group_commit"] == gc]
        offset = (k - (len(CONFIGS) - 1) / 2) * width
        means = [float(np.mean([r[rate] for r in runs])) for rate, _ in keys]
        rates.bar(xs + offset, means, width, label=f"{code}, group commit {'on' if gc else 'off'}")
        for x, (rate, cpu) in zip(xs + offset, keys, strict=True):
            rates.plot([x] * len(runs), [r[rate] for r in runs], "k.", ms=4)  # each repeat
            ms = float(np.mean([r[cpu]["server"] for r in runs]))
            rates.annotate(f"{ms:.2f} ms\nCPU", (x, max(r[rate] for r in runs)), ha="center",
                           va="bottom", fontsize=7)  # fmt: skip
    rates.set_xticks(xs, names)
    rates.set_ylim(top=rates.get_ylim()[1] * 1.2)
    rates.set_title("1,000-update rounds, configurations alternating (dots: repeats)")
    rates.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _mean(runs: list[dict[str, Any]], get: Callable[[dict[str, Any]], float]) -> float:
    return float(np.mean([get(r) for r in runs]))


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"[bench_coordinator] encoding {1000} distinct updates", file=sys.stderr, flush=True)
    frames = [
        encode_update(rng.normal(0, 0.01, NUM_PARAMETERS).astype(np.float32), CODEC, rng=rng)[0]
        for _ in range(1000)
    ]
    with tempfile.TemporaryDirectory(prefix="bench-coordinator-") as tmp:
        work = Path(tmp)
        bundle = make_synthetic_bundle(work / "bundle", NUM_PARAMETERS)
        baseline = baseline_tree(work)
        configs = [c for c in CONFIGS if baseline is not None or c[0] == "after"]
        runs = []
        # The configurations alternate, so that the shared cores' changing load falls on all.
        for n, (code, gc) in ((10, ("after", True)), *[(1000, c) for c in configs] * REPEATS):
            print(f"[bench_coordinator] {label({'updates': n, 'group_commit': gc, 'code': code})}",
                  file=sys.stderr, flush=True)  # fmt: skip
            source = baseline if code == "before" else None
            runs.append(run_round(bundle, n, frames, work, gc, source))
        decode = decode_cpu_ms(frames[0], baseline)
        print("[bench_coordinator] durable path in-process", file=sys.stderr, flush=True)
        durable = [durable_path(bundle, DURABLE_UPDATES, frames, work, b, rep)
                   for rep in range(REPEATS) for b in (1, 32)]  # fmt: skip
    small = runs[0]

    def group(code: str, gc: bool) -> list[dict[str, Any]]:
        return [r for r in runs[1:] if r["code"] == code and r["group_commit"] == gc]

    after = group("after", True)
    before = group("before", True)
    summary: dict[str, Any] = {}
    for name, rate, cpu in (("uploads", "uploads_per_s", "upload_cpu_ms"),
                            ("steered_checkins", "checkins_steered_per_s",
                             "checkin_steered_cpu_ms")):  # fmt: skip
        entry: dict[str, float] = {}
        for code, rs in (("before", before), ("after", after)):
            if rs:
                entry[f"{code}_per_s"] = float(np.mean([r[rate] for r in rs]))
                entry[f"{code}_server_cpu_ms"] = float(np.mean([r[cpu]["server"] for r in rs]))
                entry[f"{code}_client_cpu_ms"] = float(np.mean([r[cpu]["client"] for r in rs]))
        for code in ("before", "after"):
            if f"{code}_server_cpu_ms" in entry:
                # What one core of server CPU would acknowledge, whatever else ran.
                entry[f"{code}_capacity_per_core"] = 1e3 / entry[f"{code}_server_cpu_ms"]
        if before:
            entry["ratio_per_s"] = entry["after_per_s"] / entry["before_per_s"]
            entry["ratio_server_cpu"] = entry["after_server_cpu_ms"] / entry["before_server_cpu_ms"]
        summary[name] = entry
    results = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average": os.getloadavg(),
        },
        "baseline": BASELINE if baseline is not None else None,
        "num_parameters": NUM_PARAMETERS,
        "codec": CODEC,
        "client_threads": THREADS,
        "upload_threads": UPLOAD_THREADS,
        "runs": runs,
        "durable_path": durable,
        "decode_cpu_ms": decode,
        "summary": summary,
        "rss_peak_ratio_1000_vs_10": max(r["rss_peak_mib"] for r in after) / small["rss_peak_mib"],
        "uploads_ratio_group_commit": _mean(after, lambda r: r["uploads_per_s"])
        / _mean(group("after", False), lambda r: r["uploads_per_s"]),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_coordinator.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, RESULTS / "bench_coordinator.png")
    heads = ["10, after/on"] + [f"{r['code']}/{'on' if r['group_commit'] else 'off'}"
                                for r in runs[1:]]  # fmt: skip
    print(f"| {'figure (code / group commit)':42} | " + " | ".join(f"{h:>12}" for h in heads)
          + " |")  # fmt: skip
    print(f"|{'-' * 44}|" + "|".join("-" * 13 + ":" for _ in heads) + "|")
    rows = [
        ("registrations/s", lambda r: r["registrations_per_s"], "{:.0f}"),
        ("check-ins/s, candidate (1 DB write)", lambda r: r["checkins_candidate_per_s"], "{:.0f}"),
        ("check-ins/s, steered away (no write)", lambda r: r["checkins_steered_per_s"], "{:.0f}"),
        ("  coordinator CPU ms per steered check-in",
         lambda r: r["checkin_steered_cpu_ms"] and r["checkin_steered_cpu_ms"]["server"], "{:.3f}"),
        ("uploads/s (int8, acknowledged)", lambda r: r["uploads_per_s"], "{:.1f}"),
        ("  coordinator CPU ms per upload", lambda r: r["upload_cpu_ms"]["server"], "{:.2f}"),
        ("  client CPU ms per upload", lambda r: r["upload_cpu_ms"]["client"], "{:.2f}"),
        ("upload frame bytes", lambda r: r["upload_bytes"], "{:,}"),
        ("coordinator RSS before uploads (MiB)", lambda r: r["rss_before_uploads_mib"], "{:.1f}"),
        ("coordinator RSS peak (MiB)", lambda r: r["rss_peak_mib"], "{:.1f}"),
    ]  # fmt: skip
    for name, get, fmt in rows:
        cells = ["-" if get(r) is None else fmt.format(get(r)) for r in runs]
        print(f"| {name:42} | " + " | ".join(f"{c:>12}" for c in cells) + " |")
    print("\nmeans of the 1,000-update rounds, group commit on (capacity: 1,000 / server CPU ms):")
    for name, e in summary.items():
        line = f"  {name}: after {e['after_per_s']:.0f}/s, {e['after_server_cpu_ms']:.3f} ms " \
               f"server CPU (capacity {e['after_capacity_per_core']:.0f}/s per core)"
        if "ratio_per_s" in e:
            line += (f"; before {e['before_per_s']:.0f}/s, {e['before_server_cpu_ms']:.3f} ms "
                     f"(capacity {e['before_capacity_per_core']:.0f}/s); after/before rate "
                     f"{e['ratio_per_s']:.2f}x, server CPU {e['ratio_server_cpu']:.2f}x")
        print(line)
    print("\nint8 decode of one update, CPU ms: "
          + ", ".join(f"{k} {v:.3f}" for k, v in decode.items()))
    print("\nin-process, no HTTP (durable path):")
    for d in durable:
        print(f"  batch {d['batch']:>2}: {d['uploads_per_s']:6.1f} uploads/s; per upload "
              f"{d['cpu_ms_per_upload']:.2f} ms CPU, {d['runqueue_ms_per_upload']:.2f} ms "
              f"waiting for a CPU, {d['blocked_ms_per_upload']:.2f} ms blocked")  # fmt: skip
    ratio = results["uploads_ratio_group_commit"]
    print(f"\nuploads/s with group commit vs without (after, means): {ratio:.2f}x")
    print(f"peak RSS ratio, 1,000 vs 10 updates: {results['rss_peak_ratio_1000_vs_10']:.3f}")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
