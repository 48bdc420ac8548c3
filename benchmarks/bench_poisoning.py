"""Poisoning: what a hostile minority of devices does to each aggregator.

Each scenario is one fleet (real edge-SDK clients, real ORT training steps) against a fresh
coordinator (in-process, HTTP on loopback, SQLite), running one synchronous task per
aggregator side by side on the same devices and data:

* ``fedavg``: undefended FedAvg (plan ``"robust": "none"``: declared weights, no clipping);
* ``defaults``: the plan's defaults: FedAvg with examples capped at the round's median
  and updates clipped to an adaptive bound that tracks the median norm;
* ``median``, ``trimmed_mean`` (trim 0.3), ``multi_krum`` (assumed hostile fraction 0.3):
  the robust aggregators, on top of the default cap and clipping.

Scenarios: the clean run, then 10 % and 30 % of the devices hostile with each attack of
:mod:`fedge.fleet.attacks` (they train honestly and tamper with the upload): ``scale`` (delta
x ``scale``), ``sign_flip`` (delta x -``flip``), ``inflate`` (negated delta declaring the
server's largest accepted count, 1e6), ``outlier`` (a random direction just under the server's
norm bound 1e4, declaring just under 1e6 examples). Data: sklearn digits (Dirichlet label
skew, the demo model) and FedProx Synthetic(1, 1) (a 60-32-10 MLP), each device's data its
own. Accuracy is on held-out data, the mean over the last ``final_window`` versions.

Run: ``./dev bench bench_poisoning`` (one seed, about 10 minutes on 2 shared cores;
``--quick`` for a 30-second smoke run on digits with the scale attack, ``--set FIELD=VALUE``
to change the setup, e.g. ``--set seeds=3`` for the figures in docs/benchmarks.md: single
runs differ by several points). Writes ``benchmarks/results/poisoning.json`` and
``poisoning.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
SYNTHETIC_MODEL = str(Path(__file__).parent / "poisoning_models.py") + ":SyntheticMLP"

# Aggregator name -> the plan's "robust" value (absent: the defaults).
AGGREGATORS: dict[str, Any] = {
    "fedavg": "none",
    "defaults": None,
    "median": {"aggregator": "median"},
    "trimmed_mean": {"aggregator": "trimmed_mean", "trim": 0.3},
    "multi_krum": {"aggregator": "multi_krum", "byzantine": 0.3},
}
CLEAN = "clean"


@dataclass(frozen=True)
class Setup:
    datasets: tuple[str, ...] = ("digits", "synthetic")
    fractions: tuple[float, ...] = (0.1, 0.3)
    attacks: tuple[str, ...] = ("scale", "sign_flip", "inflate", "outlier")
    aggregators: tuple[str, ...] = tuple(AGGREGATORS)
    devices: int = 20
    rounds: int = 16
    goal: int = 8
    over_selection: float = 1.0  # every selected device reports (no dropouts here)
    epochs: int = 2
    batch_size: int = 16
    lr: float = 0.2
    alpha: float = 1.0  # digits: Dirichlet label skew
    scale: float = 30.0  # the scale attack's boost
    flip: float = 1.0  # the sign-flip attack's magnitude
    speedup: float = 100.0  # emulated seconds per real second
    step_time_s: float = 0.05  # emulated seconds per training step
    final_window: int = 5
    seed: int = 0  # the first seed
    seeds: int = 1  # consecutive seeds (data split, hostile devices, fleet, coordinator)
    timeout_s: float = 240.0  # real seconds per scenario

    def scenarios(self) -> list[tuple[str, float]]:
        return [(CLEAN, 0.0)] + [(a, f) for f in self.fractions for a in self.attacks]

    def plan(self, aggregator: str) -> dict[str, Any]:
        plan: dict[str, Any] = {
            "rounds": self.rounds,
            "goal": self.goal,
            "over_selection": self.over_selection,
            "selection_window_s": 2.0,
            "round_deadline_s": 120.0,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "codec": {"name": "fp32"},
        }
        robust = AGGREGATORS[aggregator]
        if robust is not None:
            plan["robust"] = robust
        return plan


@dataclass
class Data:
    name: str
    bundle: Path
    parts: list[Any]
    test: Any


@dataclass
class ScenarioResult:
    seed: int
    dataset: str
    attack: str
    fraction: float
    attackers: list[int]
    accuracy: dict[str, list[float]]  # aggregator -> held-out accuracy per version
    real_s: float
    fleet: dict[str, Any] = field(default_factory=dict)
    robust: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # per round metrics

    def final(self, window: int) -> dict[str, float]:
        return {a: round(float(np.mean(acc[-window:])), 4) for a, acc in self.accuracy.items()}


def load_data(name: str, setup: Setup, say: Callable[..., None]) -> Data:
    from fedge.fleet import fedprox_synthetic, load_digits, partition
    from fedge.fleet.datasets import Dataset, stratified_split

    rng = np.random.default_rng(setup.seed)
    if name == "digits":
        from fedge.demo import demo_bundle

        train, test = load_digits(seed=setup.seed)
        parts = [train.subset(i) for i in partition(train.y, setup.devices,
                                                    f"dirichlet:{setup.alpha}", rng)]  # fmt: skip
        return Data(name, demo_bundle(say=say), parts, test)
    if name == "synthetic":
        from fedge.bundle_cache import cached_bundle

        devices = fedprox_synthetic(1.0, 1.0, setup.devices, seed=setup.seed, max_samples=200)
        # Each device keeps 80 % of its data; the held-out 20 % of all devices is the test set.
        splits = [stratified_split(d, 0.2, rng) for d in devices]
        bundle = cached_bundle(SYNTHETIC_MODEL, input_shape=(1, 60), loss="cross_entropy",
                               optimizer="sgd", lr=0.05)  # fmt: skip
        return Data(name, bundle, [s[0] for s in splits], Dataset.concat([s[1] for s in splits]))
    raise ValueError(f"unknown dataset {name!r}")


def run_scenario(
    data: Data, attack: str, fraction: float, setup: Setup, say: Callable[..., None]
) -> ScenarioResult:
    """One fleet, one coordinator, one task per aggregator; every task to completion."""
    from coordinator.config import PacingConfig
    from coordinator.embedded import EmbeddedCoordinator
    from edge_sdk.codecs import decode_update
    from edge_sdk.trainers import load_trainer
    from fedge.fleet import SimClock
    from fedge.fleet.attacks import Attack, choose_attackers
    from fedge.fleet.baselines import test_accuracy
    from fedge.fleet.emulator import Fleet

    trainer = load_trainer(data.bundle, backend="ort-step")
    initial = trainer.get_parameters()
    attackers = [] if attack == CLEAN else choose_attackers(setup.devices, fraction, setup.seed)
    hostile = None
    if attack != CLEAN:
        hostile = Attack(attack, scale=setup.flip if attack == "sign_flip" else setup.scale)
    clock = SimClock(speedup=setup.speedup)
    pacing = PacingConfig(min_retry_s=1.0, max_retry_s=20.0, no_task_retry_s=5.0)
    real0 = time.monotonic()
    label = f"{data.name:9s} {attack:9s} {fraction:4.0%}"
    # retain_versions 0: every version stays downloadable, to be evaluated after the run.
    with EmbeddedCoordinator(clock=clock.unix(0.0), pacing=pacing, seed=setup.seed,
                             tick_interval_s=0.02, retain_versions=0) as coord:  # fmt: skip
        admin = coord.admin()
        bundle_id = admin.upload_bundle(data.bundle)["bundle_id"]
        tasks = {a: admin.create_task(bundle_id, setup.plan(a), name=a)["task_id"]
                 for a in setup.aggregators}  # fmt: skip
        fleet = Fleet(coord.url, data.parts, seed=setup.seed, clock=clock,
                      step_time_s=setup.step_time_s, rejoin_s=30.0,
                      enrollment_token=coord.enrollment_token,
                      attacks={i: hostile for i in attackers} if hostile else None)  # fmt: skip
        shown = [""]

        def done() -> bool:
            states = {a: admin.task(t) for a, t in tasks.items()}
            line = "  ".join(f"{a} {s['model_version']}/{setup.rounds}" for a, s in states.items())
            if line != shown[0]:
                shown[0] = line
                say(f"\r  {label} | {line} | {time.monotonic() - real0:5.0f} s\x1b[K", end="")
            return all(s["state"] == "completed" for s in states.values())

        try:
            summary = fleet.run(until=done, timeout_s=setup.timeout_s, poll_s=0.1).as_dict()
        finally:
            fleet.close()
        say("")
        if not done():
            say(f"  warning: {label} did not finish in {setup.timeout_s:.0f} s real time")
        accuracy: dict[str, list[float]] = {}
        robust: dict[str, list[dict[str, Any]]] = {}
        for agg, task_id in tasks.items():
            rounds = [r for r in admin.rounds(task_id) if r["state"] == "committed"]
            committed = sorted(((r["metrics"]["model_version"], r["metrics"].get("robust", {}))
                                for r in rounds), key=lambda vm: vm[0])  # fmt: skip
            acc = [test_accuracy(trainer, initial, data.test)]
            for version, _ in committed:
                frame = coord.call(coord.service.version_params, None, task_id, str(version))
                params = decode_update(frame, expected_length=initial.size)
                # A poisoned model can hold values float32 cannot add up: that is chance level.
                acc.append(test_accuracy(trainer, params, data.test)
                           if np.isfinite(params).all() else 0.0)  # fmt: skip
            accuracy[agg] = acc
            robust[agg] = [m for _, m in committed]
    return ScenarioResult(setup.seed, data.name, attack, fraction, attackers, accuracy,
                          time.monotonic() - real0, summary, robust)  # fmt: skip


def summarize(results: list[ScenarioResult], setup: Setup) -> dict[str, Any]:
    """Per dataset, scenario and aggregator, over seeds: mean final accuracy, its range, and
    the mean per-seed difference to the same aggregator's clean run and to clean undefended
    FedAvg."""
    clean = {(r.dataset, r.seed): r.final(setup.final_window) for r in results
             if r.attack == CLEAN}  # fmt: skip
    runs: dict[str, dict[str, dict[str, list[tuple[float, float | None, float | None]]]]] = {}
    for r in results:
        key = CLEAN if r.attack == CLEAN else f"{r.attack}@{r.fraction:.0%}"
        base = clean.get((r.dataset, r.seed), {})
        for agg, acc in r.final(setup.final_window).items():
            own = base[agg] - acc if agg in base else None
            fedavg = base["fedavg"] - acc if "fedavg" in base else None
            runs.setdefault(r.dataset, {}).setdefault(key, {}).setdefault(agg, []).append(
                (acc, own, fedavg)
            )

    def mean(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return round(float(np.mean(known)), 4) if len(known) == len(values) else None

    return {
        dataset: {
            key: {
                agg: {
                    "accuracy": mean([a for a, _, _ in seeds]),
                    "accuracy_min": round(min(a for a, _, _ in seeds), 4),
                    "accuracy_max": round(max(a for a, _, _ in seeds), 4),
                    "cost_vs_own_clean": mean([c for _, c, _ in seeds]),
                    "cost_vs_clean_fedavg": mean([c for _, _, c in seeds]),
                    "per_seed": [round(a, 4) for a, _, _ in seeds],
                }
                for agg, seeds in per.items()
            }
            for key, per in scenarios.items()
        }
        for dataset, scenarios in runs.items()
    }


def table(summary: dict[str, Any], setup: Setup) -> str:
    aggs = list(setup.aggregators)
    cols = ("data", "scenario", *aggs)
    rows = []
    for dataset, scenarios in summary.items():
        for scenario, per in scenarios.items():
            cells = []
            for a in aggs:
                s = per.get(a)
                if s is None:
                    cells.append("-")
                elif scenario == CLEAN or s["cost_vs_clean_fedavg"] is None:
                    cells.append(f"{s['accuracy']:.3f}")
                else:
                    cells.append(f"{s['accuracy']:.3f} ({-s['cost_vs_clean_fedavg']:+.3f})")
            rows.append((dataset, scenario, *cells))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cols), sep, *(line(r) for r in rows)])


def plot(summary: dict[str, Any], setup: Setup, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(summary)
    fig, axes = plt.subplots(len(datasets), 1, figsize=(11, 3.6 * len(datasets)), dpi=110,
                             squeeze=False)  # fmt: skip
    aggs = list(setup.aggregators)
    width = 0.8 / len(aggs)
    for ax, dataset in zip(axes[:, 0], datasets, strict=True):
        scenarios = list(summary[dataset])
        x = np.arange(len(scenarios))
        for i, agg in enumerate(aggs):
            cells = [summary[dataset][s].get(agg, {}) for s in scenarios]
            ys = np.array([c.get("accuracy", np.nan) for c in cells])
            # the range over seeds (nothing to draw with one seed)
            lo = ys - np.array([c.get("accuracy_min", np.nan) for c in cells])
            hi = np.array([c.get("accuracy_max", np.nan) for c in cells]) - ys
            ax.bar(x + (i - (len(aggs) - 1) / 2) * width, ys, width, label=agg,
                   yerr=np.vstack([lo, hi]),
                   error_kw={"linewidth": 0.8, "capsize": 1.5})  # fmt: skip
        clean = summary[dataset].get(CLEAN, {}).get("fedavg", {}).get("accuracy")
        if clean is not None:
            ax.axhline(clean, color="grey", linestyle="--", linewidth=1,
                       label="clean FedAvg")  # fmt: skip
            ax.axhline(clean - 0.02, color="grey", linestyle=":", linewidth=1,
                       label="clean FedAvg - 2 points")  # fmt: skip
        ax.set_xticks(x, scenarios, rotation=20, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("held-out accuracy")
        ax.set_title(f"{dataset}: {setup.devices} devices, {setup.rounds} rounds x "
                     f"{setup.goal} updates; mean (bars: range) over {setup.seeds} seed(s)",
                     fontsize=9)  # fmt: skip
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, ncol=len(labels), loc="lower center")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_results(results: list[ScenarioResult], setup: Setup, directory: Path) -> dict[str, Any]:
    summary = summarize(results, setup)
    directory.mkdir(parents=True, exist_ok=True)
    plot(summary, setup, directory / "poisoning.png")
    doc = {
        "benchmark": "bench_poisoning",
        "setup": asdict(setup),
        "aggregators": AGGREGATORS,
        "accuracy": f"held-out, mean of the last {setup.final_window} versions; summary: "
        "mean, min, max over seeds; costs: mean of per-seed differences",
        "summary": summary,
        "scenarios": [
            {"seed": r.seed, "dataset": r.dataset, "attack": r.attack, "fraction": r.fraction,
             "attackers": r.attackers, "real_s": round(r.real_s, 1),
             "accuracy_per_version": {a: [round(v, 4) for v in acc]
                                      for a, acc in r.accuracy.items()},
             "robust_metrics": r.robust,
             "uploads_acknowledged": r.fleet.get("uploads_acknowledged"),
             "uploads_rejected": r.fleet.get("rejected")}
            for r in results
        ],
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }  # fmt: skip
    (directory / "poisoning.json").write_text(json.dumps(doc, indent=1))
    return summary


def run(setup: Setup, say: Callable[..., None], out: Path | None) -> list[ScenarioResult]:
    results: list[ScenarioResult] = []
    scenarios = setup.scenarios()
    for seed in range(setup.seed, setup.seed + setup.seeds):
        run_setup = replace(setup, seed=seed)
        for name in setup.datasets:
            data = load_data(name, run_setup, say)
            say(f"seed {seed}, {name}: {setup.devices} devices ({len(data.test)} held out); "
                f"{len(scenarios)} scenarios x {len(setup.aggregators)} aggregators, "
                f"{setup.rounds} rounds each")  # fmt: skip
            for attack, fraction in scenarios:
                results.append(run_scenario(data, attack, fraction, run_setup, say))
                if out is not None:  # after every scenario: partial results survive
                    write_results(results, setup, out)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: digits, 10 %% scale attack, fewer devices and rounds")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override Setup fields, e.g. --set rounds=12 scale=20")
    p.add_argument("--replot", action="store_true",
                   help="only redraw the PNG from the JSON in --out (no run)")
    args = p.parse_args(argv)
    if args.replot:
        doc = json.loads((args.out / "poisoning.json").read_text())
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in doc["setup"].items()}  # fmt: skip
        setup = Setup(**fields)
        plot(doc["summary"], setup, args.out / "poisoning.png")
        return 0
    setup = Setup()
    if args.quick:
        setup = replace(setup, datasets=("digits",), fractions=(0.1,), attacks=("scale",),
                        devices=10, rounds=5, goal=5)  # fmt: skip
    for item in args.set:
        key, _, value = item.partition("=")
        current = getattr(setup, key)  # AttributeError names an unknown field
        new: Any
        if isinstance(current, tuple):  # comma-separated, of the default's element type
            kind = type(current[0]) if current else str
            new = tuple(kind(v) for v in value.split(",") if v)
        else:
            new = type(current)(value)
        setup = replace(setup, **{key: new})

    def say(msg: str, end: str = "\n") -> None:
        print(msg, end=end, file=sys.stderr, flush=True)

    logging.getLogger("edge_sdk").setLevel(logging.ERROR)
    started = time.monotonic()
    results = run(setup, say, args.out)
    summary = write_results(results, setup, args.out)
    say(f"wrote {args.out / 'poisoning.json'} and {args.out / 'poisoning.png'} "
        f"in {time.monotonic() - started:.0f} s")
    print(table(summary, setup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
