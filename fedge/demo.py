"""``fedge demo``: the whole system on one machine, and the result that matters.

Exports the demo model (``model_export.models:DigitsMLP``, cached), starts a coordinator on a
temporary SQLite file in this process, creates a federated task, and runs an emulated fleet
on scikit-learn's digits split across devices with Dirichlet label skew. Every committed
model version is evaluated on held-out digits; the run ends with a table, a PNG plot of
accuracy per round against two baselines (each device alone; all data pooled) and, as the
last line of stdout, a JSON object::

    {"rounds": 50, "devices": 30, "final_accuracy": 0.95, "local_only_accuracy": 0.6,
     "centralized_accuracy": 0.97, "bytes_uploaded": ..., "bytes_uploaded_fp32": ..., ...}

The defaults were tuned on this 2-core machine (figures in docs/benchmarks.md, "Fleet").

Imports torch (through the exporter) and the coordinator: authoring-host code, never a
device's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk.protocol import Route
from fedge.bundle_cache import DIGITS_BUNDLE_ARGS, DIGITS_MODEL
from fedge.fleet.clock import SimClock
from fedge.fleet.datasets import Dataset

if TYPE_CHECKING:
    from coordinator.embedded import EmbeddedCoordinator
    from fedge.fleet.emulator import Fleet

__all__ = ["DemoConfig", "DemoResult", "RoundPoint", "demo_bundle", "run_demo"]

DEMO_MODEL = DIGITS_MODEL
# The fleet trains with the portable step (ort-step): no ORT training artifacts to export.
DEMO_EXPORT_ARGS: dict[str, Any] = {**DIGITS_BUNDLE_ARGS, "ort_training": False}
# ``--model``: the MLP, or a MobileNet-style network (depthwise convolutions, batch norm) on the
# same flat digits, so that a non-MLP model is seen federated.
DEMO_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp": (DEMO_MODEL, DEMO_EXPORT_ARGS),
    "mobilenet": ("model_export.zoo:DigitsMobileNet", DEMO_EXPORT_ARGS),
}


@dataclass(frozen=True)
class DemoConfig:
    """The demo's knobs; the defaults are tuned to finish in under 3 minutes on 2 cores."""

    devices: int = 30
    rounds: int = 60
    goal: int = 15  # reports per round (the coordinator selects 1.3x as many)
    steps: int = 10  # local steps per round: equal work per device, so no size bias in the race
    batch_size: int = 16
    lr: float = 0.15
    lr_decay: float = 0.98
    alpha: float = 1.0  # Dirichlet label skew across devices (smaller: more skewed)
    codec: str = "int8"
    server_optimizer: str = "fedavgm"
    server_lr: float = 1.0
    dropout_prob: float = 0.05
    lapse_prob: float = 0.01
    speedup: float = 20.0  # emulated seconds per real second
    seed: int = 0
    out: Path = Path("out/demo")  # /out/ is git-ignored in the repo
    cache_dir: Path | None = None  # exported bundle cache; default ~/.cache/fedge
    timeout_s: float = 900.0
    model: str = "mlp"  # a key of DEMO_MODELS
    batchnorm: str = "aggregate"  # batch norm layers: "aggregate" or "local" (FedBN)

    def __post_init__(self) -> None:
        from edge_sdk.codecs import CodecSpec
        from edge_sdk.local_training import BATCHNORM_MODES

        if self.model not in DEMO_MODELS or self.batchnorm not in BATCHNORM_MODES:
            raise ValueError(
                f"model must be one of {', '.join(DEMO_MODELS)} and batchnorm one of "
                f"{', '.join(BATCHNORM_MODES)}"
            )

        if self.devices < 2 or self.rounds < 1 or not 1 <= self.goal <= self.devices:
            raise ValueError("need devices >= 2, rounds >= 1 and 1 <= goal <= devices")
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or not self.alpha > 0:
            raise ValueError("steps and batch size must be >= 1, lr and alpha > 0")
        if not (0 <= self.dropout_prob <= 1 and 0 <= self.lapse_prob <= 1):
            raise ValueError("dropout and lapse probabilities must be in [0, 1]")
        if not self.speedup > 0:
            raise ValueError("speedup must be > 0")
        CodecSpec.from_json({"name": self.codec})  # CodecSpecError (a ValueError) names the fault

    def plan(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "goal": self.goal,
            "over_selection": 1.3,
            "selection_window_s": 5.0,
            "round_deadline_s": 60.0,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "lr_decay": self.lr_decay,
            "codec": {"name": self.codec},
            "server_optimizer": {"name": self.server_optimizer, "lr": self.server_lr},
            "batchnorm": self.batchnorm,
        }


