"""Accuracy against epsilon: DP-FedAvg trained by an emulated fleet over HTTP.

The real thing end to end: ``devices`` emulated devices (:mod:`fedge.fleet`, each a real
edge-SDK client with its own state directory, training with the portable ONNX step, in a
torch-free fleet process) check in over HTTP with a coordinator on loopback (SQLite), which
selects fixed-size cohorts, clips, noises and accounts (:mod:`coordinator.privacy`). One task
per privacy level runs side by side on the same fleet and data: ``dp.epsilon`` of 1, 2, 4 and
8 at delta 1e-5 (the coordinator calibrates the noise multiplier for the plan's ``rounds``
rounds of ``goal`` devices out of ``population``; that epsilon is also the task's budget), and
a non-private task (plain example-weighted FedAvg, ``"robust": "none"``).

Data: FedProx Synthetic-IID (:func:`fedge.fleet.synthetic.fedprox_synthetic` with ``iid``),
each device's samples split 80/20: it trains on the 80 %, and the 20 % of every device is the
held-out test set, which only this script's final evaluation reads. Synthetic-IID, not
Synthetic(1, 1): with a thousand devices each drawing its own true model there is no global
model to learn (pooled logistic regression scores 0.12 held out). Model: softmax regression
(``benchmarks/dp_models.py``, 610 parameters).

The fixed-size cohort is drawn from the devices that checked in during the selection window
(the population the accountant is told). The window admits ``population`` candidates
(``max_candidates_factor = population / goal``) and pace steering brings every device back at
least every ``selection_window_s``, so each window fills to exactly ``population`` (500 of the
1,000 devices) and the noise calibrated for it is what the ledger then records, round by
round. (Letting all 1,000 devices into every window takes twice the check-ins, which these
shared cores cannot carry at a useful speed; with five tasks in one fleet a device busy
training for one task also misses another's window.) Tasks start once all devices are
registered.

The clip (``clip``) was chosen once, before this run, with the numpy simulation of
``bench_secagg.py`` (``dp_run``) on another draw of the data (data seed 1) scored on that
draw's held-out split: a validation set this run never sees; it is the same for every epsilon.
``--tune-clip`` reruns that selection (see :func:`tune_clip`).

The coordinator's database lives on tmpfs (``/dev/shm``): the run measures accuracy, not
durability, and a thousand devices checking in for five tasks would otherwise wait on this
disk's fsyncs (docs/benchmarks.md, "Fleet").

Run: ``./dev bench bench_dp`` (about 35 minutes on the 2 shared cores; ``--quick`` for a
smoke run of 200 devices; ``--set FIELD=VALUE`` changes the setup; ``--calibration`` times
the create request's epsilon calibration against a plain bisection; ``--dgauss`` times the
discrete Gaussian sampler of distributed DP). Progress: one line per
committed version of any task. Writes ``benchmarks/results/bench_dp.json`` and
``bench_dp.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedge.fleet.datasets import Dataset
from fedge.fleet.synthetic import fedprox_synthetic

RESULTS = Path(__file__).parent / "results"
MODEL = str(Path(__file__).parent / "dp_models.py") + ":SoftmaxRegression"


@dataclass(frozen=True)
class Setup:
    devices: int = 1000
    goal: int = 100  # cohort = goal (over_selection 1: no dropouts in this fleet)
    rounds: int = 50
    epsilons: tuple[float | None, ...] = (1.0, 2.0, 4.0, 8.0, None)
    delta: float = 1e-5
    clip: float = 0.53  # 3 x the median norm on the validation draw (module docstring)
    population: int = 500  # candidates a window admits: the accountant's population
    epochs: int = 2
    batch_size: int = 10
    lr: float = 0.05
    server_lr: float = 1.0
    max_samples: int = 250
    data_seed: int = 0
    seed: int = 0
    selection_window_s: float = 20.0
    speedup: float = 2.0
    step_time_s: float = 0.02
    processes: int = 1
    final_window: int = 5  # accuracy: mean over the last versions
    timeout_s: float = 3000.0  # real seconds; a task not done by then reports its versions

    def plan(self, epsilon: float | None) -> dict[str, Any]:
        plan: dict[str, Any] = {
            "rounds": self.rounds,
            "goal": self.goal,
            "over_selection": 1.0,
            "selection_window_s": self.selection_window_s,
            "round_deadline_s": 300.0,
            "max_candidates_factor": self.population / self.goal,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "codec": {"name": "fp32"},
            "server_optimizer": {"name": "fedavg", "lr": self.server_lr},
            "robust": "none",
        }
        if epsilon is not None:
            plan["dp"] = {"clip": self.clip, "epsilon": epsilon, "delta": self.delta,
                          "population": self.population}  # fmt: skip
        return plan


QUICK = Setup(devices=200, goal=20, rounds=6, epsilons=(8.0, None), population=100,
              speedup=4.0, final_window=2)  # fmt: skip


@dataclass(frozen=True)
class HeldOutSplit:
    """Device ``i``'s Synthetic-IID samples: the first 80 % (``part="train"``) or the rest
    (``"test"``). Picklable, for the fleet's worker process (:mod:`fedge.fleet.sources`)."""

    num_devices: int
    seed: int
    max_samples: int
    part: str = "train"

    @property
    def devices(self) -> int:
        return self.num_devices

    def __call__(self, first: int, count: int) -> list[Dataset]:
        every = fedprox_synthetic(1.0, 1.0, self.num_devices, self.seed, iid=True,
                                  max_samples=self.max_samples)  # fmt: skip
        out = []
        for d in every[first : first + count]:
            cut = max(1, int(0.8 * len(d)))
            part = slice(0, cut) if self.part == "train" else slice(cut, None)
            out.append(Dataset(d.x[part], d.y[part], d.num_classes))
        return out


