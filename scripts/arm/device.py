"""The device side of the ARM check: N train steps, run unchanged on aarch64 (emulated) and x86.

Imports only the standard library, numpy and ``edge_sdk`` (with whatever one runtime the site
dir holds), exactly what a Raspberry Pi with ``fedge[edge]`` or ``fedge[litert]`` has::

    python device.py BUNDLE DATA.npz OUT.npy --backend ort-step --steps 20 --batch 32

trains on the first N batches of DATA (in order, no shuffling), saves the final flat
parameters to OUT.npy and prints, as its last stdout line, a JSON report: per-step times, the
runtime's import time and the process's peak RSS. (The federated round runs the real device
command, ``fedge device run``, instead.)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RUNTIME_MODULE = {"ort-step": "onnxruntime", "litert-step": "ai_edge_litert"}
# What a device install must not carry (the authoring host's and the coordinator's stack).
HEAVY = ("torch", "aiohttp", "sqlite_utils", "sklearn", "onnx", "litert_torch")


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM belongs to the process's own address space; ru_maxrss
    would also count the parent's RSS at fork time (Linux keeps it across exec). Under
    qemu-user this is the emulator process: the emulated program plus qemu's own memory."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _base_report(backend: str) -> dict[str, Any]:
    dist = "ai-edge-litert" if backend == "litert-step" else "onnxruntime"
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = importlib.metadata.version("onnxruntime-training")  # the x86 reference
    return {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "backend": backend,
        "runtime_version": version,
        "numpy": np.__version__,
        "sys_path": [p for p in sys.path if p],
        "heavy_importable": [m for m in HEAVY if importlib.util.find_spec(m) is not None],
    }


def run_steps(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    __import__(RUNTIME_MODULE[args.backend])
    import_s = time.perf_counter() - t0
    from edge_sdk.trainers import load_trainer

    trainer = load_trainer(args.bundle, backend=args.backend)
    data = np.load(args.data, allow_pickle=False)  # plain arrays only: never unpickle
    x, y = data["x"], data["y"]
    n, b = args.steps, args.batch
    if len(x) < n * b:
        raise SystemExit(f"{args.data} has {len(x)} examples, {n} steps of {b} need {n * b}")
    losses, times = [], []
    for i in range(n):
        xb, yb = x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]
        t = time.perf_counter()
        losses.append(trainer.train_step(xb, yb))
        times.append(time.perf_counter() - t)
    params = trainer.get_parameters()
    np.save(args.out, params, allow_pickle=False)
    # The first step includes one-off work (session warm-up, JIT-like allocations).
    steady = sorted(times[1:]) if n > 1 else times
    return {
        **_base_report(args.backend),
        "steps": n,
        "batch": b,
        "losses": [float(v) for v in losses],
        "first_step_s": times[0],
        "step_s_median": steady[len(steady) // 2],
        "runtime_import_s": import_s,
        "peak_rss_mb": _peak_rss_mb(),
        "finite": bool(np.isfinite(params).all()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--backend", choices=sorted(RUNTIME_MODULE), required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    print(json.dumps(run_steps(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