@dataclass(frozen=True)
class RoundPoint:
    round: int
    accuracy: float  # the round's committed model on held-out data
    reported: int  # updates aggregated
    selected: int  # devices assigned (over-selection: dropouts and stragglers are the rest)
    bytes_in: int  # encoded update bytes the round received
    wall_s: float


@dataclass
class DemoResult:
    config: DemoConfig
    points: list[RoundPoint]
    initial_accuracy: float
    local_only: list[float]
    centralized_accuracy: float
    fleet: dict[str, Any]
    bytes_uploaded: int
    bytes_uploaded_fp32: int
    wall_s: float
    plot: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final_accuracy(self) -> float:
        return self.points[-1].accuracy if self.points else self.initial_accuracy

    def to_json(self) -> dict[str, Any]:
        return {
            "rounds": len(self.points),
            "devices": self.config.devices,
            "final_accuracy": round(self.final_accuracy, 4),
            "local_only_accuracy": round(float(np.mean(self.local_only)), 4),
            "centralized_accuracy": round(self.centralized_accuracy, 4),
            "initial_accuracy": round(self.initial_accuracy, 4),
            "bytes_uploaded": self.bytes_uploaded,
            "bytes_uploaded_fp32": self.bytes_uploaded_fp32,
            "compression": round(self.bytes_uploaded_fp32 / max(self.bytes_uploaded, 1), 2),
            "codec": self.config.codec,
            "dirichlet_alpha": self.config.alpha,
            "uploads": self.fleet["uploads_acknowledged"],
            "dropouts": self.fleet["dropouts"],
            "aborts": self.fleet["aborts"],
            "seed": self.config.seed,
            "wall_s": round(self.wall_s, 1),
            "plot": str(self.plot) if self.plot else None,
        }


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedge"


def demo_bundle(
    cache_dir: Path | None = None, say: Callable[[str], None] = print, model: str = "mlp"
) -> Path:
    """The demo model's bundle, exported once per exporter version into ``cache_dir``."""
    from edge_sdk.bundle import verify_bundle
    from fedge.bundle_cache import cached_bundle

    spec, export_args = DEMO_MODELS[model]
    say(f"demo model {spec} (exported on the first run, then cached) ...")
    out = cached_bundle(spec, cache_dir=(cache_dir or _default_cache()) / "bundles", **export_args)
    verify_bundle(out)
    say(f"demo model bundle: {out}")
    return out


def demo_coordinator(config: DemoConfig, clock: SimClock) -> EmbeddedCoordinator:
    """A coordinator on a temporary SQLite file, reading the fleet's clock."""
    from coordinator.config import PacingConfig
    from coordinator.embedded import EmbeddedCoordinator

    # Pace steering on the emulated clock: come back within seconds, not minutes.
    pacing = PacingConfig(min_retry_s=2.0, max_retry_s=60.0, no_task_retry_s=10.0)
    return EmbeddedCoordinator(clock=clock.unix(), pacing=pacing, seed=config.seed)


