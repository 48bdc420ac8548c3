"""Cost that must not grow with history: round close time, database and blob directory size.

Two measurements, both on the real service (:class:`~coordinator.service.Coordinator` called
in-process, no HTTP: the cost under test is the store's; real SQLite file in WAL mode with
``synchronous=FULL``, real blob directory with fsync):

* **close time vs stored history.** A database is filled through the Store API with ``H``
  accepted updates of earlier rounds (100 per round, a version per round, as a long-running
  task without retention leaves them; payload blobs of closed rounds are gone, as the service
  deletes them at close), H = 1,000 and 500,000. Then real rounds run on that task: devices
  check in, upload ``GOAL`` int8 updates, and the upload that reaches the goal closes the
  round (metrics from aggregate queries, FedAvg commit, version blob, deletion of the round's
  payloads, each checked against the open rounds). Timed: that closing upload, and a plain
  upload for comparison. Also timed once at 500,000 with the new indexes dropped (the
  coordinator before this change), which shows what the indexes buy.
* **1,000 rounds with retention.** The default retention (last 10 versions, a pass a
  minute) on a fresh coordinator, a round a minute, closed rounds' rows kept an hour; every
  10 rounds the database file, its WAL, the blob directory and the row counts are sampled. A
  shorter run without retention shows the growth it prevents.

Run: ``./dev bench bench_history`` (about 7 min on the shared 2-core machine; ``--quick`` for a
smoke run). Writes ``benchmarks/results/bench_history.json`` and ``bench_history.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coordinator.clock import FakeClock  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.service import Coordinator, DeviceIdentity  # noqa: E402
from coordinator.store import Round, SQLiteStore, Version  # noqa: E402
from edge_sdk.codecs import encode_update  # noqa: E402
from tests.fixtures.coordinator import GOOD_CONDITIONS, make_synthetic_bundle  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NUM_PARAMETERS = 10_000
CODEC = {"name": "int8", "bits": 8, "block": 256}
GOAL = 50  # updates per timed round: 50 payload lookups at each close
HISTORY_ROUND = 100  # updates per round of the built history
# The 1,000-round run: a round a minute, a retention pass a minute (the default), a closed
# round's rows kept an hour (the default is a day: its plateau would come after the run).
ROUND_EVERY_S = 60.0
RECEIPTS_S = 3600.0
NEW_INDEXES = ("idx_updates_payload_sha", "idx_rounds_state", "idx_rounds_task_id_base_version")


class Fleet:
    """Devices calling the service in-process, on a fake clock."""

    def __init__(self, service: Coordinator, clock: FakeClock, task_id: str, n: int) -> None:
        self.service, self.clock, self.task_id = service, clock, task_id
        self.devices = [self._register() for _ in range(n)]
        rng = np.random.default_rng(0)
        self.frames = [
            encode_update(rng.normal(0, 0.01, NUM_PARAMETERS).astype(np.float32), CODEC, rng=rng)[0]
            for _ in range(8)
        ]

    def _register(self) -> DeviceIdentity:
        body = json.dumps({"runtimes": ["ort-step"]}).encode()
        device_id = self.service.register(body)["device_id"]
        return DeviceIdentity(device_id, "default")

    def check_in(self, who: DeviceIdentity) -> dict[str, Any]:
        body = json.dumps({"runtimes": ["ort-step"], "conditions": GOOD_CONDITIONS}).encode()
        return self.service.checkin(who, body)

    def round(self, download: bool = False, every_s: float = 1.0) -> dict[str, float]:
        """One round, ``every_s`` after the last; returns seconds of the closing upload and
        the mean of the others."""
        self.clock.advance(every_s)
        held: dict[str, str] = {}
        for _ in range(3):
            for who in self.devices:
                if who.device_id not in held:
                    answer = self.check_in(who)
                    if answer["action"] == "train":
                        held[who.device_id] = answer["assignment"]["assignment_id"]
        assert len(held) == len(self.devices), f"{len(held)} of {len(self.devices)} assigned"
        if download:
            self.service.version_params(self.devices[0], self.task_id, "current")
        version = self.service.store.get_task(self.task_id).model_version  # type: ignore[union-attr]
        times = []
        for i, who in enumerate(self.devices):
            report = json.dumps({"num_examples": 20 + i % 7, "loss": 0.5})
            frame = self.frames[i % len(self.frames)]
            t0 = time.perf_counter()
            self.service.upload(who, held[who.device_id], secrets.token_hex(8), report, frame)
            times.append(time.perf_counter() - t0)
        task = self.service.store.get_task(self.task_id)
        assert task is not None and task.model_version == version + 1, "the round did not commit"
        return {"close_s": times[-1], "upload_s": statistics.mean(times[:-1])}


def _service(db: Path, clock: FakeClock, **config: Any) -> Coordinator:
    return Coordinator(CoordinatorConfig(db_path=str(db), seed=1, **config), clock=clock)


PLAN = {"rounds": 1_000_000, "goal": GOAL, "over_selection": 1.0, "selection_window_s": 0.0,
        "round_deadline_s": 3600.0, "codec": CODEC}  # fmt: skip


def build_history(db: Path, bundle: Path, updates: int) -> str:
    """A task with ``updates`` accepted updates in committed rounds; returns the task id.

    The service makes the bundle and the task; rounds and versions go in through the Store
    API, the bulk rows (assignments, updates) with sqlite-utils' ``insert_all`` in the same
    transactions: the rows a running service would have written, minutes instead of hours.
    """
    clock = FakeClock(1_700_000_000.0)
    service = _service(db, clock, retain_versions=0)
    bundle_id = service.add_bundle(_bundle_tar(bundle))["bundle_id"]
    body = json.dumps({"bundle_id": bundle_id, "plan": PLAN}).encode()
    task_id = str(service.create_task(body)["task_id"])
    store = service.store
    assert isinstance(store, SQLiteStore)
    v0 = store.get_version(task_id, 0)
    assert v0 is not None
    rounds = updates // HISTORY_ROUND
    t = clock.now()
    for start in range(0, rounds, 200):
        stop = min(rounds, start + 200)
        with store.atomic():
            assignments, rows = [], []
            for r in range(start, stop):
                rnd = store.add_round(
                    Round(0, task_id, r + 1, "train", "committed", r, HISTORY_ROUND,
                          HISTORY_ROUND, HISTORY_ROUND, t, t, selected_at=t, closed_at=t,
                          metrics={"outcome": "committed", "model_version": r + 1})
                )  # fmt: skip
                # every version on the initial parameters' blob: rows are what is measured
                store.add_version(Version(task_id, r + 1, v0.params_sha, None, rnd.round_id, t))
                for i in range(HISTORY_ROUND):
                    aid, dev = f"h{r}-{i}", f"dev-{i}"
                    assignments.append(
                        {"assignment_id": aid, "round_id": rnd.round_id, "task_id": task_id,
                         "device_id": dev, "action": "train", "state": "expired",
                         "created_at": t, "delivered_at": t, "closed_at": t}
                    )  # fmt: skip
                    rows.append(
                        {"assignment_id": aid, "round_id": rnd.round_id, "task_id": task_id,
                         "device_id": dev, "idempotency_key": "k",
                         "payload_sha": secrets.token_hex(32), "payload_bytes": 10_000,
                         "num_examples": 20, "loss": 0.5, "report": '{"num_examples": 20}',
                         "accepted_at": t, "response": '{"accepted": true}'}
                    )  # fmt: skip
            store.db.table("assignments").insert_all(assignments, batch_size=5000)
            store.db.table("updates").insert_all(rows, batch_size=5000)
            store.update_task(task_id, model_version=stop, rounds_completed=stop)
    service.close()
    return task_id


def _bundle_tar(bundle: Path) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(bundle.iterdir()):
            tar.add(f, arcname=f.name)
    return buf.getvalue()


def close_vs_history(
    work: Path, bundle: Path, sizes: list[int], closes: int
) -> list[dict[str, Any]]:
    """Round closes on each history size, and on the largest without the new indexes.

    The variants' rounds alternate (one round of each in turn) so that the load other jobs
    put on the shared machine falls on all of them alike."""
    variants: list[tuple[int, bool, Path, str, float]] = []
    for h in sizes:
        db = work / f"history-{h}.db"
        t0 = time.perf_counter()
        task_id = build_history(db, bundle, h)
        build_s = time.perf_counter() - t0
        print(f"[bench_history] built {h:,} stored updates in {build_s:.0f} s", file=sys.stderr,
              flush=True)  # fmt: skip
        variants.append((h, True, db, task_id, build_s))
        if h == max(sizes):  # the same history on the schema before the new indexes
            old = work / f"history-{h}-old.db"
            shutil.copyfile(db, old)
            shutil.copytree(f"{db}.blobs", f"{old}.blobs")
            store = SQLiteStore(old)
            for name in NEW_INDEXES:
                store.db.execute(f"drop index {name}")
            store.close()
            variants.append((h, False, old, task_id, build_s))
    fleets = []
    for h, _, path, task_id, _ in variants:
        clock = FakeClock(1_700_100_000.0)
        service = _service(path, clock, retain_versions=0)
        assert service.store.count_updates() == h
        fleet = Fleet(service, clock, task_id, GOAL)
        fleet.round()  # warm-up: the first commit also checkpoints the build's WAL
        fleets.append(fleet)
    runs: list[list[dict[str, float]]] = [[] for _ in variants]
    for i in range(closes):
        for k, (_, indexes, *_rest) in enumerate(variants):
            if indexes or i % 3 == 0:  # a third as many of the slow ones
                runs[k].append(fleets[k].round())
    out = []
    for (h, indexes, path, _, build_s), fleet, rs in zip(variants, fleets, runs, strict=True):
        fleet.service.close()
        out.append({
            "stored_updates": h,
            "indexes": indexes,
            "build_s": build_s,
            "closes": len(rs),
            "close_ms": [1e3 * r["close_s"] for r in rs],
            "close_ms_median": 1e3 * statistics.median(r["close_s"] for r in rs),
            "upload_ms_median": 1e3 * statistics.median(r["upload_s"] for r in rs),
            "db_mib": _db_bytes(path) / 2**20,
        })  # fmt: skip
    return out


def _db_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


def _wal_bytes(db: Path) -> int:
    wal = Path(f"{db}-wal")
    return wal.stat().st_size if wal.exists() else 0


def _dir_bytes(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def many_rounds(work: Path, bundle: Path, rounds: int, goal: int, **config: Any) -> dict[str, Any]:
    db = work / f"rounds-{config.get('retain_versions', 10)}.db"
    clock = FakeClock(1_700_000_000.0)
    service = _service(db, clock, retain_receipts_s=RECEIPTS_S, **config)
    bundle_id = service.add_bundle(_bundle_tar(bundle))["bundle_id"]
    plan = {**PLAN, "goal": goal, "server_optimizer": {"name": "fedadam"}}
    task_id = str(
        service.create_task(json.dumps({"bundle_id": bundle_id, "plan": plan}).encode())["task_id"]
    )
    fleet = Fleet(service, clock, task_id, goal)
    samples: list[dict[str, Any]] = []

    def sample(r: int) -> None:
        blob_bytes, blob_files = _dir_bytes(Path(f"{db}.blobs"))
        tables = ("rounds", "assignments", "updates", "versions", "candidates")
        store = service.store
        assert isinstance(store, SQLiteStore)
        count = {t: store.db.execute(f"select count(*) from {t}").fetchone()[0] for t in tables}
        samples.append({"round": r, "db_bytes": _db_bytes(db), "wal_bytes": _wal_bytes(db),
                        "blob_bytes": blob_bytes, "blob_files": blob_files,
                        "rows": count})  # fmt: skip

    t0 = time.perf_counter()
    closes = []
    for r in range(1, rounds + 1):
        closes.append(fleet.round(download=True, every_s=ROUND_EVERY_S)["close_s"])
        if r % 10 == 0:
            service.tick()
            sample(r)
    service.close()
    return {"rounds": rounds, "goal": goal, "config": {**config, "retain_receipts_s": RECEIPTS_S},
            "round_every_s": ROUND_EVERY_S, "samples": samples,
            "seconds": time.perf_counter() - t0,
            "close_ms_first_100": 1e3 * statistics.median(closes[:100]),
            "close_ms_last_100": 1e3 * statistics.median(closes[-100:])}  # fmt: skip


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(14, 3.8))
    rows = results["close_vs_history"]
    labels = [f"{r['stored_updates']:,}" + ("" if r["indexes"] else "\nno new indexes")
              for r in rows]  # fmt: skip
    ax0.bar(labels, [r["close_ms_median"] for r in rows], color=["C0"] * (len(rows) - 1) + ["C3"])
    ax0.set_yscale("log")
    ax0.set_xlabel("updates stored before the round")
    ax0.set_ylabel("closing upload, median (ms)")
    ax0.set_title(f"Round close ({GOAL} updates, {NUM_PARAMETERS:,} params)")
    for run, style in ((results["retention"], "-"), (results["no_retention"], ":")):
        xs = [s["round"] for s in run["samples"]]
        name = "retention (10 versions)" if run is results["retention"] else "no retention"
        ax1.plot(xs, [s["blob_bytes"] / 2**20 for s in run["samples"]], style, color="C1",
                 label=name)  # fmt: skip
        ax2.plot(xs, [(s["db_bytes"] - s["wal_bytes"]) / 2**20 for s in run["samples"]], style,
                 color="C0", label=f"database file, {name}")  # fmt: skip
        ax2.plot(xs, [s["wal_bytes"] / 2**20 for s in run["samples"]], style, color="C2",
                 label=f"WAL file, {name}")  # fmt: skip
    for ax, title in ((ax1, "Blob directory"), (ax2, "SQLite files")):
        ax.set_xlabel("rounds")
        ax.set_ylabel("MiB")
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = parser.parse_args()
    sizes = [1_000, 20_000] if args.quick else [1_000, 500_000]
    closes, rounds, baseline = (3, 40, 20) if args.quick else (15, 1000, 300)
    with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:
        work = Path(tmp)
        bundle = make_synthetic_bundle(work / "bundle", NUM_PARAMETERS)
        history = close_vs_history(work, bundle, sizes, closes)
        print(f"[bench_history] {rounds} rounds with retention ...", file=sys.stderr, flush=True)
        kept = many_rounds(work, bundle, rounds, 5)
        print(f"[bench_history] {baseline} rounds without ...", file=sys.stderr, flush=True)
        unbounded = many_rounds(work, bundle, baseline, 5, retain_versions=0)
    small = next(r for r in history if r["stored_updates"] == min(sizes))
    big = next(r for r in history if r["stored_updates"] == max(sizes) and r["indexes"])
    before = next(r for r in history if not r["indexes"])
    s = kept["samples"]
    results = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "num_parameters": NUM_PARAMETERS,
        "codec": CODEC,
        "goal": GOAL,
        "close_vs_history": history,
        "close_ratio_big_vs_small": big["close_ms_median"] / small["close_ms_median"],
        "close_ratio_without_indexes": before["close_ms_median"] / big["close_ms_median"],
        "retention": kept,
        "no_retention": unbounded,
        "db_ratio_last_vs_round_100": s[-1]["db_bytes"] / s[min(9, len(s) - 1)]["db_bytes"],
        "blob_ratio_last_vs_round_100": s[-1]["blob_bytes"] / s[min(9, len(s) - 1)]["blob_bytes"],
    }
    RESULTS.mkdir(exist_ok=True)
    name = "bench_history_quick" if args.quick else "bench_history"
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, RESULTS / f"{name}.png")
    print(f"| {'stored updates':>14} | {'indexes':>7} | {'close ms (median)':>17} | "
          f"{'upload ms (median)':>18} | {'database MiB':>12} |")  # fmt: skip
    print(f"|{'-' * 15}:|{'-' * 8}:|{'-' * 18}:|{'-' * 19}:|{'-' * 13}:|")
    for r in history:
        print(f"| {r['stored_updates']:>14,} | {'yes' if r['indexes'] else 'no':>7} | "
              f"{r['close_ms_median']:>17.1f} | {r['upload_ms_median']:>18.1f} | "
              f"{r['db_mib']:>12.1f} |")  # fmt: skip
    print(f"\nclose time, {max(sizes):,} vs {min(sizes):,} stored updates: "
          f"{results['close_ratio_big_vs_small']:.2f}x; without the indexes "
          f"{results['close_ratio_without_indexes']:.0f}x slower")  # fmt: skip
    print("\n| rounds | database KiB | WAL KiB | blob dir KiB | blob files | rows: rounds / "
          "assignments / updates / versions |")  # fmt: skip
    print("|-------:|-------------:|--------:|-------------:|-----------:|------:|")
    for x in s[9::10] if len(s) >= 20 else s:
        n = x["rows"]
        db_kib = (x["db_bytes"] - x["wal_bytes"]) / 1024
        print(f"| {x['round']} | {db_kib:.0f} | {x['wal_bytes'] / 1024:.0f} | "
              f"{x['blob_bytes'] / 1024:.0f} | {x['blob_files']} | "
              f"{n['rounds']} / {n['assignments']} / {n['updates']} / {n['versions']} |"
              )  # fmt: skip
    u = unbounded["samples"][-1]
    print(f"\nwithout retention after {u['round']} rounds: database + WAL "
          f"{u['db_bytes'] / 1024:.0f} KiB, blobs {u['blob_bytes'] / 1024:.0f} KiB "
          f"({u['blob_files']} files)")  # fmt: skip


if __name__ == "__main__":
    main()