def label(epsilon: float | None) -> str:
    return "none" if epsilon is None else f"eps {epsilon:g}"


def run(setup: Setup, say: Any = print) -> dict[str, Any]:
    from coordinator.config import PacingConfig
    from coordinator.embedded import EmbeddedCoordinator
    from edge_sdk.codecs import decode_update
    from edge_sdk.errors import Overloaded
    from edge_sdk.trainers import load_trainer
    from fedge.bundle_cache import cached_bundle
    from fedge.fleet import SimClock
    from fedge.fleet.baselines import test_accuracy
    from fedge.fleet.processes import ProcessFleet

    bundle = cached_bundle(MODEL, input_shape=(1, 60), loss="cross_entropy", optimizer="sgd",
                           lr=setup.lr)  # fmt: skip
    trainer = load_trainer(bundle, backend="ort-step")
    initial = trainer.get_parameters()
    test = Dataset.concat(HeldOutSplit(setup.devices, setup.data_seed, setup.max_samples,
                                       "test")(0, setup.devices))  # fmt: skip
    clock = SimClock(speedup=setup.speedup)
    window = setup.selection_window_s
    pacing = PacingConfig(min_retry_s=1.0, max_retry_s=window, jitter=0.3,
                          no_task_retry_s=0.5 * window, horizon_s=4 * window)  # fmt: skip
    real0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-dp-", dir="/dev/shm") as tmp, \
            EmbeddedCoordinator(Path(tmp) / "fedge.db", clock=clock.unix(0.0), pacing=pacing,
                                seed=setup.seed, tick_interval_s=0.05, retain_versions=0,
                                max_queued_operations=4096) as coord:  # fmt: skip
        admin = coord.admin()
        bundle_id = admin.upload_bundle(bundle)["bundle_id"]
        fleet = ProcessFleet(coord.url, HeldOutSplit(setup.devices, setup.data_seed,
                                                     setup.max_samples),
                             processes=setup.processes, seed=setup.seed, clock=clock,
                             step_time_s=setup.step_time_s, start_spread_s=3 * window,
                             enrollment_token=coord.enrollment_token)  # fmt: skip
        # Tasks start once every device is registered and checking in: the first windows
        # then see the whole population, as the calibration assumes.
        fleet.start()
        fleet.wait_for(lambda: fleet.summary().devices_registered >= setup.devices,
                       setup.timeout_s, poll_s=1.0)  # fmt: skip
        say(f"[{time.monotonic() - real0:6.0f} s] {setup.devices} devices registered")
        tasks: dict[str, str] = {}
        calibration_s: dict[str, float] = {}
        for eps in setup.epsilons:
            t = time.perf_counter()
            tasks[label(eps)] = admin.create_task(bundle_id, setup.plan(eps),
                                                  name=label(eps))["task_id"]  # fmt: skip
            calibration_s[label(eps)] = time.perf_counter() - t
        z = {k: admin.task(t)["plan"].get("dp", {}).get("noise_multiplier")
             for k, t in tasks.items()}  # fmt: skip
        say("noise multipliers: " + ", ".join(f"{k} z={v:.3g}" for k, v in z.items() if v))
        shown = [""]

        def done() -> bool:
            try:
                states = {k: admin.task(t) for k, t in tasks.items()}
            except Overloaded:  # the fleet comes first; look again at the next poll
                return False
            line = "  ".join(
                f"{k}: {s['model_version']}"
                + (f" ({s['epsilon']:.2f})" if s.get("epsilon") is not None else "")
                for k, s in states.items()
            )
            if line != shown[0]:
                shown[0] = line
                s = fleet.summary()
                say(f"[{time.monotonic() - real0:6.0f} s] {line} | check-ins {s.checkins}",
                    flush=True)
            return all(s["state"] in ("completed", "failed") for s in states.values())

        try:
            fleet.wait_for(done, setup.timeout_s, poll_s=1.0)
            summary = fleet.stop().as_dict()
        finally:
            fleet.close()
        out: dict[str, Any] = {"fleet": summary, "calibration_s": calibration_s, "tasks": []}
        for key, task_id in tasks.items():
            task = admin.task(task_id)
            rounds = sorted((r for r in admin.rounds(task_id) if r["state"] == "committed"),
                            key=lambda r: r["metrics"]["model_version"])  # fmt: skip
            curve = [test_accuracy(trainer, initial, test)]
            for r in rounds:
                frame = coord.call(coord.service.version_params, None, task_id,
                                   str(r["metrics"]["model_version"]))  # fmt: skip
                params = decode_update(frame, expected_length=initial.size)
                curve.append(test_accuracy(trainer, params, test))
            dp = [r["metrics"].get("dp") for r in rounds]
            out["tasks"].append({
                "name": key,
                "target_epsilon": None if key == "none" else float(key.split()[1]),
                "state": task["state"],
                "completed_reason": (task.get("privacy") or {}).get("completed_reason"),
                "versions": len(rounds),
                "epsilon": task.get("epsilon"),
                "noise_multiplier": z[key],
                "accuracy": float(np.mean(curve[-setup.final_window:])),
                "curve": curve,
                "populations": [d["population"] for d in dp if d],
                "clipped_fraction": [d["clipped"] / max(1, d["reports"]) for d in dp if d],
            })  # fmt: skip
    out["real_s"] = time.monotonic() - real0
    return out