def demo_fleet(url: str, parts: Sequence[Dataset], config: DemoConfig, clock: SimClock,
               enrollment_token: str | None = None) -> Fleet:
    """The demo's fleet: uniform devices but for mid-round dropouts and lapses; they register
    with ``enrollment_token`` (the coordinator's)."""
    from edge_sdk.client import ClientConfig
    from fedge.fleet import Heterogeneity
    from fedge.fleet.emulator import Fleet

    heterogeneity = Heterogeneity(dropout_prob=config.dropout_prob, lapse_prob=config.lapse_prob)
    # The coordinator's answer to a report or an abort steers when a device returns; a late
    # upload (409 round_closed) carries no such hint, so its device waits 10 s (the client's
    # default is 1 s) rather than filling the next selection window at once.
    client = ClientConfig(backend="ort-step", after_assignment_s=10.0,
                          enrollment_token=enrollment_token)
    return Fleet(url, parts, heterogeneity=heterogeneity, seed=config.seed, clock=clock,
                 rejoin_s=60.0, client_config=client)


def run_demo(config: DemoConfig, say: Callable[[str], None] = print) -> DemoResult:
    """Run the demo (see the module docstring); ``say`` gets the human-readable progress."""
    from edge_sdk.codecs import CodecSpec, decode_update, encode_update
    from edge_sdk.trainers import load_trainer
    from fedge.fleet import load_digits, partition
    from fedge.fleet.baselines import Recipe, centralized, local_only, test_accuracy

    started = time.monotonic()
    # Clients log each abort the coordinator could not take (a lapse after the deadline):
    # expected in an emulated fleet, noise in the demo's output.
    logging.getLogger("edge_sdk").setLevel(logging.ERROR)
    bundle = demo_bundle(config.cache_dir, say, config.model)
    trainer = load_trainer(bundle, backend="ort-step")
    initial = trainer.get_parameters()

    train, test = load_digits(seed=config.seed)
    rng = np.random.default_rng(config.seed)
    parts = [train.subset(p) for p in
             partition(train.y, config.devices, f"dirichlet:{config.alpha}", rng)]
    sizes = [len(p) for p in parts]
    say(f"data: {len(train)} training digits over {config.devices} devices (Dirichlet "
        f"alpha={config.alpha}: {min(sizes)}-{max(sizes)} examples, "
        f"{np.mean([len(np.unique(p.y)) for p in parts]):.1f} labels per device on average); "
        f"{len(test)} held out")

    # Budgets: each device alone gets the steps of being selected every round; the pooled model
    # the steps of all the updates the federation counts.
    alone = Recipe(config.batch_size, config.lr, steps=config.rounds * config.steps)
    pooled = Recipe(config.batch_size, config.lr, steps=config.rounds * config.steps * config.goal)
    say(f"baselines (SGD, batch {config.batch_size}, lr {config.lr}): centralized "
        f"{pooled.steps} steps, local-only {alone.steps} steps per device ...")
    central = centralized(trainer, train, test, initial, pooled, seed=config.seed)
    local = local_only(trainer, parts, test, initial, alone, seed=config.seed)
    say(f"  centralized (pooled data): {central:.3f}   local-only (mean of "
        f"{len(local)} devices): {np.mean(local):.3f}")
    initial_acc = test_accuracy(trainer, initial, test)

    clock = SimClock(speedup=config.speedup)
    points: list[RoundPoint] = []
    with demo_coordinator(config, clock) as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(bundle)["bundle_id"]
        task_id = admin.create_task(bundle_id, config.plan(), name="digits-demo")["task_id"]
        say(f"coordinator {coord.url} (temporary SQLite), task {task_id}: {config.rounds} "
            f"rounds, goal {config.goal}, {config.steps} local steps, codec {config.codec}")
        say(f"dashboard {coord.url}{Route.DASHBOARD} while it runs (admin token "
            f"{coord.admin_token}; or: fedge watch --coordinator {coord.url} --admin-token ...)")
        fleet = demo_fleet(coord.url, parts, config, clock, coord.enrollment_token)
        t0 = time.monotonic()

        def new_rounds() -> bool:
            """Evaluate every newly committed version; True once the task is done."""
            task = admin.task(task_id)
            history = [r for r in admin.rounds(task_id)
                       if r["kind"] == "train" and r["state"] == "committed"]
            for r in history[len(points):]:
                m = r["metrics"]
                frame = coord.call(coord.service.version_params, None, task_id,
                                   str(m["model_version"]))
                params = decode_update(frame, expected_length=initial.size)
                point = RoundPoint(len(points) + 1, test_accuracy(trainer, params, test),
                                   int(m["reported"]), int(m["participants"]),
                                   int(m["bytes_in"]), time.monotonic() - t0)
                points.append(point)
                say(f"  round {point.round:3d}/{config.rounds}  accuracy {point.accuracy:.3f}  "
                    f"reported {point.reported:3d} of {point.selected:3d} selected  "
                    f"up {point.bytes_in / 1e3:6.1f} kB  t={point.wall_s:5.1f}s")
            return bool(task["state"] == "completed" and len(points) >= task["rounds_completed"])

        try:
            with fleet:
                done = fleet.wait_for(new_rounds, timeout_s=config.timeout_s, poll_s=0.1)
            fleet_summary = fleet.summary().as_dict()
        finally:
            fleet.close()
        if not done:
            say(f"warning: the task did not complete within {config.timeout_s:.0f}s")
        uploads = int(fleet_summary["uploads_acknowledged"])
    fp32_frame = len(encode_update(np.zeros(initial.size, np.float32), CodecSpec("fp32"))[0])
    result = DemoResult(
        config=config,
        points=points,
        initial_accuracy=initial_acc,
        local_only=local,
        centralized_accuracy=central,
        fleet=fleet_summary,
        bytes_uploaded=int(fleet_summary["update_bytes"]),
        bytes_uploaded_fp32=uploads * fp32_frame,
        wall_s=time.monotonic() - started,
    )
    result.plot = plot(result, config.out / "accuracy.png")
    (config.out / "result.json").write_text(json.dumps(
        {**result.to_json(), "per_round": [dataclasses.asdict(p) for p in points],
         "fleet": fleet_summary, "local_only_per_device": local}, indent=1))
    return result


