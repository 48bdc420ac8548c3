"""Writers of several processes taking turns on one SQLite file: with the writers' queue
(:class:`~coordinator.store.sqlite.WriterLock`, an ``flock`` polled every 20 µs to 1 ms) and
with SQLite's busy handler alone (it sleeps 1, 2, 5, 10, ... ms between tries).

K processes (1, 2, 3) each open the real :class:`~coordinator.store.sqlite.SQLiteStore`
(WAL, ``synchronous=FULL``: every commit is fsynced) and repeat, for ``--seconds``: a
transaction of ``--rows`` inserts of 300 bytes and ``--inside-ms`` of CPU work (about one
batch of uploads: their rows, their checks and folds), then ``--outside-ms`` of CPU work
outside any transaction (what a serving process does between its batches: HTTP, decoding).
Measured: committed transactions per second over all the processes, and the median and 99th
percentile of the wait for a turn. Variants alternate in each repeat (``--repeats``), so
that the shared cores' load falls on both; the table gives medians over the repeats, and
the ratio of the two variants at each K.

Run: ``./dev bench bench_writer_lock`` (about a minute). Writes
``benchmarks/results/bench_writer_lock.json`` and ``bench_writer_lock.png``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.store.sqlite import SQLiteStore

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"queue (flock)": True, "SQLite busy handler": False}


def _spin(ms: float) -> None:
    end = time.thread_time() + ms / 1e3
    while time.thread_time() < end:
        pass


def _writer(
    path: str, queue: bool, rows: int, inside_ms: float, outside_ms: float, start_at: float,
    seconds: float, out: Any,
) -> None:  # fmt: skip
    store = SQLiteStore(path, queue_writers=queue)
    conn = store.db.conn
    payload = os.urandom(300)
    waits: list[float] = []
    done = 0
    while time.time() < start_at:
        time.sleep(0.001)
    end = start_at + seconds
    while time.time() < end:
        asked = time.perf_counter()
        with store.atomic():
            waits.append(time.perf_counter() - asked)
            conn.executemany("insert into bench_rows (body) values (?)", [(payload,)] * rows)
            _spin(inside_ms)
        done += 1
        _spin(outside_ms)
    store.close()
    out.put((done, waits))


def measure(workdir: Path, k: int, queue: bool, args: argparse.Namespace) -> dict[str, Any]:
    path = str(Path(tempfile.mkdtemp(dir=workdir)) / "fedge.db")
    setup = SQLiteStore(path)
    setup.db.conn.execute("create table bench_rows (id integer primary key, body blob)")
    setup.close()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 1.5  # every process started and connected
    procs = [
        ctx.Process(
            target=_writer,
            args=(
                path,
                queue,
                args.rows,
                args.inside_ms,
                args.outside_ms,
                start_at,
                args.seconds,
                out,
            ),
        )
        for _ in range(k)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=60 + args.seconds) for _ in procs]
    for p in procs:
        p.join(10)
    waits = np.array([w for _, ws in results for w in ws]) * 1e3
    done = sum(d for d, _ in results)
    return {
        "processes": k,
        "queue": queue,
        "transactions_per_s": done / args.seconds,
        "wait_ms_p50": float(np.percentile(waits, 50)),
        "wait_ms_p99": float(np.percentile(waits, 99)),
    }


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ks = sorted({s["processes"] for s in summary})
    width = 0.38
    for i, (name, queue) in enumerate(VARIANTS.items()):
        rates = [next(s["transactions_per_s"] for s in summary
                      if s["processes"] == k and s["queue"] == queue) for k in ks]  # fmt: skip
        ax.bar([k + (i - 0.5) * width for k in ks], rates, width, label=name)
    ax.set_xticks(ks)
    ax.set_xlabel("writing processes on one SQLite file")
    ax.set_ylabel("committed transactions/s (all processes)")
    ax.set_title("Taking turns on one SQLite file (median of repeats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--inside-ms", type=float, default=3.0)
    p.add_argument("--outside-ms", type=float, default=3.0)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--quick", action="store_true", help="1 s, one repeat, K = 1 and 2")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.repeats, args.processes = 1.0, 1, [1, 2]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-writer-lock-") as tmp:
        for rep in range(args.repeats):
            for k in args.processes:
                for name, queue in VARIANTS.items():
                    r = measure(Path(tmp), k, queue, args)
                    runs.append({**r, "repeat": rep})
                    print(f"[bench_writer_lock] repeat {rep + 1}/{args.repeats}, {k} "
                          f"process(es), {name}: {r['transactions_per_s']:.0f} tx/s",
                          file=sys.stderr, flush=True)  # fmt: skip
    summary = []
    for k in args.processes:
        for queue in VARIANTS.values():
            mine = [r for r in runs if r["processes"] == k and r["queue"] == queue]
            summary.append({
                "processes": k,
                "queue": queue,
                **{key: statistics.median(r[key] for r in mine)
                   for key in ("transactions_per_s", "wait_ms_p50", "wait_ms_p99")},
            })  # fmt: skip
    ratios = {}
    print(f"\n{'processes':>9} | {'variant':<20} | {'tx/s':>7} | {'wait p50 ms':>11} | "
          f"{'wait p99 ms':>11}")  # fmt: skip
    for s in summary:
        name = next(n for n, q in VARIANTS.items() if q == s["queue"])
        print(f"{s['processes']:>9} | {name:<20} | {s['transactions_per_s']:7.0f} | "
              f"{s['wait_ms_p50']:11.2f} | {s['wait_ms_p99']:11.2f}")  # fmt: skip
    for k in args.processes:
        by = {s["queue"]: s["transactions_per_s"] for s in summary if s["processes"] == k}
        ratios[str(k)] = by[True] / by[False]
        print(f"{k} process(es): queue / busy handler = {ratios[str(k)]:.2f}x")
    load = os.getloadavg()[0]
    print(f"load average during the run: {load:.1f} on {os.cpu_count()} cores")
    results = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average": load,
        },
        "settings": {
            "seconds": args.seconds,
            "repeats": args.repeats,
            "rows": args.rows,
            "inside_ms": args.inside_ms,
            "outside_ms": args.outside_ms,
            "quick": args.quick,
        },
        "runs": runs,
        "summary": summary,
        "ratio_queue_vs_busy_handler": ratios,
    }
    out_dir = Path(tempfile.gettempdir()) if args.quick else RESULTS
    out_dir.mkdir(exist_ok=True)
    out = out_dir / "bench_writer_lock.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    plot(summary, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
