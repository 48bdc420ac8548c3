"""Device CPU cost of distributed DP: one SecAgg update encoded with and without its noise.

For each model size, a plan of ``goal`` 100 with ``secagg`` defaults and ``dp``
``{"clip": 1.0, "noise_multiplier": 1.0}`` is validated by the coordinator's own plan code
(the ring and each device's variance as a real task gets them); a random float32 update is
then encoded into the ring as the SDK does without DP (``edge_sdk.secagg.ring.encode``) and
with it (``edge_sdk.secagg.noise.noisy_encode``: conditional rounding and exact discrete
Gaussian noise from ``edge_sdk.secagg.dgauss``). Process CPU time of each, best of
``repeats``, in one run; the ratio is the figure to compare.

Run: ``./dev bench bench_ddp_device`` (``--sizes 10000,100000``, ``--repeats 2``). Writes
``benchmarks/results/bench_ddp_device.json`` and ``bench_ddp_device.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.plan import TaskPlan
from edge_sdk.secagg import ring
from edge_sdk.secagg.noise import DeviceNoise, noisy_encode

RESULTS = Path(__file__).parent / "results"
PLAN = {"goal": 100, "secagg": {}, "dp": {"clip": 1.0, "noise_multiplier": 1.0}}


def _cpu(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def measure(sizes: list[int], repeats: int) -> dict[str, Any]:
    plan = TaskPlan.from_json(PLAN)
    assert plan.secagg is not None
    spec = plan.secagg.ring_spec
    noise = DeviceNoise.from_json(plan.secagg.client_json()["dp"])
    assert noise is not None
    rng = np.random.default_rng(1)
    rows = []
    for n in sizes:
        delta = np.random.default_rng(n).normal(0, 0.01, n).astype(np.float32)
        plain = _cpu(lambda: ring.encode(delta, spec.max_weight, spec, rng), repeats)  # noqa: B023
        noisy = _cpu(lambda: noisy_encode(delta, spec, noise, rng), repeats)  # noqa: B023
        rows.append({"parameters": n, "encode_s": plain, "noisy_encode_s": noisy,
                     "ratio": noisy / plain if plain > 0 else None})  # fmt: skip
    return {
        "plan": PLAN,
        "bits": spec.bits,
        "sigma2": float(noise.sigma2),
        "load_average": os.getloadavg(),
        "rows": rows,
    }


def report(result: dict[str, Any]) -> None:
    print(f"ring {result['bits']} bits, per-device sigma2 {result['sigma2']:.4g} ring units, "
          f"load average {result['load_average'][0]:.1f}")  # fmt: skip
    print(f"{'parameters':>10} {'encode s':>9} {'noisy s':>8} {'ratio':>6} {'us/param':>8}")
    for r in result["rows"]:
        us = 1e6 * r["noisy_encode_s"] / r["parameters"]
        print(f"{r['parameters']:>10,} {r['encode_s']:>9.4f} {r['noisy_encode_s']:>8.3f} "
              f"{r['ratio'] or 0:>5.0f}x {us:>8.2f}")  # fmt: skip


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    n = [r["parameters"] for r in result["rows"]]
    ax.loglog(n, [r["encode_s"] for r in result["rows"]], "o-", label="ring.encode")
    ax.loglog(n, [r["noisy_encode_s"] for r in result["rows"]], "o-", label="noisy_encode")
    ax.set_xlabel("parameters")
    ax.set_ylabel("device CPU s")
    ax.set_title("distributed DP: encoding a SecAgg update")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    result = measure([int(x) for x in args.sizes.split(",")], args.repeats)
    report(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_ddp_device.json").write_text(json.dumps(result, indent=1))
    _plot(result, RESULTS / "bench_ddp_device.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
