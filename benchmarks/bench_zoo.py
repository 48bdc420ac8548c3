"""Train-step time and peak memory on the model zoo, per backend against torch eager, and
which backend accepts which layer family.

Models: every model of :mod:`model_export.zoo` plus the 784-128-10 MLP (``WideMLP``), each
exported once with its TFLite files (cached in ``.cache/bench-bundles``); models with dropout
are timed with it. Backends as in ``bench_step`` (whose worker this reuses): each in a fresh
process, one thread, batch 32, the median of 7 timed blocks after 100 warm-up steps, the
backends interleaved over rounds and each keeping its fastest. A backend the bundle's manifest
refuses is not timed; its recorded reason goes into the family x backend table.

Run: ``./dev bench bench_zoo`` (the first run exports 13 models with TFLite: tens of minutes on
a loaded 2-core machine; cached afterwards). ``--models a,b`` restricts the run, ``--rounds``
and ``--steps`` trade time for noise. Writes ``benchmarks/results/bench_zoo.json``,
``bench_zoo.png`` and the "## Model zoo" section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_step import BATCH, RUNS, _python, write_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SECTION = "## Model zoo"
STEP_SCRIPT = ROOT / "benchmarks" / "bench_step.py"
Z = "model_export.zoo:"
SGD: dict[str, Any] = {"optimizer": "sgd", "lr": 0.01}
# name -> (spec, export arguments)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp-784-128-10": ("model_export.models:WideMLP", {"input_shape": (1, 784), **SGD}),
    "batchnorm-mlp": (Z + "BatchNormMLP", {"input_shape": (1, 16), **SGD}),
    "depthwise-cnn": (Z + "DepthwiseCNN", {"input_shape": (1, 4, 8, 8), **SGD}),
    "pooling-cnn": (Z + "PoolingCNN", {"input_shape": (1, 1, 9, 9), **SGD}),
    "conv-layernorm-gelu": (Z + "ConvNormGELU", {"input_shape": (1, 1, 6, 6), **SGD}),
    "dropout-mlp": (Z + "DropoutMLP", {"input_shape": (1, 64), **SGD}),
    "embedding-bag": (Z + "EmbeddingBag", {"input_shape": (1, 6), "input_dtype": "int64", **SGD}),
    "gru-tagger": (Z + "GRUTagger", {"input_shape": (1, 5, 6), **SGD}),
    "attention-pool": (Z + "AttentionPool", {"input_shape": (1, 5, 8), **SGD}),
    "mobilenet": (Z + "TinyMobileNet", {"input_shape": (1, 1, 8, 8), **SGD}),
    "keyword-spotter": (Z + "KeywordSpotter", {"input_shape": (1, 10, 32), **SGD}),
    "next-word-lstm": (
        Z + "NextWordLSTM",
        {"input_shape": (1, 6), "input_dtype": "int64", "optimizer": "adamw", "lr": 0.001},
    ),
    "transformer": (
        Z + "TinyTransformer",
        {"input_shape": (1, 8), "input_dtype": "int64", "optimizer": "adamw", "lr": 0.001},
    ),
}
BACKENDS = ("ort-step", "litert-step", "ort-training")


def _bundle(spec: str, args: dict[str, Any]) -> Path:
    from model_export.cache import cached_export

    return cached_export(
        spec, ROOT / ".cache" / "bench-bundles", **args, tflite=True, tflite_batch=BATCH
    )


def _support(bundle: Path) -> tuple[dict[str, Any], int]:
    from edge_sdk.bundle import load_manifest

    manifest = load_manifest(bundle)
    return dict(manifest.raw["backends"]), manifest.num_trainable


def _time(backend: str, env: str, python: str, bundle: Path, steps: int) -> dict[str, Any] | None:
    cmd = [python, str(STEP_SCRIPT), "--worker", backend, "--bundle", str(bundle)]
    run = subprocess.run(
        [*cmd, "--steps", str(steps)], capture_output=True, text=True, cwd=ROOT, check=False
    )
    if run.returncode != 0:
        print(f"[bench_zoo] {backend} ({env}) failed:\n{run.stderr[-1500:]}", file=sys.stderr)
        return None
    return {**json.loads(run.stdout.strip().splitlines()[-1]), "env": env}


def run_all(names: list[str], steps: int, rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {"batch": BATCH, "threads": 1, "models": {}}
    pythons = {env: _python(env) for env in sorted({env for _, env in RUNS})}
    for name in names:
        spec, args = MODELS[name]
        print(f"[bench_zoo] exporting {name} ({spec}; cached after the first run)", flush=True)
        bundle = _bundle(spec, args)
        support, params = _support(bundle)
        best: dict[tuple[str, str], dict[str, Any]] = {}
        for round_ in range(rounds):
            for backend, env in RUNS:
                python = pythons[env]
                accepted = backend == "torch-eager" or support[backend]["supported"]
                if python is None or not accepted:
                    continue
                row = _time(backend, env, python, bundle, steps)
                if row is None:
                    continue
                print(
                    f"[bench_zoo] {name:20} round {round_ + 1}/{rounds} {backend:13} {env:5} "
                    f"{row['ms_per_step']:.3f} ms/step {row['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
                old = best.get((backend, env))
                if old is None or row["ms_per_step_best"] < old["ms_per_step_best"]:
                    best[(backend, env)] = row
        rows = list(best.values())
        torch_ms = next(r["ms_per_step_best"] for r in rows if r["backend"] == "torch-eager")
        for r in rows:
            r["speedup_vs_torch"] = torch_ms / r["ms_per_step_best"]
        results["models"][name] = {"parameters": params, "support": support, "rows": rows}
    return results


# -- where the portable step's time goes (784-128-10 MLP) ---------------------------------------

# ORT session settings tried on the step (SessionOptions attributes, or config entries "cfg:")
SESSION_VARIANTS: dict[str, dict[str, Any]] = {
    "shipped (ORT_ENABLE_ALL)": {},
    "ORT_ENABLE_BASIC": {"graph_optimization_level": "ORT_ENABLE_BASIC"},
    "ORT_ENABLE_EXTENDED": {"graph_optimization_level": "ORT_ENABLE_EXTENDED"},
    "no thread spinning": {"cfg:session.intra_op.allow_spinning": "0"},
    "no memory pattern / arena": {"enable_mem_pattern": False, "enable_cpu_mem_arena": False},
    "denormals as zero": {"cfg:session.set_denormal_as_zero": "1"},
}


def _best_ms(fn: Any, steps: int, blocks: int = 7, warmup: int = 100) -> float:
    import time

    for _ in range(warmup):
        fn()
    out = []
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        out.append((time.perf_counter() - t) / steps * 1e3)
    return min(out)


def investigate_worker(bundle: Path, steps: int) -> dict[str, Any]:
    """One process: the step under each session variant, without the trainer's input checks,
    torch eager, and ORT's own profile of the shipped step by op type."""
    import tempfile

    import onnxruntime as ort

    from benchmarks.bench_step import _torch_stepper, example_batch
    from edge_sdk.bundle import verify_bundle
    from edge_sdk.trainers.ort_step import OrtStepTrainer

    manifest = verify_bundle(bundle)
    x, y = example_batch(bundle, BATCH)
    real = ort.SessionOptions
    rows: dict[str, float] = {}
    for name, cfg in SESSION_VARIANTS.items():

        def options(cfg: dict[str, Any] = cfg) -> Any:
            o = real()
            for key, value in cfg.items():
                if key.startswith("cfg:"):
                    o.add_session_config_entry(key[4:], value)
                elif key == "graph_optimization_level":
                    o.graph_optimization_level = getattr(ort.GraphOptimizationLevel, value)
                else:
                    setattr(o, key, value)
            return o

        ort.SessionOptions = options  # the trainer makes its options through this name
        try:
            trainer = OrtStepTrainer(bundle, manifest)
        finally:
            ort.SessionOptions = real
        rows[name] = _best_ms(lambda t=trainer: t.train_step(x, y), steps)
    trainer = OrtStepTrainer(bundle, manifest)
    rows["no input checks (_train_on)"] = _best_ms(
        lambda: trainer._train_on(x, y, trainer._lr_array), steps
    )
    step, convert = _torch_stepper(bundle)
    tx, ty = convert(x), convert(y)
    rows["torch eager"] = _best_ms(lambda: step(tx, ty), steps)

    o = real()
    o.intra_op_num_threads = 1
    o.enable_profiling = True
    o.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "step")
    sess = ort.InferenceSession(str(bundle / "step.onnx"), o, providers=["CPUExecutionProvider"])
    trainer = OrtStepTrainer(bundle, manifest)
    views = trainer._views(trainer._params, trainer._state)
    feeds = dict(zip([i.name for i in sess.get_inputs()], views, strict=False))
    feeds.update({"x": x, "y": y, "lr": trainer._lr_array})
    runs = 300
    for _ in range(runs):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / runs / 1e3
    return {"variants_ms": rows, "kernel_ms_by_op": by_op}


