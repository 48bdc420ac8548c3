"""Stragglers and async: time to a target accuracy when devices are slow and drop out.

The same federated task (the demo model, ``DigitsMLP`` on sklearn digits with Dirichlet label
skew) runs three times against a real coordinator (in-process, HTTP on loopback, SQLite) and
the fleet emulator (real edge-SDK clients, real ORT training steps), each time in one mode:

* ``sync_wait_for_all``: synchronous rounds that select exactly ``goal`` devices and wait for
  all of them (plan ``wait_for_all``); a device that vanished costs the round's deadline.
* ``sync_overselect``: synchronous rounds that select 1.3 x ``goal`` and commit on the first
  ``goal`` reports, with the same deadline.
* ``async_buffered``: FedBuff, a new version every ``buffer_k`` updates, staleness weight
  1/sqrt(1+s), at most ``max_concurrency`` devices training at once.

Devices have heavy-tailed compute speed (a step takes ``step_time_s x m`` emulated seconds,
``m ~ LogNormal(0, sigma)``, median 1) and each training job vanishes silently with
probability ``dropout``. Every mode gets the same budget of client updates (``versions x
goal``), so the modes differ only in how they wait. Times are EMULATED seconds (the fleet's
:class:`~fedge.fleet.clock.SimClock`, which the coordinator also reads), not this machine's
wall time. Bytes are all HTTP bodies the devices sent and received (check-ins, bundle and
parameter downloads, uploads, refused uploads included).

Run: ``./dev bench bench_stragglers`` (3 seeds, about 20 minutes on 2 shared cores; ``--quick``
for a 2-minute smoke run, ``--set FIELD=VALUE`` to change the setup). Writes
``benchmarks/results/stragglers.json`` and ``stragglers.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
FINAL_WINDOW = 5


@dataclass(frozen=True)
class Setup:
    devices: int = 50
    versions: int = 60  # sync rounds / async server steps: each takes `goal` updates
    goal: int = 10  # sync goal count = async buffer_k
    target: float = 0.85  # held-out accuracy to reach
    step_time_s: float = 2.0  # emulated seconds per training step at median speed
    speed_sigma: float = 1.0  # lognormal sigma of the step-time multiplier
    dropout: float = 0.10  # per job, silent (no upload, no abort)
    deadline_s: float = 120.0  # sync round deadline = async assignment deadline
    selection_window_s: float = 5.0
    over_selection: float = 1.3
    max_concurrency: int = 20  # async
    max_staleness: int = 20  # async
    epochs: int = 3
    batch_size: int = 16
    lr: float = 0.1
    alpha: float = 1.0  # Dirichlet label skew
    codec: str = "int8"
    speedup: float = 25.0  # emulated seconds per real second
    seed: int = 0
    timeout_s: float = 600.0  # real seconds per mode

    def base_plan(self) -> dict[str, Any]:
        return {
            "rounds": self.versions,
            "goal": self.goal,
            "round_deadline_s": self.deadline_s,
            "selection_window_s": self.selection_window_s,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "codec": {"name": self.codec},
            "server_optimizer": {"name": "fedavg", "lr": 1.0},
            # Plain FedAvg, as measured: the modes differ in scheduling, not in defences.
            "robust": "none",
        }

    def modes(self) -> dict[str, tuple[str, dict[str, Any]]]:
        base = self.base_plan()
        return {
            "sync_wait_for_all": ("sync", {**base, "wait_for_all": True,
                                           "min_reporting_fraction": 0.5}),
            "sync_overselect": ("sync", {**base, "over_selection": self.over_selection}),
            "async_buffered": ("async", {**base, "buffer_k": self.goal,
                                         "max_concurrency": self.max_concurrency,
                                         "max_staleness": self.max_staleness}),
        }  # fmt: skip


@dataclass
class ModeResult:
    mode: str
    times_s: list[float]  # emulated seconds since the fleet started, per version (0 = initial)
    accuracy: list[float]  # held-out accuracy per version
    bytes_series: list[tuple[float, int]]  # (emulated s, bytes moved so far)
    fleet: dict[str, Any]
    rounds: list[dict[str, Any]]
    real_s: float
    target: float
    final_sha: str  # of the last version's parameters (tells runs apart)

    @property
    def time_to_target_s(self) -> float | None:
        hit = [t for t, a in zip(self.times_s, self.accuracy, strict=True) if a >= self.target]
        return hit[0] if hit else None

    def bytes_at(self, t: float) -> int:
        ts = [p[0] for p in self.bytes_series]
        return int(np.interp(t, ts, [p[1] for p in self.bytes_series]))

    def summary(self) -> dict[str, Any]:
        ttt = self.time_to_target_s
        committed = [r for r in self.rounds if r["state"] == "committed"]
        staleness = [r["metrics"]["mean_staleness"] for r in committed
                     if "mean_staleness" in r["metrics"]]  # fmt: skip
        return {
            "time_to_target_s": None if ttt is None else round(ttt, 1),
            # Mean of the last FINAL_WINDOW versions: one version's accuracy on 450 digits
            # moves by a few points from version to version under label skew.
            "final_accuracy": round(float(np.mean(self.accuracy[-FINAL_WINDOW:])), 4),
            "last_accuracy": round(self.accuracy[-1], 4),
            "best_accuracy": round(max(self.accuracy), 4),
            "final_params_sha256": self.final_sha,
            "versions": len(self.accuracy) - 1,
            "emulated_s": round(self.times_s[-1], 1),
            "bytes_total": int(self.fleet["bytes_up"] + self.fleet["bytes_down"]),
            "bytes_to_target": None if ttt is None else self.bytes_at(ttt),
            "update_bytes": int(self.fleet["update_bytes"]),
            "uploads_acknowledged": int(self.fleet["uploads_acknowledged"]),
            "uploads_rejected": int(self.fleet["rejected"]),
            "dropouts": int(self.fleet["dropouts"]),
            "jobs_started": int(self.fleet["tasks_started"]),
            "mean_version_s": round(self.times_s[-1] / max(1, len(self.times_s) - 1), 2),
            "mean_staleness": round(float(np.mean(staleness)), 3) if staleness else None,
            "time_overruns": int(self.fleet["time_overruns"]),
            "real_s": round(self.real_s, 1),
        }


def run_mode(name: str, mode: str, plan: dict[str, Any], setup: Setup, bundle: Path,
             parts: list[Any], test: Any, log: Any) -> ModeResult:  # fmt: skip
    from coordinator.config import PacingConfig
    from coordinator.embedded import EmbeddedCoordinator
    from edge_sdk.codecs import decode_update
    from edge_sdk.trainers import load_trainer
    from fedge.fleet import Heterogeneity, SimClock
    from fedge.fleet.baselines import test_accuracy
    from fedge.fleet.emulator import Fleet

    trainer = load_trainer(bundle, backend="ort-step")
    initial = trainer.get_parameters()
    clock = SimClock(speedup=setup.speedup)
    hetero = Heterogeneity(compute="lognormal", compute_sigma=setup.speed_sigma,
                           dropout_prob=setup.dropout)  # fmt: skip
    # Pace steering on the emulated clock: devices come back within seconds, not minutes.
    pacing = PacingConfig(min_retry_s=2.0, max_retry_s=60.0, no_task_retry_s=10.0)
    real0 = time.monotonic()
    # The coordinator reads the fleet's clock (epoch 0: its times are emulated seconds) and
    # checks deadlines every 20 ms of real time, i.e. every 0.5 s emulated at speedup 25.
    # retain_versions 0: every version stays downloadable, to be evaluated after the run.
    with EmbeddedCoordinator(clock=clock.unix(0.0), pacing=pacing, seed=setup.seed,
                             tick_interval_s=0.02, retain_versions=0) as coord:  # fmt: skip
        admin = coord.admin()
        bundle_id = admin.upload_bundle(bundle)["bundle_id"]
        task_id = admin.create_task(bundle_id, plan, mode=mode, name=name)["task_id"]
        fleet = Fleet(coord.url, parts, heterogeneity=hetero, seed=setup.seed, clock=clock,
                      step_time_s=setup.step_time_s, rejoin_s=60.0,
                      enrollment_token=coord.enrollment_token)  # fmt: skip
        series: list[tuple[float, int]] = []
        start = clock.now()
        last_shown = [-1]

        def done() -> bool:
            s = fleet.summary()
            series.append((clock.now() - start, s.bytes_up + s.bytes_down))
            task = admin.task(task_id)
            if task["model_version"] != last_shown[0]:
                last_shown[0] = task["model_version"]
                log(f"\r  {name:18s} version {task['model_version']:3d}/{setup.versions}  "
                    f"t={clock.now() - start:7.0f} s emulated  uploads {s.uploads_acknowledged}"
                    f"  dropouts {s.dropouts}  rejected {s.rejected}", end="")
            return bool(task["state"] == "completed")

        try:
            with fleet:
                finished = fleet.wait_for(done, timeout_s=setup.timeout_s, poll_s=0.05)
            summary = fleet.summary().as_dict()
        finally:
            fleet.close()
        log("")
        if not finished:
            log(f"  warning: {name} did not finish {setup.versions} versions in "
                f"{setup.timeout_s:.0f} s real time")
        rounds = admin.rounds(task_id)
        committed = sorted((r["metrics"]["model_version"], r["closed_at"]) for r in rounds
                           if r["state"] == "committed")  # fmt: skip
        times, acc = [0.0], [test_accuracy(trainer, initial, test)]
        for version, closed_at in committed:
            frame = coord.call(coord.service.version_params, None, task_id, str(version))
            params = decode_update(frame, expected_length=initial.size)
            times.append(closed_at - start)
            acc.append(test_accuracy(trainer, params, test))
    return ModeResult(name, times, acc, series, summary, rounds, time.monotonic() - real0,
                      setup.target, hashlib.sha256(params.tobytes()).hexdigest()[:16])  # fmt: skip


def plot(curves: list[dict[str, dict[str, list[float]]]], out: dict[str, dict[str, Any]],
         setup: Setup, path: Path) -> None:  # fmt: skip
    """``curves``: per seed, per mode, ``time_s`` and ``accuracy`` lists (the JSON's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.6), dpi=120)
    for color, name in zip(("tab:red", "tab:blue", "tab:green"), out, strict=False):
        ttt = out[name]["time_to_target_s"]
        label = f"{name} (median to target {ttt:,.0f} s)" if ttt else f"{name} (no target)"
        for i, run in enumerate(curves):
            first = i == 0  # the first seed drawn bold, the others faint
            ax.plot(run[name]["time_s"], run[name]["accuracy"], color=color,
                    marker="o" if first else None, markersize=2.5,
                    linewidth=1.4 if first else 0.8, alpha=1.0 if first else 0.4,
                    label=label if first else None)  # fmt: skip
    ax.axhline(setup.target, color="grey", linestyle="--", linewidth=1,
               label=f"target {setup.target:.2f}")  # fmt: skip
    ax.set_xscale("symlog", linthresh=100)  # linear up to 100 s, log beyond
    ax.set_xlim(left=0)
    ax.set_xlabel("emulated wall time, s (fleet clock; symlog axis)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"Digits, {setup.devices} devices, step time x LogNormal(0, {setup.speed_sigma}), "
                 f"{setup.dropout:.0%} dropouts, {setup.versions} x {setup.goal} updates; "
                 f"{len(curves)} seed(s)", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def table(out: dict[str, dict[str, Any]], baseline: str) -> str:
    base = out[baseline]["time_to_target_s"]
    cols = ("mode", "to target (s)", "speedup", "final acc", "versions", "bytes total",
            "bytes to target", "uploads ok", "refused", "dropouts")  # fmt: skip
    rows = []
    for name, s in out.items():
        ttt = s["time_to_target_s"]
        speed = f"{base / ttt:.2f}x" if ttt and base else "-"
        rows.append((name, "-" if ttt is None else f"{ttt:,.0f}", speed,
                     f"{s['final_accuracy']:.3f}", str(s["versions"]), f"{s['bytes_total']:,}",
                     "-" if s["bytes_to_target"] is None else f"{s['bytes_to_target']:,}",
                     str(s["uploads_acknowledged"]), str(s["uploads_rejected"]),
                     str(s["dropouts"])))  # fmt: skip
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cols), sep, *(line(r) for r in rows)])


