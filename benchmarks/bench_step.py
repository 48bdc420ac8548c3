"""Train-step time and peak memory per backend against torch eager, same model, same batch.

Models: the 784-128-10 MLP DESIGN.md measured (``WideMLP``) and the demo's ``DigitsMLP``
(64-32-10); batch 32, SGD lr 0.01 (an optimizer every backend runs, ort-training included).
Each backend runs in its own fresh process (so imports and peak RSS do not mix) with one
thread (``torch.set_num_threads(1)``; ORT and LiteRT trainers default to one): after 100
warm-up steps, 7 blocks of steps are timed and the median block gives ms/step; three
interleaved rounds per backend, each backend keeping its fastest.

Run: ``./dev bench bench_step`` (about 3 min with the TFLite exports, cached afterwards in
``.cache/bench-bundles``). Writes ``benchmarks/results/bench_step.json``, ``bench_step.png``
and the "## Train step" section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Train step"
BATCH = 32
LR = 0.01
MODELS = {
    "mlp-784-128-10": ("model_export.models:WideMLP", (1, 784)),
    "digits-mlp-64-32-10": ("model_export.models:DigitsMLP", (1, 64)),
}
BACKENDS = ("torch-eager", "ort-step", "litert-step", "ort-training")
# (backend, environment): "dev" is .venv, where the module onnxruntime is onnxruntime-training
# (which imports torch, so its RSS says nothing about a device); "edge" is what a device
# installs, numpy + plain onnxruntime (built under .cache/ by fedge/edge_venv.py).
RUNS = (
    ("torch-eager", "dev"),
    ("ort-step", "edge"),
    ("ort-step", "dev"),
    ("litert-step", "dev"),
    ("ort-training", "dev"),
)
WARMUP, BLOCKS = 100, 7


def peak_rss_mb() -> float:
    """Peak RSS of this process: ``VmHWM`` (the peak of this address space). ``ru_maxrss``
    of an exec'd child can still carry the forking parent's size on Linux."""
    import resource

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- one backend in its own process ------------------------------------------------------------


def _torch_stepper(bundle: Path) -> Any:
    """torch eager on the bundle's model, loss, optimizer and initial model vector."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from edge_sdk.bundle import load_manifest
    from model_export.loading import load_model

    torch.set_num_threads(1)
    raw = load_manifest(bundle).raw
    model = load_model(raw["model"]["source"]).train()
    vec = torch.from_numpy(np.fromfile(bundle / raw["initial_parameters"], dtype="<f4"))
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for p in [*raw["parameters"], *raw.get("buffers", [])]:
            n = int(np.prod(p["shape"]))
            named[p["name"]].copy_(vec[p["offset"] : p["offset"] + n].reshape(p["shape"]))
    trainable = [named[p["name"]] for p in raw["parameters"]]
    o = raw["optimizer"]
    opt: torch.optim.Optimizer
    if o["name"] == "sgd":
        opt = torch.optim.SGD(
            trainable, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"]
        )
    else:
        opt = torch.optim.AdamW(
            trainable, lr=o["lr"], betas=o["betas"], eps=o["eps"], weight_decay=o["weight_decay"]
        )

    def step(x: Any, y: Any) -> float:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.item())

    return step, torch.from_numpy


def example_batch(bundle: Path, n: int) -> tuple[Any, Any]:
    """A batch that fits the bundle: float features, or token ids in ``[0, VOCAB)``."""
    import numpy as np

    from edge_sdk.bundle import load_manifest

    raw = load_manifest(bundle).raw
    rng = np.random.default_rng(0)
    shape = (n, *raw["input"]["shape"][1:])
    if raw["input"]["dtype"] == "int64":
        x = rng.integers(0, 32, size=shape)  # model_export.zoo.VOCAB
    else:
        x = rng.normal(size=shape).astype(np.float32)
    return x, rng.integers(0, raw["num_classes"], size=n)