def investigate(steps: int) -> dict[str, Any]:
    spec, args = MODELS["mlp-784-128-10"]
    bundle = _bundle(spec, args)
    cmd = [sys.executable, __file__, "--investigate-worker", str(bundle), "--steps", str(steps)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    result: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


def investigation_table(found: dict[str, Any]) -> str:
    lines = ["| 784-128-10 step, batch 32, 1 thread | best ms/step |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in found["variants_ms"].items()]
    total = sum(found["kernel_ms_by_op"].values())
    lines += ["", f"ORT's profile of the shipped step: {total:.3f} ms of kernels per step;", ""]
    lines += ["| op type | ms/step | share |", "|---|---:|---:|"]
    for op, ms in sorted(found["kernel_ms_by_op"].items(), key=lambda kv: -kv[1])[:8]:
        lines.append(f"| {op} | {ms:.3f} | {ms / total:.0%} |")
    return "\n".join(lines)


def timing_table(results: dict[str, Any]) -> str:
    lines = [
        "| model | parameters | backend | env | ms/step (median) | best | vs torch eager "
        "| peak RSS MB |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for name, entry in results["models"].items():
        for r in entry["rows"]:
            lines.append(
                f"| {name} | {entry['parameters']:,} | {r['backend']} | {r['env']} | "
                f"{r['ms_per_step']:.3f} | {r['ms_per_step_best']:.3f} | "
                f"{r['speedup_vs_torch']:.2f}x | {r['peak_rss_mb']:.0f} |"
            )
    return "\n".join(lines)


def support_table(results: dict[str, Any]) -> str:
    lines = ["| model | " + " | ".join(BACKENDS) + " |", "|---|" + "---|" * len(BACKENDS)]
    for name, entry in results["models"].items():
        cells = []
        for backend in BACKENDS:
            s = entry["support"][backend]
            reason = str(s["reason"] or "").replace("|", "/").replace("\n", " ")
            cells.append("works" if s["supported"] else f"no: {reason[:160]}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(RUNS)
    for i, run in enumerate(RUNS):
        values = [
            next(
                (
                    r["speedup_vs_torch"]
                    for r in results["models"][n]["rows"]
                    if (r["backend"], r["env"]) == run
                ),
                0.0,
            )
            for n in names
        ]
        ax.bar(
            [j + i * width for j in range(len(names))], values, width, label=f"{run[0]} ({run[1]})"
        )
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel("speed vs torch eager (x)")
    ax.set_title(f"train step, batch {BATCH}, 1 thread (0: backend refused the model)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def update_doc(results: dict[str, Any], body_extra: str) -> None:
    body = f"""{SECTION}

`./dev bench bench_zoo` (writes `benchmarks/results/bench_zoo.json` and `bench_zoo.png`): every
model of `model_export/zoo.py` and the 784-128-10 MLP, one training step at batch {BATCH} with
one thread, measured as in "Train step" (same worker; torch eager is `loss.backward()` and the
bundle's `torch.optim` optimizer on the same model; models with dropout run it). A backend the
manifest refuses is not timed.

{timing_table(results)}

Which backend accepts which family (the manifest's recorded reason otherwise):

{support_table(results)}
{body_extra}"""
    write_section(SECTION, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names")
    parser.add_argument("--steps", type=int, default=100, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs per backend")
    parser.add_argument("--notes", type=Path, help="markdown appended to the doc section")
    parser.add_argument(
        "--merge", action="store_true", help="keep the previous results of models not run"
    )
    parser.add_argument(
        "--investigate", action="store_true", help="also profile the 784-128-10 MLP's step"
    )
    parser.add_argument("--investigate-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.investigate_worker:
        print(json.dumps(investigate_worker(args.investigate_worker, args.steps)))
        return
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown} (choose from {', '.join(MODELS)})")
    results = run_all(names, args.steps, args.rounds)
    previous = RESULTS / "bench_zoo.json"
    if args.merge and previous.exists():
        # re-measured models replace their rows; the others keep the previous run's
        old = json.loads(previous.read_text())
        merged = {**old["models"], **results["models"]}
        results["models"] = {n: merged[n] for n in MODELS if n in merged}
        if "investigation" in old and not args.investigate:
            results["investigation"] = old["investigation"]
    print()
    print(timing_table(results))
    print()
    print(support_table(results))
    extra = args.notes.read_text() if args.notes else ""
    if args.investigate:
        results["investigation"] = investigate(args.steps)
    if "investigation" in results:
        found = investigation_table(results["investigation"])
        print()
        print(found)
        extra = f"\n### Where the 784-128-10 step's time goes\n\n{found}\n\n{extra}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_zoo.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "bench_zoo.png")
    update_doc(results, extra)
    print(f"\nwrote {RESULTS / 'bench_zoo.json'}, bench_zoo.png and docs/benchmarks.md ({SECTION})")


if __name__ == "__main__":
    main()
