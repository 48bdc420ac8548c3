"""Coordinator replicas on PostgreSQL: uploads/s, check-ins/s and RSS for 1, 2 and 3 replicas.

Each configuration gets a fresh PostgreSQL schema (the server ``scripts/postgres.sh`` runs,
``$FEDGE_TEST_POSTGRES_DSN``) and a fresh shared blob directory, and runs ``fedge serve``
processes on them: one process alone (not in replica mode: the baseline), then 1, 2 and 3
``fedge serve --replica`` processes. The load generator is this process: devices are threads
speaking the wire protocol with ``http.client`` (tests.fixtures.coordinator), every call going to
the next replica in turn, as a round-robin load balancer would send it. One synchronous round
of a synthetic 100,000-parameter model takes ``updates`` int8 uploads (block 256, every upload
a payload of its own: identical payloads would share one content-addressed blob, and every
upload after the first would skip its fsync), with goal = updates and no over-selection.

Measured per configuration:

* registrations/s; *candidate* check-ins/s (into the selection window: one write each) and
  *steered* check-ins/s (the round is full: pace-steered away, no write), 4 client threads;
* uploads/s: acknowledged updates (decoded, checked, payload fsynced into the shared blob
  directory, row and the replica's partial sum committed), 32 in flight, one new connection
  each; the round then commits (every partial sum added up) and is checked: every upload
  counted, and the new version equal to version 0 plus the weighted mean of the deltas sent;
* the replicas' CPU milliseconds per upload and per steered check-in, summed over the
  processes (``/proc``), and this client's; peak RSS (``VmHWM``) of each replica process.

The configurations run in the order alone, 1, 2, 3, 3, 2, 1 (``--repeats``), so that a drift
in the shared machine's load falls on all of them.

Run: ``./dev bench bench_replicas`` (5 to 10 min on the shared machine; ``--updates 100
--repeats 1 --no-doc`` for a quick look). Writes
``benchmarks/results/bench_replicas.json`` and ``bench_replicas.png`` and the "Replicas"
section of docs/benchmarks.md; with ``--no-doc`` the JSON and PNG go to the temporary
directory, and the committed ones, which the section cites, stay.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_coordinator import (  # noqa: E402
    CODEC,
    NUM_PARAMETERS,
    check_model,
    cpu_s,
    int8_frames,
    on_disk,
    proc_kib,
    timed,
    upload_weight,
)
from benchmarks.bench_step import write_section  # noqa: E402
from coordinator.admin import AdminClient  # noqa: E402
from coordinator.store import PartialSum, Round, Task, open_store  # noqa: E402
from edge_sdk.frame import decode_tensor  # noqa: E402
from tests.coordinator.replicas.fleet import ADMIN, ServedReplica, Spread  # noqa: E402
from tests.fixtures.coordinator import make_synthetic_bundle  # noqa: E402
from tests.fixtures.postgres import ENV, in_schema  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SECTION = "## Replicas"
UPLOAD_THREADS = 32
CHECKIN_THREADS = 4


def server_url() -> str:
    url = os.environ.get(ENV) or subprocess.run(
        [str(ROOT / "scripts" / "postgres.sh"), "dsn"], check=True, capture_output=True,
        text=True,
    ).stdout.strip()  # fmt: skip
    if not url:
        raise SystemExit(f"no PostgreSQL server: set ${ENV} or run scripts/postgres.sh")
    return url


@contextmanager
def fresh_schema(server: str) -> Iterator[str]:
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'create schema "{schema}"')
    try:
        url = in_schema(server, schema)
        check_durable(url)
        yield url
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'drop schema "{schema}" cascade')


def check_durable(url: str) -> None:
    """Exit unless a session of ``url`` (as the replicas open theirs: the server's, the
    database's, the role's and the URL's settings) returns from a commit only once it is on
    disk: the figures are those of acknowledged-means-durable uploads, and a test server is
    often tuned without (``fsync=off``, ``synchronous_commit=off``). Any other
    ``synchronous_commit`` value flushes the local WAL first."""
    import psycopg

    found = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for name in ("fsync", "synchronous_commit"):
            row = conn.execute(f"show {name}").fetchone()
            found[name] = None if row is None else str(row[0])
    if found["fsync"] != "on" or found["synchronous_commit"] == "off":
        raise SystemExit(f"the PostgreSQL server does not make a commit durable before it "
                         f"returns ({found}): no figure of acknowledged uploads from it")


class LockWaits:
    """Samples, on a thread, how many database sessions wait for a row lock taken with
    ``for update`` (the replicas' turns: nothing else on the server locks so): the mean of
    the samples is the mean number of replicas waiting for a round or a task."""

    def __init__(self, server: str, every_s: float = 0.02) -> None:
        import psycopg

        self.conn = psycopg.connect(server, autocommit=True)
        self.every_s = every_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            row = self.conn.execute(
                "select count(*) from pg_stat_activity where wait_event_type = 'Lock' "
                "and query like '%for update%'"
            ).fetchone()
            self.samples.append(int(row[0]) if row else 0)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.conn.close()
        return float(np.mean(self.samples)) if self.samples else 0.0


class ReplicaCosts:
    """CPU seconds the replica processes and this client used from now on."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.server = sum(cpu_s(p) for p in pids)
        self.client = _client_cpu()

    def per_item(self, n: int) -> dict[str, float]:
        return {
            "servers": (sum(cpu_s(p) for p in self.pids) - self.server) / n * 1e3,
            "client": (_client_cpu() - self.client) / n * 1e3,
        }


def _client_cpu() -> float:
    import time

    return time.process_time()


def run(
    server: str, work: Path, bundle: Path, frames: list[bytes], replicas: int, alone: bool,
    updates: int, steered: int,
) -> dict[str, Any]:  # fmt: skip
    name = "alone" if alone else f"{replicas} replica{'s' if replicas > 1 else ''}"
    if len(set(frames[:updates])) < updates:
        # A payload sent twice is found in the blob directory: no write, no fsync, so the
        # rate would not be that of acknowledged-means-durable uploads.
        raise ValueError(f"{updates} uploads need a payload of their own each, "
                         f"{len(set(frames[:updates]))} distinct given")  # fmt: skip
    print(f"[bench_replicas] {name}", file=sys.stderr, flush=True)
    plan = {"rounds": 1, "goal": updates, "over_selection": 1.0, "selection_window_s": 0.0,
            "round_deadline_s": 3600.0, "codec": CODEC, "max_update_norm": None,
            "robust": "none", "eligibility": {"require_charging": False}}  # fmt: skip
    run_dir = on_disk(Path(tempfile.mkdtemp(dir=work)))  # the shared blob directory's
    with fresh_schema(server) as url, ExitStack() as stack:
        procs = []
        for i in range(replicas):
            p = ServedReplica(url, run_dir / "blobs", run_dir / f"r{i}.log", replica=not alone)
            stack.callback(p.stop)
            procs.append(p)
        pids = [p.process.pid for p in procs]
        urls = [p.url for p in procs]
        admin = AdminClient(urls[0], ADMIN)
        task_id = admin.create_task(admin.upload_bundle(bundle)["bundle_id"], plan)["task_id"]

        def register(i: int) -> Spread:
            d = Spread(urls, start=i)
            d.close()  # like a phone: connect, ask, go away
            return d

        def check_in(i: int) -> dict[str, Any]:
            try:
                return devices[i].check_in()
            finally:
                devices[i].close()

        reg_rate, devices = timed(updates, register, CHECKIN_THREADS)
        cand_rate, first = timed(updates, check_in, CHECKIN_THREADS)
        _, second = timed(updates, check_in, CHECKIN_THREADS)
        aids = {
            i: (a if a["action"] == "train" else first[i])["assignment"]["assignment_id"]
            for i, a in enumerate(second)
        }
        base = decode_tensor(devices[0].params(task_id, 0))
        devices[0].close()
        local = threading.local()
        # One device a client thread, its calls spread over the replicas; registered (a
        # write) before the clock starts, so that the figures are steered check-ins' only.
        # next() on a list's iterator is atomic: each thread takes a device of its own.
        outside = iter([register(i) for i in range(CHECKIN_THREADS)])

        def steer(i: int) -> None:
            dev = getattr(local, "dev", None)
            if dev is None:
                dev = local.dev = next(outside)
            assert dev.check_in()["reason"] == "window_full"

        costs = ReplicaCosts(pids)
        steer_rate, _ = timed(steered, steer, CHECKIN_THREADS)
        steer_cost = costs.per_item(steered)

        def upload(i: int) -> None:
            status, body = devices[i].upload_raw(
                aids[i], frames[i], report={"num_examples": upload_weight(i)}
            )
            devices[i].close()
            assert status == 200, body

        costs, waits = ReplicaCosts(pids), LockWaits(server)
        up_rate, _ = timed(updates, upload, UPLOAD_THREADS)
        up_cost, waiting = costs.per_item(updates), waits.stop()
        rounds = admin.rounds(task_id)
        assert rounds[0]["state"] == "committed", rounds
        assert admin.status()["updates_accepted"] == updates
        store = open_store(url)
        try:
            assert store.round_partials(store.list_rounds(task_id)[0].round_id) == []
        finally:
            store.close()
        check_model(devices[0], task_id, base, frames[:updates])
        served = np.bincount([i for d in devices for i in d.served_by], minlength=replicas)
        return {
            "name": name,
            "replicas": replicas,
            "alone": alone,
            "updates": updates,
            "registrations_per_s": reg_rate,
            "checkins_candidate_per_s": cand_rate,
            "checkins_steered_per_s": steer_rate,
            "uploads_per_s": up_rate,
            "upload_cpu_ms": up_cost,
            "waiting_for_a_lock": waiting,
            "checkin_steered_cpu_ms": steer_cost,
            "rss_peak_mib": [proc_kib(p, "VmHWM") / 1024 for p in pids],
            "calls_per_replica": served.tolist(),
        }


def partial_write_ms(server: str, repeats: int = 30) -> float:
    """Milliseconds to commit one replica's partial sum of a 100,000-parameter round (the
    write a replica adds once per ``replica_partial_every`` uploads), median of ``repeats``."""
    import time

    with fresh_schema(server) as url:
        store = open_store(url)
        try:
            store.add_bundle("b", {"num_parameters": NUM_PARAMETERS, "files": {}}, 0.0)
            store.add_task(Task("t", "x", "b", "sync", "default", {}, "running", 0, 0, 0, 0.0))
            rnd = store.add_round(Round(0, "t", 1, "train", "reporting", 0, 1, 1, 1, 0.0, 0.0))
            total = np.random.default_rng(0).normal(size=NUM_PARAMETERS)
            times = []
            for i in range(repeats):
                row = PartialSum(rnd.round_id, "r", i, 1.0, 1, 0, 0, (total + i).tobytes(), 0.0)
                t0 = time.perf_counter()
                with store.atomic():
                    store.put_partial(row)
                times.append(time.perf_counter() - t0)
            return float(np.median(times)) * 1e3
        finally:
            store.close()


def table(results: dict[str, Any]) -> str:
    rows = [
        "| configuration | uploads/s | steered check-ins/s | candidate check-ins/s "
        "| replicas' CPU ms per upload | per steered check-in | client CPU ms per upload "
        "| cores busy in replicas while uploading | replicas waiting for a lock, mean "
        "| RSS peak per process (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in dict.fromkeys(r["name"] for r in results["runs"]):
        runs = [r for r in results["runs"] if r["name"] == name]

        def cell(
            key: str, sub: str | None = None, fmt: str = "{:.0f}", runs: list[Any] = runs
        ) -> str:
            vals = [r[key][sub] if sub else r[key] for r in runs]
            return ", ".join(fmt.format(v) for v in vals)

        rss = "; ".join(", ".join(f"{m:.0f}" for m in r["rss_peak_mib"]) for r in runs)
        busy = ", ".join(f"{r['uploads_per_s'] * r['upload_cpu_ms']['servers'] / 1e3:.2f}"
                         for r in runs)  # fmt: skip
        rows.append(
            f"| {name} | {cell('uploads_per_s')} | {cell('checkins_steered_per_s')} "
            f"| {cell('checkins_candidate_per_s')} "
            f"| {cell('upload_cpu_ms', 'servers', '{:.2f}')} "
            f"| {cell('checkin_steered_cpu_ms', 'servers', '{:.2f}')} "
            f"| {cell('upload_cpu_ms', 'client', '{:.2f}')} | {busy} "
            f"| {cell('waiting_for_a_lock', fmt='{:.2f}')} | {rss} |"
        )
    return "\n".join(rows)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["name"] for r in results["runs"]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in (
        (axes[0], "uploads_per_s", "acknowledged int8 uploads/s"),
        (axes[1], "checkins_steered_per_s", "steered check-ins/s"),
    ):
        for x, name in enumerate(names):
            vals = [r[key] for r in results["runs"] if r["name"] == name]
            ax.bar(x, float(np.mean(vals)), 0.6, color="C0" if name != "alone" else "C7")
            ax.plot([x] * len(vals), vals, "k.", ms=5)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title)
    for x, name in enumerate(names):
        for r in (r for r in results["runs"] if r["name"] == name):
            axes[2].plot([x] * len(r["rss_peak_mib"]), r["rss_peak_mib"], "o", color="C1", ms=4)
    axes[2].set_xticks(range(len(names)), names)
    axes[2].set_ylim(bottom=0)
    axes[2].set_title("peak RSS per process (MiB)")
    fig.suptitle("fedge serve on one PostgreSQL, 2 shared cores (load generator included)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _mean(results: dict[str, Any], name: str, key: str, sub: str | None = None) -> float:
    vals = [r[key][sub] if sub else r[key] for r in results["runs"] if r["name"] == name]
    return float(np.mean(vals))


def _cost(extra_ms: float, three_ms: float) -> str:
    three = f"{three_ms:.2f} ms per upload with three"
    if extra_ms >= 0:
        return f"+{extra_ms:.2f} ms of coordinator CPU (one replica against one process; {three})"
    return (f"not measurable this run (one replica took {-extra_ms:.2f} ms less than the process "
            "alone, which runs once, first, and so takes any drift of the machine alone; "
            f"{three})")


def doc(results: dict[str, Any]) -> str:
    one, three = "1 replica", "3 replicas"
    up = {n: _mean(results, n, "uploads_per_s") for n in ("alone", one, three)}
    cpu = {n: _mean(results, n, "upload_cpu_ms", "servers") for n in ("alone", one, three)}
    client = _mean(results, one, "upload_cpu_ms", "client")
    steer = {n: _mean(results, n, "checkins_steered_per_s") for n in (one, three)}
    waiting = {n: _mean(results, n, "waiting_for_a_lock") for n in ("2 replicas", three)}
    rss = max(m for r in results["runs"] for m in r["rss_peak_mib"])
    return f"""{SECTION}

`benchmarks/bench_replicas.py` (issue 15): `fedge serve` processes on one PostgreSQL database
(the test server, `scripts/postgres.sh`) and one shared blob directory, one synchronous round
of a 100,000-parameter model with {results["updates"]} int8 uploads; every device call goes to
the next process in turn (a round-robin load balancer). "alone" is one process without
`--replica` (sums in memory, no row locks); the others run `fedge serve --replica`. Each cell
lists the runs in the order they ran ({"alone, 1, 2, 3, then 3, 2, 1" if len(results["runs"]) > 4
else "alone, 1, 2, 3"}). CPU: the replica processes'
own time summed (`/proc`), per item; "cores busy" = uploads/s x CPU per upload. Machine:
{results["machine"]}, load average {results["load_before"]} before the run and
{results["load_after"]} after (a load above 2 means other jobs shared the cores).

{table(results)}

Means: {up["alone"]:.0f} uploads/s alone, {up[one]:.0f} with one replica, {up[three]:.0f} with
three ({up[three] / up[one]:.2f}x one replica); steered check-ins {steer[one]:.0f}/s with one
replica, {steer[three]:.0f}/s with three ({steer[three] / steer[one]:.2f}x). Peak RSS per
process at most {rss:.0f} MiB, whatever the number of replicas.

Every upload carries a payload of its own since `8b415b3`: the replica figures of earlier
passes (above, up to the twelfth) cycled 16 payloads, so all but 16 uploads of each round
found their payload already in the content-addressed blob directory and skipped its write
and fsync; they timed cheaper uploads than these.

What replication costs per upload, measured: {_cost(cpu[one] - cpu["alone"], cpu[three])}.
What it adds is the statements that lock the round and the replica's partial sum, written in
a batch's transaction once `replica_partial_every` (64) of its updates of the round were
stored since its last write (an update no partial sum covers is folded again from its durable
payload at the commit). That write is also wall time on the replica's one worker
thread: committing one 100,000-parameter partial sum (0.8 MB of float64) took
{results["partial_write_ms"]:.0f} ms (median, measured alone after the runs, at this load),
once per 64 uploads of a replica. One replica acknowledged {up[one] / up["alone"]:.2f}x
the uploads of a process alone here.

Where several replicas lose time: uploads into one round serialise on the round's row lock
(each batch's transaction holds it from its first upload's goal check through its
partial-sum write to its commit, so that the goal holds and no close can slip in between).
While uploading, {waiting["2 replicas"]:.2f} of 2 replicas and {waiting[three]:.2f} of 3 were
waiting for a lock on average ("replicas waiting for a lock": sessions blocked in a
`for update`, sampled every 20 ms). One round's uploads therefore do not go faster with more
replicas; rounds of different tasks take different locks and proceed in parallel. Taking the
lock only near the goal (shared locks for uploads, a slot reservation committed on its own)
would lift that; it is not built.

What 2 cores allow: every process of the measurement shares the same two cores: the
replicas, the PostgreSQL server, and the load generator itself (Python threads speaking HTTP,
{client:.2f} ms of client CPU per upload), besides other engineers' jobs. Adding replicas
adds processes, not cores, so the rates cannot grow here: the table measures what replication
costs on such a machine, not what it gains. The
"cores busy" column is the share of the machine the replicas got while uploading. On hosts
of their own, each replica's CPU allows about 1,000 / (CPU ms per upload) uploads per second
per core, for rounds of different tasks in parallel; within one round the row lock above is
the bound, and PostgreSQL's commits and the shared blob directory's fsyncs are shared by all.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--updates", type=int, default=600)
    parser.add_argument("--steered", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2, help="1: alone, 1, 2, 3 only")
    parser.add_argument(
        "--no-doc", action="store_true",
        help="leave docs/benchmarks.md alone, and the results it cites: write the JSON and PNG "
        "to the temporary directory",
    )  # fmt: skip
    parser.add_argument(
        "--doc-only", action="store_true", help="write the docs section from the last results"
    )
    args = parser.parse_args()
    if args.doc_only:
        results = json.loads((RESULTS / "bench_replicas.json").read_text())
        print(table(results))
        plot(results, RESULTS / "bench_replicas.png")
        write_section(SECTION, doc(results))
        return
    server = server_url()
    frames = int8_frames(args.updates)
    order = [(1, True), (1, False), (2, False), (3, False)]
    if args.repeats > 1:
        order += [(3, False), (2, False), (1, False)]
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        work = Path(tmp)
        bundle = make_synthetic_bundle(work / "bundle", NUM_PARAMETERS)
        runs = [run(server, work, bundle, frames, n, alone, args.updates, args.steered)
                for n, alone in order]  # fmt: skip
    partial_ms = partial_write_ms(server)
    results = {
        "updates": args.updates,
        "steered": args.steered,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_before": load,
        "load_after": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
        "partial_write_ms": partial_ms,
        "runs": runs,
    }
    print()
    print(table(results))
    # The committed JSON and PNG are what the docs section is written from (--doc-only) and
    # cites: a run that leaves the docs alone leaves them too.
    out = Path(tempfile.gettempdir()) if args.no_doc else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_replicas.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "bench_replicas.png")
    print(f"wrote {out / 'bench_replicas.json'} and bench_replicas.png")
    if not args.no_doc:
        write_section(SECTION, doc(results))


if __name__ == "__main__":
    main()