def worker(backend: str, bundle: Path, steps: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    if backend == "torch-eager":
        step, convert = _torch_stepper(bundle)
    else:
        from edge_sdk.trainers import load_trainer

        trainer = load_trainer(bundle, backend=backend)
        step, convert = trainer.train_step, (lambda a: a)
    load_s = time.perf_counter() - t0
    x, y = (convert(a) for a in example_batch(bundle, BATCH))
    for _ in range(WARMUP):
        step(x, y)
    blocks = []
    for _ in range(BLOCKS):
        t = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        blocks.append((time.perf_counter() - t) / steps * 1e3)
    runtime = {"torch-eager": "torch", "litert-step": "ai_edge_litert"}.get(backend, "onnxruntime")
    version = getattr(sys.modules.get(runtime), "__version__", "?")
    return {
        "backend": backend,
        "runtime": f"{runtime} {version}",
        "ms_per_step": statistics.median(blocks),
        "ms_per_step_best": min(blocks),
        "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(),
    }


# -- the driver --------------------------------------------------------------------------------


def _bundle(spec: str, shape: tuple[int, ...]) -> Path:
    from model_export.cache import cached_export

    return cached_export(
        spec,
        ROOT / ".cache" / "bench-bundles",
        input_shape=shape,
        lr=LR,
        tflite=True,
        tflite_batch=BATCH,
    )


def _python(env: str) -> str | None:
    if env == "dev":
        return sys.executable
    from fedge.edge_venv import ensure_edge_venv

    try:
        return str(ensure_edge_venv("edge"))
    except Exception as e:  # no registry access: report the other rows
        print(f"[bench_step] no edge environment ({e}); skipping its rows", file=sys.stderr)
        return None


def run_all(steps: int, rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {"batch": BATCH, "lr": LR, "threads": 1, "models": {}}
    pythons = {env: _python(env) for env in sorted({env for _, env in RUNS})}
    for name, (spec, shape) in MODELS.items():
        print(f"[bench_step] exporting {spec} (cached after the first run)", flush=True)
        bundle = _bundle(spec, shape)
        best: dict[tuple[str, str], dict[str, Any]] = {}
        # Rounds interleave the backends, so a burst of load on the shared machine hits all
        # of them rather than one; each keeps its fastest round.
        for round_ in range(rounds):
            for backend, env in RUNS:
                python = pythons[env]
                if python is None:
                    continue
                cmd = [python, __file__, "--worker", backend, "--bundle", str(bundle)]
                run = subprocess.run(
                    [*cmd, "--steps", str(steps)],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                    check=False,
                )
                if run.returncode != 0:
                    print(f"[bench_step] {backend} failed:\n{run.stderr[-2000:]}", file=sys.stderr)
                    continue
                row = {**json.loads(run.stdout.strip().splitlines()[-1]), "env": env}
                print(
                    f"[bench_step] {name:22} round {round_ + 1}/{rounds} {backend:13} {env:5} "
                    f"{row['ms_per_step']:.3f} ms/step {row['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
                old = best.get((backend, env))
                if old is None or row["ms_per_step_best"] < old["ms_per_step_best"]:
                    best[(backend, env)] = row
        rows = list(best.values())
        # Ratios of the best blocks: other processes on a shared machine only ever add time.
        torch_ms = next(r["ms_per_step_best"] for r in rows if r["backend"] == "torch-eager")
        for r in rows:
            r["speedup_vs_torch"] = torch_ms / r["ms_per_step_best"]
        results["models"][name] = rows
    return results


def table(results: dict[str, Any]) -> str:
    lines = [
        "| model | backend | env | runtime | ms/step (median) | best | vs torch eager (best) "
        "| peak RSS MB | load s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, rows in results["models"].items():
        for r in rows:
            lines.append(
                f"| {name} | {r['backend']} | {r['env']} | {r['runtime']} | "
                f"{r['ms_per_step']:.3f} | "
                f"{r['ms_per_step_best']:.3f} | {r['speedup_vs_torch']:.2f}x | "
                f"{r['peak_rss_mb']:.0f} | {r['load_s']:.2f} |"
            )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(results["models"])
    width = 0.8 / len(RUNS)
    for i, run in enumerate(RUNS):
        for ax, key in zip(axes, ("ms_per_step", "peak_rss_mb"), strict=True):
            values = [
                next((r[key] for r in results["models"][n] if (r["backend"], r["env"]) == run), 0)
                for n in names
            ]
            label = f"{run[0]} ({run[1]})"
            ax.bar([j + i * width for j in range(len(names))], values, width, label=label)
    for ax, title in zip(
        axes, ("train step, ms (batch 32, 1 thread)", "peak RSS, MB"), strict=True
    ):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def update_doc(results: dict[str, Any]) -> None:
    models = results["models"]

    def row(model: str, backend: str, env: str) -> dict[str, Any] | None:
        return next((r for r in models[model] if (r["backend"], r["env"]) == (backend, env)), None)

    def speedup(model: str, backend: str, env: str = "dev") -> str:
        found = row(model, backend, env)
        return f"{found['speedup_vs_torch']:.1f}x" if found else "n/a"

    wide, digits = list(models)
    edge, eager = row(wide, "ort-step", "edge"), row(wide, "torch-eager", "dev")
    if edge is None or eager is None:
        verdict = "(no edge row on this run)"
    else:
        got, torch_ms = float(edge["ms_per_step_best"]), float(eager["ms_per_step_best"])
        verdict = (
            f"On this run ort-step (edge) took {got:.3f} ms against torch's {torch_ms:.3f} ms: "
            + (
                "the 2x target is met."
                if got * 2 <= torch_ms
                else f"2x needs {torch_ms / 2:.3f} ms, so the target is missed by "
                f"{(got / (torch_ms / 2) - 1) * 100:.0f}%."
            )
        )
    body = f"""{SECTION}

`./dev bench bench_step` (about 3 min; the first run adds the TFLite exports, which are
cached in `.cache/bench-bundles`; writes `benchmarks/results/bench_step.json` and
`bench_step.png`). One SGD step (lr {LR}, cross-entropy, batch {BATCH}) on the same bundle and
the same batch; every backend in a fresh process with one thread; ms/step is the median of
{BLOCKS} timed blocks after {WARMUP} warm-up steps, and ratios compare the best blocks
(other processes on the shared machine only ever add time); peak RSS is the process's `VmHWM`
(imports included: onnxruntime-training imports torch, so every ORT row of the dev env
carries torch; the edge row is what a device pays). torch eager is `torch.optim.SGD` with
`loss.backward()` on the same model.

{table(results)}

The portable step on plain ONNX Runtime (`ort-step`, edge env) runs at
**{speedup(wide, "ort-step", "edge")}** torch eager's speed on the 784-128-10 MLP and
**{speedup(digits, "ort-step", "edge")}** on the demo model
(target of issue 2: at least 2x on small models); on ai-edge-litert (`litert-step`)
{speedup(wide, "litert-step")} and {speedup(digits, "litert-step")}. Every backend's
parameters after N steps equal torch's within 1e-5 relative (`tests/edge_sdk/trainers/`).

How ort-step got here. The step graph used to take the parameters as one flat vector, split
it, concatenate the gradients, add the FedProx term `mu * (params - anchor)` even at `mu = 0`
and write a new flat vector: five to seven passes over the 101,770 parameters, which left
ort-step at 1.3x torch eager on the 784-128-10 MLP. Now (see `edge_sdk/bundle.py`): the step
graphs take and return every parameter as its own tensor, and the trainer binds views of two
flat buffers with ORT's IO binding and swaps them after each step, so nothing is split,
concatenated, allocated or copied; FedAvg runs `step.onnx`, which has no FedProx inputs
(`step_prox.onnx` runs when a proximal term is set); with plain SGD the learning rate scales
the gradient's seed in the backward pass, so the update is `p + (-lr * dL/dp)`, which ORT fuses
into the weight-gradient GEMM (`Gemm` with `C = p`); cross-entropy is traced as the mean of
`-log_softmax[y]` without `F.cross_entropy`'s ignore-index masks (48 -> 39 ops after ORT's
optimizer). Measured one change at a time on the 784-128-10 step, bare session runs (ORT 1.31,
best of 5-7 blocks, this shared machine: +-5%): flat graph 0.41 ms; split graph with `run()`
0.28 ms; plus IO binding 0.25-0.26 ms; plus the folded learning rate 0.245-0.25 ms (the `Mul`
and `Sub` passes over the weights are gone, but the fused `Gemm` first copies `C`); plus the
simpler cross-entropy 0.225-0.24 ms.

What is left: the two 784x128 GEMMs at batch 32 (forward, weight gradient) take about 95 us
each in ORT (MLAS; a lone `Gemm` graph measures the same) and about 90 us each in torch, so
they are about 0.19 ms of both steps; ORT spends about 0.04 ms on the other 37 ops, torch about
0.35 ms on autograd and `optimizer.step`. The trainer adds the IO binding calls (about 20 us)
and its input checks (NaN/Inf in `x`, label range): those take about 12 us alone, but any numpy
work on the batch just before the run makes the run itself 10-30 us slower (measured with
`np.isfinite(x)` and `x.sum()`; cause not found). That is why the 784-128-10 ratio sits near
2x while the GEMM-light demo model is far above it. {verdict}
"""
    write_section(SECTION, body)


def write_section(section: str, body: str) -> None:
    """Replace (or append) ``section`` of docs/benchmarks.md with ``body``, which starts with
    the section's own heading; the other sections stay as they are."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    start = text.find(section + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        nxt = text.find("\n## ", start + len(section))
        rest = text[nxt + 1 :] if nxt >= 0 else ""
        text = text[:start] + body + ("\n" + rest if rest else "")
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", choices=BACKENDS)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--steps", type=int, default=300, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per backend")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # run as a script: the repo's packages and tests helpers
    if args.worker:
        print(json.dumps(worker(args.worker, args.bundle, args.steps)))
        return
    results = run_all(args.steps, args.rounds)
    print()
    print(table(results))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_step.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "bench_step.png")
    update_doc(results)
    print(f"\nwrote {RESULTS / 'bench_step.json'}, bench_step.png and {DOC} ({SECTION})")


if __name__ == "__main__":
    main()
