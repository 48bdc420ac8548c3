"""The store's hot operations on SQLite and on PostgreSQL, in one run on one machine.

Each backend runs the same workload through the :class:`~coordinator.store.base.Store`
interface, from one thread, as the service calls it (one worker thread per process):

* ``add_device``: a registration (one insert, committed);
* ``get_device``: the authentication of every device request (primary-key read);
* ``list_tasks``: the task lookup of every check-in (a small table, filtered);
* ``add_candidate``: a check-in admitted as candidate (insert-or-ignore, committed);
* ``get_assignment``: the lookup of every upload (primary-key read);
* ``add_update``: an upload acknowledged (insert the update, mark the assignment reported:
  one transaction, committed);
* ``update_totals`` and ``round_updates``: the commit's aggregate query and its read of every
  update of a round of ``n`` updates.

Both backends are durable as the service uses them: SQLite in WAL mode with
``synchronous=FULL``, PostgreSQL with the server defaults (``fsync=on``,
``synchronous_commit=on``) over TCP on 127.0.0.1. The SQLite file lives on the same disk as
PostgreSQL's cluster (the repository's ``.cache/``). PostgreSQL is the server
``scripts/postgres.sh`` starts (or ``$FEDGE_TEST_POSTGRES_DSN``), each repeat in a fresh
schema. Each figure is the median over ``--repeats`` repeats, backends interleaved so that
the load other jobs put on the shared cores hits both alike; compare the ratios.

Run: ``./dev bench bench_store`` (about 2 minutes; ``--quick`` for a smoke run). Writes
``benchmarks/results/bench_store.json`` and ``bench_store.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
OPS = ("add_device", "get_device", "list_tasks", "add_candidate", "get_assignment",
       "add_update", "update_totals", "round_updates")  # fmt: skip
WRITES = {"add_device", "add_candidate", "add_update"}
BACKENDS = ("sqlite", "postgresql")


def postgres_url() -> str:
    url = os.environ.get("FEDGE_TEST_POSTGRES_DSN")
    if url:
        return url
    done = subprocess.run([str(ROOT / "scripts" / "postgres.sh"), "dsn"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return done.stdout.strip()


@contextmanager
def open_backend(backend: str, server: str) -> Iterator[Any]:
    """A fresh, empty store of that backend; removed afterwards."""
    from coordinator.store import open_store

    if backend == "sqlite":
        directory = ROOT / ".cache" / f"bench_store_{uuid.uuid4().hex[:8]}"
        directory.mkdir(parents=True)
        store = open_store(directory / "store.db")
        try:
            yield store
        finally:
            store.close()
            shutil.rmtree(directory)
        return
    import psycopg

    sys.path.insert(0, str(ROOT))
    from tests.fixtures.postgres import in_schema

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'create schema "{schema}"')
    store = open_store(in_schema(server, schema))
    try:
        yield store
    finally:
        store.close()
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'drop schema "{schema}" cascade')


def workload(store: Any, n: int) -> dict[str, float]:
    """Seconds per operation, for each of :data:`OPS`, on an empty store."""
    from coordinator.store import Assignment, Device, Round, Task, Update

    store.add_bundle("b-1", {"num_parameters": 100_000, "files": {}}, 0.0)
    for i in range(4):  # a few tasks, as a coordinator holds
        store.add_task(Task(f"t-{i}", "bench", "b-1", "sync", "default", {"goal": n}, "running",
                            0, 0, 0, float(i)))  # fmt: skip
    rnd = store.add_round(Round(0, "t-0", 1, "train", "reporting", 0, n, n, n, 1.0, 2.0))
    ids = [f"d-{i:06d}" for i in range(n)]
    report = {"num_examples": 32, "loss": 0.5, "accuracy": 0.9}
    steps: dict[str, Callable[[int], Any]] = {
        "add_device": lambda i: store.add_device(Device(ids[i], "00" * 16, "ab" * 32, "android",
                                                        "arm64", ("ort-step",), "default",
                                                        float(i))),
        "get_device": lambda i: store.get_device(ids[i]),
        "list_tasks": lambda i: store.list_tasks(population="default"),
        "add_candidate": lambda i: store.add_candidate(rnd.round_id, ids[i], float(i)),
        "get_assignment": lambda i: store.get_assignment(f"a-{i}"),
        "add_update": lambda i: store.add_update(Update(f"a-{i}", rnd.round_id, "t-0", ids[i],
                                                        f"k-{i}", f"{i:064x}", 101_596, 32,
                                                        0.5, report, float(i), {"ok": 1})),
        "update_totals": lambda i: store.update_totals(rnd.round_id),
        "round_updates": lambda i: sum(1 for _ in store.round_updates(rnd.round_id)),
    }  # fmt: skip
    # Not timed: writes that bring each engine's log to its steady size (SQLite's WAL file
    # grows during its first thousand pages, then is reused after each checkpoint; a
    # coordinator that has run for a while is past that), and the assignments the uploads
    # report on.
    for i in range(n):
        store.add_device(Device(f"w-{i:06d}", "00" * 16, "ab" * 32, "android", "arm64",
                                ("ort-step",), "default", 0.0))  # fmt: skip
    store.add_assignments([Assignment(f"a-{i}", rnd.round_id, "t-0", ids[i], "train",
                                      "delivered", 1.0) for i in range(n)])  # fmt: skip
    out = {}
    for op in OPS:
        count = 20 if op in ("update_totals", "round_updates") else n
        t0 = time.perf_counter()
        for i in range(count):
            steps[op](i)
        out[op] = (time.perf_counter() - t0) / count
    assert store.count_updates(rnd.round_id) == n
    return out


def plot(results: dict[str, dict[str, float]], runs: dict[str, list[dict[str, float]]], n: int,
         path: Path) -> None:  # fmt: skip
    """Bars: medians; whiskers: the fastest and slowest repeat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=120)
    width = 0.38
    for k, (backend, color) in enumerate(zip(BACKENDS, ("tab:blue", "tab:orange"), strict=True)):
        xs = [i + (k - 0.5) * width for i in range(len(OPS))]
        mid = [results[backend][op] * 1e6 for op in OPS]
        low = [m - min(r[op] for r in runs[backend]) * 1e6 for m, op in zip(mid, OPS, strict=True)]
        high = [max(r[op] for r in runs[backend]) * 1e6 - m for m, op in zip(mid, OPS, strict=True)]
        ax.bar(xs, mid, width, color=color, label=backend, yerr=[low, high], capsize=2,
               error_kw={"linewidth": 0.8})  # fmt: skip
    ax.set_xticks(range(len(OPS)), [op + (" *" if op in WRITES else "") for op in OPS],
                  rotation=20, fontsize=8)  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylabel("microseconds per call (log)")
    ax.set_title(f"Store operations, one thread, durable commits (* = write); round of {n} "
                 "updates", fontsize=9)  # fmt: skip
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def table(results: dict[str, dict[str, float]]) -> str:
    rows = [("operation", "SQLite us", "SQLite /s", "PostgreSQL us", "PostgreSQL /s",
             "PG / SQLite")]  # fmt: skip
    for op in OPS:
        s, p = results["sqlite"][op], results["postgresql"][op]
        name = op + (" (write)" if op in WRITES else "")
        rows.append((name, f"{s * 1e6:,.0f}", f"{1 / s:,.0f}", f"{p * 1e6:,.0f}", f"{1 / p:,.0f}",
                     f"{p / s:.2f}x"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |"
             for r in rows]  # fmt: skip
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run (a few seconds)")
    p.add_argument("--n", type=int, default=None, help="calls per operation (default 1000)")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    n = args.n or (50 if args.quick else 1000)
    repeats = args.repeats or (1 if args.quick else 3)
    sys.path.insert(0, str(ROOT))
    server = postgres_url()
    runs: dict[str, list[dict[str, float]]] = {b: [] for b in BACKENDS}
    for r in range(repeats):
        for backend in BACKENDS:
            with open_backend(backend, server) as store:
                runs[backend].append(workload(store, n))
            print(f"repeat {r + 1}/{repeats}: {backend} done", file=sys.stderr, flush=True)
    results = {b: {op: statistics.median(run[op] for run in runs[b]) for op in OPS}
               for b in BACKENDS}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, runs, n, args.out / "bench_store.png")
    doc = {
        "benchmark": "bench_store",
        "calls_per_operation": n,
        "repeats": repeats,
        "aggregate": "median seconds per call over repeats",
        "seconds_per_call": results,
        "per_repeat": runs,
        "postgresql_to_sqlite": {
            op: results["postgresql"][op] / results["sqlite"][op] for op in OPS
        },
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
    }
    (args.out / "bench_store.json").write_text(json.dumps(doc, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
