"""Poisoning: what a hostile minority of devices does to each aggregator.

Each scenario is one fleet (real edge-SDK clients, real ORT training steps) against a fresh
coordinator (in-process, HTTP on loopback, SQLite), running one synchronous task per
aggregator side by side on the same devices and data:

* ``fedavg``: undefended FedAvg (plan ``"robust": "none"``: declared weights, no clipping);
* ``defaults``: the plan's defaults: FedAvg with examples capped at the round's median,
  updates clipped to an adaptive bound that tracks the median norm, and updates pointing
  away from the round's coordinate-wise median dropped (:mod:`coordinator.robust.agreement`);
* ``cap_clip``: the defaults without that direction check (the defaults before it);
* ``median``, ``trimmed_mean`` (trim 0.3), ``multi_krum`` (assumed hostile fraction 0.3):
  the robust aggregators, on top of the default cap, clipping and direction check.

Scenarios: the clean run, then 10 % and 30 % of the devices hostile with each attack of
:mod:`fedge.fleet.attacks` (they train honestly and tamper with the upload): ``scale`` (delta
x ``scale``), ``sign_flip`` (delta x -``flip``), ``inflate`` (negated delta declaring the
server's largest accepted count, 1e6), ``outlier`` (a random direction just under the server's
norm bound 1e4, declaring just under 1e6 examples). Data: sklearn digits (Dirichlet label
skew, the demo model) and FedProx Synthetic(1, 1) (a 60-32-10 MLP), each device's data its
own.

Accuracy: the mean over the last ``final_window`` versions of a ``rounds``-round run (40: the
clean runs have converged by about round 25; the PNG draws their curves), on held-out data.
Digits: one held-out set for all. Synthetic: every device has its own true model, so each
device holds out 20 % of its own data, and an attacked run is judged on the honest devices'
held-out data only, as is the clean run it is compared with: an attacker's own data, never
trained on, is not what the attack does to the others. A cost is the per-seed difference to
the clean run of the same seed, judged on the same data (mean, min and max over seeds).

Run: ``./dev bench bench_poisoning`` (one seed, about 15 minutes on 2 shared cores;
``--quick`` for a 30-second smoke run on digits with the scale attack, ``--set FIELD=VALUE``
to change the setup, e.g. ``--set seeds=3`` for the figures in docs/benchmarks.md: single
runs differ by several points; ``--merge`` combines runs made in parallel, e.g. one process
per dataset). Writes ``benchmarks/results/poisoning.json`` and ``poisoning.png``.
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
    "cap_clip": {"agreement": None},
    "weigh": {"agreement": {"weigh": True}},
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
    aggregators: tuple[str, ...] = (
        "fedavg", "defaults", "cap_clip", "median", "trimmed_mean", "multi_krum"
    )
    devices: int = 20
    rounds: int = 40
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
    final_window: int = 10
    seed: int = 0  # the first seed
    seeds: int = 1  # consecutive seeds (data split, hostile devices, fleet, coordinator)
    # Real seconds. A collapsed model (undefended FedAvg under some attacks) makes devices'
    # updates fail the norm bound, and most of its rounds wait for their deadline: the last
    # task still running ``straggler_s`` after all others completed is stopped there, and its
    # accuracy is that of the versions it made (listed under "unfinished" in the JSON).
    timeout_s: float = 900.0  # per scenario
    straggler_s: float = 60.0

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
    # Held-out data: digits, one set for all; synthetic, each device's own (index = device).
    tests: list[Any]
    per_device: bool

    def honest_tests(self, attackers: list[int]) -> list[int]:
        """The held-out sets an attacked run is judged on: a device's own data says nothing
        about what an attack did to the others (see the module docstring)."""
        if not self.per_device:
            return list(range(len(self.tests)))
        return [i for i in range(len(self.tests)) if i not in attackers]


@dataclass
class ScenarioResult:
    seed: int
    dataset: str
    attack: str
    fraction: float
    attackers: list[int]
    # aggregator -> per version, the correctly classified examples of each held-out set
    correct: dict[str, list[list[int]]]
    test_sizes: list[int]
    judged_on: list[int]  # the held-out sets that count (Data.honest_tests)
    real_s: float
    fleet: dict[str, Any] = field(default_factory=dict)
    robust: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # per round metrics
    unfinished: list[str] = field(default_factory=list)  # stopped before their last version

    def curve(self, agg: str, tests: list[int] | None = None) -> list[float]:
        """Accuracy per version over the held-out sets ``tests`` (default: judged_on)."""
        idx = self.judged_on if tests is None else tests
        total = sum(self.test_sizes[i] for i in idx)
        return [sum(c[i] for i in idx) / total for c in self.correct[agg]]

    def final(self, window: int, tests: list[int] | None = None) -> dict[str, float]:
        return {a: round(float(np.mean(self.curve(a, tests)[-window:])), 4) for a in self.correct}

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "dataset": self.dataset, "attack": self.attack,
                "fraction": self.fraction, "attackers": self.attackers,
                "real_s": round(self.real_s, 1), "judged_on": self.judged_on,
                "test_sizes": self.test_sizes,
                "accuracy_per_version": {a: [round(v, 4) for v in self.curve(a)]
                                         for a in self.correct},
                "correct_per_version": self.correct, "robust_metrics": self.robust,
                "fleet": self.fleet, "unfinished": self.unfinished}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ScenarioResult:
        return cls(d["seed"], d["dataset"], d["attack"], d["fraction"], d["attackers"],
                   d["correct_per_version"], d["test_sizes"], d["judged_on"], d["real_s"],
                   d["fleet"], d["robust_metrics"], d.get("unfinished", []))  # fmt: skip


def load_data(name: str, setup: Setup, say: Callable[..., None]) -> Data:
    from fedge.fleet import fedprox_synthetic, load_digits, partition
    from fedge.fleet.datasets import stratified_split

    rng = np.random.default_rng(setup.seed)
    if name == "digits":
        from fedge.demo import demo_bundle

        train, test = load_digits(seed=setup.seed)
        parts = [train.subset(i) for i in partition(train.y, setup.devices,
                                                    f"dirichlet:{setup.alpha}", rng)]  # fmt: skip
        return Data(name, demo_bundle(say=say), parts, [test], per_device=False)
    if name == "synthetic":
        from fedge.bundle_cache import cached_bundle

        devices = fedprox_synthetic(1.0, 1.0, setup.devices, seed=setup.seed, max_samples=200)
        # Each device keeps 80 % of its data and holds out 20 %.
        splits = [stratified_split(d, 0.2, rng) for d in devices]
        bundle = cached_bundle(SYNTHETIC_MODEL, input_shape=(1, 60), loss="cross_entropy",
                               optimizer="sgd", lr=0.05)  # fmt: skip
        return Data(name, bundle, [s[0] for s in splits], [s[1] for s in splits], per_device=True)
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
        last_one_since: list[float] = []

        def done() -> bool:
            states = {a: admin.task(t) for a, t in tasks.items()}
            line = "  ".join(f"{a} {s['model_version']}/{setup.rounds}" for a, s in states.items())
            if line != shown[0]:
                shown[0] = line
                say(f"\r  {label} | {line} | {time.monotonic() - real0:5.0f} s\x1b[K", end="")
            running = sum(s["state"] != "completed" for s in states.values())
            if running == 1 and len(states) > 1 and not last_one_since:
                last_one_since.append(time.monotonic())
            # The last task running long after the others is a collapsed one (see Setup)
            return running == 0 or bool(
                last_one_since and time.monotonic() - last_one_since[0] > setup.straggler_s
            )

        try:
            summary = fleet.run(until=done, timeout_s=setup.timeout_s, poll_s=0.1).as_dict()
        finally:
            fleet.close()
        say("")
        if not done():
            say(f"  warning: {label} did not finish in {setup.timeout_s:.0f} s real time")
        unfinished = [a for a, t in tasks.items() if admin.task(t)["state"] != "completed"]
        correct: dict[str, list[list[int]]] = {}
        robust: dict[str, list[dict[str, Any]]] = {}

        def counts(params: np.ndarray) -> list[int]:
            # A poisoned model can hold values float32 cannot add up: that is chance level.
            if not np.isfinite(params).all():
                return [0] * len(data.tests)
            return [round(test_accuracy(trainer, params, t) * len(t)) for t in data.tests]

        for agg, task_id in tasks.items():
            rounds = [r for r in admin.rounds(task_id) if r["state"] == "committed"]
            committed = sorted(((r["metrics"]["model_version"], r["metrics"].get("robust", {}))
                                for r in rounds), key=lambda vm: vm[0])  # fmt: skip
            per_version = [counts(initial)]
            for version, _ in committed:
                frame = coord.call(coord.service.version_params, None, task_id, str(version))
                per_version.append(counts(decode_update(frame, expected_length=initial.size)))
            correct[agg] = per_version
            robust[agg] = [m for _, m in committed]
    return ScenarioResult(setup.seed, data.name, attack, fraction, attackers, correct,
                          [len(t) for t in data.tests], data.honest_tests(attackers),
                          time.monotonic() - real0, summary, robust, unfinished)  # fmt: skip


def summarize(results: list[ScenarioResult], setup: Setup) -> dict[str, Any]:
    """Per dataset, scenario and aggregator, over seeds: mean final accuracy and its range,
    and the per-seed differences (mean, min, max) to the same aggregator's clean run and to
    clean undefended FedAvg, each clean run judged on the attacked run's held-out sets."""
    clean = {(r.dataset, r.seed): r for r in results if r.attack == CLEAN}
    Cell = tuple[float, float | None, float | None]
    runs: dict[str, dict[str, dict[str, list[Cell]]]] = {}
    stopped: dict[tuple[str, str, str], int] = {}
    for r in results:
        key = CLEAN if r.attack == CLEAN else f"{r.attack}@{r.fraction:.0%}"
        c = clean.get((r.dataset, r.seed))
        base = {} if c is None else c.final(setup.final_window, r.judged_on)
        for agg, acc in r.final(setup.final_window).items():
            stopped[r.dataset, key, agg] = stopped.get((r.dataset, key, agg), 0) + (
                agg in r.unfinished
            )
            own = base[agg] - acc if agg in base else None
            fedavg = base["fedavg"] - acc if "fedavg" in base else None
            runs.setdefault(r.dataset, {}).setdefault(key, {}).setdefault(agg, []).append(
                (acc, own, fedavg)
            )

    def stats(values: list[float | None], name: str) -> dict[str, Any]:
        if any(v is None for v in values):
            return {name: None}
        known = [float(v) for v in values if v is not None]
        return {name: round(float(np.mean(known)), 4), f"{name}_min": round(min(known), 4),
                f"{name}_max": round(max(known), 4)}  # fmt: skip

    return {
        dataset: {
            key: {
                agg: {
                    **stats([a for a, _, _ in seeds], "accuracy"),
                    **stats([c for _, c, _ in seeds], "cost_vs_own_clean"),
                    **stats([c for _, _, c in seeds], "cost_vs_clean_fedavg"),
                    "seeds": len(seeds),
                    "per_seed": [round(a, 4) for a, _, _ in seeds],
                    "runs_stopped_early": stopped[dataset, key, agg],
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
                elif scenario == CLEAN or s["cost_vs_own_clean"] is None:
                    cells.append(f"{s['accuracy']:.3f} [{s['accuracy_min']:.3f}, "
                                 f"{s['accuracy_max']:.3f}]")  # fmt: skip
                else:  # change against the clean run in points: mean [worst, best seed]
                    pts = [-100 * s[k] for k in ("cost_vs_own_clean", "cost_vs_own_clean_max",
                                                 "cost_vs_own_clean_min")]  # fmt: skip
                    cells.append(f"{s['accuracy']:.3f} ({pts[0]:+.1f} [{pts[1]:+.1f}, "
                                 f"{pts[2]:+.1f}])")  # fmt: skip
                if s is not None and s.get("runs_stopped_early"):
                    cells[-1] += "*"
            rows.append((dataset, scenario, *cells))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cols), sep, *(line(r) for r in rows)])


def plot(
    summary: dict[str, Any], results: list[ScenarioResult], setup: Setup, path: Path
) -> None:
    """Per dataset: final accuracy of every scenario and aggregator (bars: range over seeds),
    and the clean runs' learning curves (mean over seeds, band: range), which show whether
    the horizon is long enough for the clean runs to have converged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(summary)
    fig, axes = plt.subplots(len(datasets), 2, figsize=(15, 3.8 * len(datasets)), dpi=110,
                             squeeze=False, gridspec_kw={"width_ratios": [3, 1]})  # fmt: skip
    aggs = list(setup.aggregators)
    width = 0.8 / len(aggs)
    for (ax, curves), dataset in zip(axes, datasets, strict=True):
        scenarios = list(summary[dataset])
        x = np.arange(len(scenarios))
        for i, agg in enumerate(aggs):
            cells = [summary[dataset][s].get(agg, {}) for s in scenarios]
            ys = np.array([c.get("accuracy", np.nan) for c in cells])
            lo = ys - np.array([c.get("accuracy_min", np.nan) for c in cells])
            hi = np.array([c.get("accuracy_max", np.nan) for c in cells]) - ys
            ax.bar(x + (i - (len(aggs) - 1) / 2) * width, ys, width, label=agg,
                   yerr=np.vstack([lo, hi]),
                   error_kw={"linewidth": 0.8, "capsize": 1.5})  # fmt: skip
            clean = np.array([r.curve(agg) for r in results
                              if r.dataset == dataset and r.attack == CLEAN and agg in r.correct])
            if len(clean):
                v = np.arange(clean.shape[1])
                curves.plot(v, clean.mean(axis=0), linewidth=1, label=agg)
                curves.fill_between(v, clean.min(axis=0), clean.max(axis=0), alpha=0.15)
        clean_fedavg = summary[dataset].get(CLEAN, {}).get("fedavg", {}).get("accuracy")
        if clean_fedavg is not None:
            ax.axhline(clean_fedavg, color="grey", linestyle="--", linewidth=1,
                       label="clean FedAvg")  # fmt: skip
            ax.axhline(clean_fedavg - 0.02, color="grey", linestyle=":", linewidth=1,
                       label="clean FedAvg - 2 points")  # fmt: skip
        ax.set_xticks(x, scenarios, rotation=20, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("held-out accuracy")
        ax.set_title(f"{dataset}: {setup.devices} devices, {setup.rounds} rounds x "
                     f"{setup.goal} updates; mean of the last {setup.final_window} versions "
                     "(bars: range over seeds)"
                     + ("; attacked runs on the honest devices' data" if dataset == "synthetic"
                        else ""), fontsize=9)  # fmt: skip
        ax.grid(axis="y", alpha=0.3)
        curves.set_ylim(0, 1)
        curves.set_xlabel("version")
        curves.axvspan(setup.rounds - setup.final_window + 0.5, setup.rounds, color="grey",
                       alpha=0.1)  # fmt: skip
        curves.set_title(f"{dataset}, clean runs (shaded: the versions averaged)", fontsize=9)
        curves.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, ncol=len(labels), loc="lower center")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_results(results: list[ScenarioResult], setup: Setup, directory: Path) -> dict[str, Any]:
    summary = summarize(results, setup)
    directory.mkdir(parents=True, exist_ok=True)
    plot(summary, results, setup, directory / "poisoning.png")
    doc = {
        "benchmark": "bench_poisoning",
        "setup": asdict(setup),
        "aggregators": AGGREGATORS,
        "accuracy": f"held-out, mean of the last {setup.final_window} versions (synthetic: "
        "the held-out data of the honest devices; digits: one common held-out set); summary: "
        "mean, min, max over seeds; costs: per-seed differences to the clean run judged on "
        "the same held-out data (positive: accuracy lost)",
        "summary": summary,
        "scenarios": [r.to_json() for r in results],
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }  # fmt: skip
    # One line per scenario, not per number: the per-device counts are most of the file.
    body = ",\n".join(json.dumps(r.to_json(), separators=(",", ":")) for r in results)
    head = json.dumps({**doc, "scenarios": []}, indent=1)
    (directory / "poisoning.json").write_text(head.replace('"scenarios": []',
                                                           f'"scenarios": [\n{body}\n]'))
    return summary


def run(setup: Setup, say: Callable[..., None], out: Path | None) -> list[ScenarioResult]:
    results: list[ScenarioResult] = []
    scenarios = setup.scenarios()
    for seed in range(setup.seed, setup.seed + setup.seeds):
        run_setup = replace(setup, seed=seed)
        for name in setup.datasets:
            data = load_data(name, run_setup, say)
            say(f"seed {seed}, {name}: {setup.devices} devices "
                f"({sum(len(t) for t in data.tests)} held out); "
                f"{len(scenarios)} scenarios x {len(setup.aggregators)} aggregators, "
                f"{setup.rounds} rounds each")  # fmt: skip
            for attack, fraction in scenarios:
                results.append(run_scenario(data, attack, fraction, run_setup, say))
                if out is not None:  # after every scenario: partial results survive
                    write_results(results, setup, out)
    return results


def merge(paths: list[Path], out: Path) -> int:
    """Write the results of several runs (one setup but for datasets and seeds) as one."""
    docs = [json.loads(p.read_text()) for p in paths]
    results = [ScenarioResult.from_json(d) for doc in docs for d in doc["scenarios"]]
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                              for k, v in docs[0]["setup"].items()}  # fmt: skip
    seeds = sorted({r.seed for r in results})
    setup = replace(Setup(**fields), seed=seeds[0], seeds=len(seeds),
                    datasets=tuple(dict.fromkeys(r.dataset for r in results)))  # fmt: skip
    summary = write_results(results, setup, out)
    print(table(summary, setup))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: digits, 10 %% scale attack, fewer devices and rounds")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override Setup fields, e.g. --set rounds=12 scale=20")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="no run: combine the scenarios of these result files (runs of other "
                   "datasets or seeds, e.g. in parallel processes) into --out")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
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