def aggregate(per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per mode: medians of times and bytes, means of accuracies, over seeds; speedups are
    ratios of the medians against ``sync_wait_for_all``."""

    def median(runs: list[dict[str, Any]], key: str) -> float | None:
        """None unless every seed has a value (a mode that missed the target once missed)."""
        values = [r[key] for r in runs if r[key] is not None]
        return float(np.median(values)) if len(values) == len(runs) else None

    def mean(runs: list[dict[str, Any]], key: str) -> float:
        return round(float(np.mean([r[key] for r in runs])), 4)

    out: dict[str, dict[str, Any]] = {}
    for name in per_seed[0]:
        runs = [seed[name] for seed in per_seed]
        ttt = median(runs, "time_to_target_s")
        out[name] = {
            "time_to_target_s": None if ttt is None else round(ttt, 1),
            "final_accuracy": mean(runs, "final_accuracy"),
            "last_accuracy": mean(runs, "last_accuracy"),
            "bytes_total": int(median(runs, "bytes_total") or 0),
            "bytes_to_target": None if ttt is None else int(median(runs, "bytes_to_target") or 0),
            "versions": runs[0]["versions"],
            "mean_version_s": round(float(np.median([r["mean_version_s"] for r in runs])), 2),
            "uploads_acknowledged": int(np.median([r["uploads_acknowledged"] for r in runs])),
            "uploads_rejected": int(np.median([r["uploads_rejected"] for r in runs])),
            "dropouts": int(np.median([r["dropouts"] for r in runs])),
            "time_to_target_per_seed": [r["time_to_target_s"] for r in runs],
        }
    base = out.get("sync_wait_for_all")
    for s in out.values():
        ttt, b = s["time_to_target_s"], base and base["time_to_target_s"]
        s["speedup_vs_wait_for_all"] = round(b / ttt, 2) if ttt and b else None
        s["accuracy_gap_vs_wait_for_all"] = (
            round(s["final_accuracy"] - base["final_accuracy"], 4) if base else None
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small smoke run (about 2 minutes)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=None,
                   help="how many consecutive seeds (default 3; 1 with --quick)")
    p.add_argument("--speedup", type=float, default=Setup.speedup)
    p.add_argument("--modes", nargs="*", default=None, help="subset of modes to run")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override Setup fields, e.g. --set versions=60 lr=0.1")
    p.add_argument("--replot", action="store_true",
                   help="only redraw the PNG from the JSON in --out (no run)")
    args = p.parse_args(argv)
    if args.replot:
        doc = json.loads((args.out / "stragglers.json").read_text())
        plot(doc["curves"], doc["modes"], Setup(**doc["setup"]), args.out / "stragglers.png")
        return 0
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    setup = Setup(seed=args.seed, speedup=args.speedup)
    if args.quick:
        setup = replace(setup, devices=30, versions=12, target=0.6, timeout_s=240.0)
    for item in args.set:
        key, _, value = item.partition("=")
        current = getattr(setup, key)  # AttributeError names an unknown field
        setup = replace(setup, **{key: type(current)(value)})

    def log(msg: str, end: str = "\n") -> None:
        print(msg, end=end, file=sys.stderr, flush=True)

    logging.getLogger("edge_sdk").setLevel(logging.ERROR)
    from fedge.demo import demo_bundle
    from fedge.fleet import load_digits, partition

    bundle = demo_bundle(say=log)
    runs: list[dict[str, ModeResult]] = []
    for seed in range(setup.seed, setup.seed + args.seeds):
        run_setup = replace(setup, seed=seed)
        train, test = load_digits(seed=seed)
        rng = np.random.default_rng(seed)
        parts = [train.subset(i) for i in partition(train.y, setup.devices,
                                                    f"dirichlet:{setup.alpha}", rng)]  # fmt: skip
        log(f"seed {seed}: {setup.devices} devices, {len(train)} training digits (Dirichlet "
            f"{setup.alpha}), {len(test)} held out; {setup.versions} versions x {setup.goal} "
            f"updates per mode; speedup x{setup.speedup:g}")
        runs.append({
            name: run_mode(name, mode, plan, run_setup, bundle, parts, test, log)
            for name, (mode, plan) in run_setup.modes().items()
            if not args.modes or name in args.modes
        })  # fmt: skip
        out = write_results(runs, setup, args.out)  # after every seed: partial results survive
        log(f"wrote {args.out / 'stragglers.json'} and {args.out / 'stragglers.png'} "
            f"({len(runs)} of {args.seeds} seeds)")
    baseline = "sync_wait_for_all" if "sync_wait_for_all" in out else next(iter(out))
    print(table(out, baseline))
    return 0


def write_results(
    runs: list[dict[str, ModeResult]], setup: Setup, directory: Path
) -> dict[str, dict[str, Any]]:
    per_seed = [{name: r.summary() for name, r in run.items()} for run in runs]
    out = aggregate(per_seed)
    curves = [{name: {"time_s": [round(t, 2) for t in r.times_s],
                      "accuracy": [round(a, 4) for a in r.accuracy]}
               for name, r in run.items()} for run in runs]  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    plot(curves, out, setup, directory / "stragglers.png")
    doc = {
        "benchmark": "bench_stragglers",
        "clock": "emulated seconds (fleet SimClock, read by the coordinator too)",
        "setup": asdict(setup),
        "seeds": list(range(setup.seed, setup.seed + len(runs))),
        "aggregate": "time_to_target_s, bytes_*: median over seeds; accuracies: mean",
        "modes": out,
        "per_seed": per_seed,
        "curves": curves,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }  # fmt: skip
    (directory / "stragglers.json").write_text(json.dumps(doc, indent=1))
    return out


if __name__ == "__main__":
    sys.exit(main())