def tune_clip(factors: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0), seed: int = 1,
              say: Any = print) -> dict[str, Any]:
    """The clip this benchmark uses, chosen on a validation draw: ``bench_secagg``'s numpy
    simulation of the same rounds (data seed ``seed``, not the fleet's), epsilon 8; the clip is
    ``factor x`` the median update norm of that draw's non-private run, and the factor with the
    best held-out accuracy of that draw wins. The simulation draws its cohorts from all
    ``devices`` (its population is its device count), not from windows of ``population``:
    the clip is chosen at the noise of q = goal / devices, milder than the fleet run's."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_secagg as sim

    setup = Setup()
    s = replace(sim.Setup(), population=setup.devices, cohort=setup.goal, rounds=setup.rounds,
                local_epochs=setup.epochs, batch_size=setup.batch_size, lr=setup.lr,
                max_samples=setup.max_samples)  # fmt: skip
    base = sim.dp_run(None, s, seed, 1.0)
    scores = {}
    for f in factors:
        r = sim.dp_run(8.0, s, seed, f * base["median_norm"])
        scores[f] = r["accuracy"]
        say(f"clip {f:g} x median ({f * base['median_norm']:.3f}): {r['accuracy']:.3f} "
            f"(non-private {base['accuracy']:.3f})", flush=True)
    best = max(scores, key=lambda f: scores[f])
    return {"median_norm": base["median_norm"], "scores": scores, "factor": best,
            "clip": best * base["median_norm"], "non_private": base["accuracy"]}


def calibration(setup: Setup, say: Any = print) -> dict[str, Any]:
    """The create request's calibration (:func:`coordinator.privacy.noise_for_budget`) against
    a plain bisection over the same grid that asks the full accountant at every step (what the
    request did before): CPU seconds of each and whether they agree, per target epsilon."""
    from coordinator import privacy

    rows = []
    for eps in [e for e in setup.epsilons if e is not None]:

        def full(k: int, eps: float = eps) -> bool:
            rnd = privacy.Round(setup.population, setup.goal, privacy.noise_grid(k))
            return privacy.Ledger(setup.delta).plus(rnd, setup.rounds).epsilon() <= eps

        t = time.process_time()
        lo, hi = -1400, 0
        while not full(hi):
            lo, hi = hi, hi + 256
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if full(mid) else (mid, hi)
        plain_s = time.process_time() - t
        privacy.noise_for_budget.cache_clear()
        privacy._round_rdp.cache_clear()
        t = time.process_time()
        z = privacy.noise_for_budget(eps, setup.population, setup.goal, setup.rounds, setup.delta)
        fast_s = time.process_time() - t
        rows.append({"epsilon": eps, "noise_multiplier": z, "plain_s": plain_s, "fast_s": fast_s,
                     "same": z == privacy.noise_grid(hi)})  # fmt: skip
        say(f"epsilon {eps:g}: z {z:.4g}, plain bisection {plain_s:.2f} s, "
            f"calibration {fast_s:.3f} s ({plain_s / fast_s:.1f}x), same: {rows[-1]['same']}")
    return {"setup": asdict(setup), "rows": rows}


def dgauss_speed(draws: int = 50_000, say: Any = print) -> dict[str, Any]:
    """CPU microseconds per draw of the exact discrete Gaussian sampler
    (:mod:`edge_sdk.secagg.dgauss`) for a few variances (ring units)."""
    from edge_sdk.secagg.dgauss import CryptoIntegers, sample

    rows = []
    for sigma2 in (1, 100, 10**4, 10**8):
        t = time.process_time()
        x = sample(sigma2, draws, CryptoIntegers())
        us = 1e6 * (time.process_time() - t) / draws
        rows.append({"sigma2": sigma2, "us_per_draw": us, "variance": float(x.var())})
        say(f"sigma2 {sigma2:>9}: {us:5.1f} us a draw, sample variance {x.var():.4g}")
    return {"draws": draws, "rows": rows}


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for t in result["tasks"]:
        a.plot(range(len(t["curve"])), t["curve"], label=t["name"])
    a.set_xlabel("model version (round)")
    a.set_ylabel("held-out accuracy")
    a.set_title(f"DP-FedAvg, emulated fleet of {result['setup']['devices']:,} devices")
    a.legend(fontsize=8)
    names = [t["name"] for t in result["tasks"]]
    b.bar(names, [t["accuracy"] for t in result["tasks"]])
    b.set_ylim(0, 1)
    b.set_title(f"accuracy, mean of the last {result['setup']['final_window']} versions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(result: dict[str, Any]) -> None:
    none = next((t["accuracy"] for t in result["tasks"] if t["name"] == "none"), None)
    print(f"{'task':>8} {'z':>6} {'eps spent':>9} {'versions':>8} {'accuracy':>8} "
          f"{'gap (pts)':>9} {'population':>14} {'clipped':>7}")  # fmt: skip
    for t in result["tasks"]:
        pops = t["populations"]
        gap = "" if none is None or t["name"] == "none" else f"{100 * (none - t['accuracy']):.1f}"
        print(f"{t['name']:>8} {t['noise_multiplier'] or 0:>6.3g} {t['epsilon'] or 0:>9.3f} "
              f"{t['versions']:>8} {t['accuracy']:>8.3f} {gap:>9} "
              f"{(f'{min(pops)}-{max(pops)}' if pops else ''):>14} "
              f"{(np.mean(t['clipped_fraction']) if pops else 0):>7.0%}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run (bench_dp_quick.*)")
    p.add_argument("--tune-clip", action="store_true", help="rerun the clip's selection only")
    p.add_argument("--dgauss", action="store_true",
                   help="time the discrete Gaussian sampler only (bench_dp_dgauss.json)")
    p.add_argument("--calibration", action="store_true",
                   help="time the epsilon calibration only (bench_dp_calibration.json)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = p.parse_args(argv)
    if args.tune_clip:
        print(json.dumps(tune_clip(), indent=1))
        return 0
    setup, name = (QUICK, "bench_dp_quick") if args.quick else (Setup(), "bench_dp")
    types = {f.name: f.type for f in dataclasses.fields(Setup)}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in types:
            p.error(f"unknown field {key!r}")
        setup = replace(setup, **{key: json.loads(value)})
    RESULTS.mkdir(exist_ok=True)
    if args.dgauss:
        (RESULTS / "bench_dp_dgauss.json").write_text(json.dumps(dgauss_speed(), indent=1))
        return 0
    if args.calibration:
        out = calibration(setup)
        (RESULTS / f"{name}_calibration.json").write_text(json.dumps(out, indent=1))
        return 0
    result = {"setup": asdict(setup), "machine": platform.platform(), **run(setup)}
    report(result)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    _plot(result, RESULTS / f"{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