def plot(result: DemoResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    rounds = [0] + [p.round for p in result.points]
    acc = [result.initial_accuracy] + [p.accuracy for p in result.points]
    ax.plot(rounds, acc, marker="o", markersize=3, label="federated (fedge)")
    ax.axhline(result.centralized_accuracy, color="tab:green", linestyle="--",
               label=f"centralized, pooled data ({result.centralized_accuracy:.3f})")
    lo = float(np.mean(result.local_only))
    ax.axhline(lo, color="tab:red", linestyle=":", label=f"local-only, mean per device ({lo:.3f})")
    c = result.config
    ax.set_title(f"Digits, {c.devices} devices, Dirichlet alpha={c.alpha}, codec {c.codec}")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def table(result: DemoResult) -> str:
    j = result.to_json()
    rows = [
        ("federated model (held-out accuracy)", f"{j['final_accuracy']:.3f}"),
        ("centralized, pooled data", f"{j['centralized_accuracy']:.3f}"),
        ("local-only, mean over devices", f"{j['local_only_accuracy']:.3f}"),
        ("initial model", f"{j['initial_accuracy']:.3f}"),
        ("rounds / devices", f"{j['rounds']} / {j['devices']}"),
        ("uploads acknowledged / dropouts / aborts",
         f"{j['uploads']} / {j['dropouts']} / {j['aborts']}"),
        (f"bytes uploaded ({j['codec']})", f"{j['bytes_uploaded']:,}"),
        ("bytes as fp32 deltas", f"{j['bytes_uploaded_fp32']:,} ({j['compression']}x)"),
        ("wall time", f"{j['wall_s']} s"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'':-<{width + 16}}"]
    lines += [f"{k:<{width}}  {v:>12}" for k, v in rows]
    lines.append(lines[0])
    return "\n".join(lines)


def main_output(result: DemoResult, stream: Any = sys.stdout) -> None:
    print(table(result), file=stream)
    print(f"plot: {result.plot}", file=stream)
    print(json.dumps(result.to_json()), file=stream)
