"""The Kotlin Android library on a JVM against the Python SDK: train-step time on the demo model,
the library jar's size, and what an app pulls in with it.

* Step time: the Kotlin ``OrtStepTrainer`` (ONNX Runtime's Java API, desktop jar) and the Python
  ``ort-step`` trainer on the same bundle (``DigitsMLP`` 64-32-10, SGD, cross-entropy), batch
  32, one intra-op thread each; after warm-up (JIT included on the JVM), blocks of steps are
  timed; ms/step is the median block and the ratio compares the best blocks (other processes
  on a shared machine only ever add time). Each side runs in its own process.
* Jar size: ``android_bridge/target/fedge-android-*.jar`` as ``mvn package`` builds it.
* Dependencies: the Maven runtime classpath of the library (what an app's build adds, the
  Kotlin standard library); ONNX Runtime is ``provided`` (the app picks onnxruntime-android) and
  the Android framework (org.json included) is the phone's.

Run: ``./dev bench bench_android`` (about 2 min). Writes ``benchmarks/results/bench_android.json``,
``bench_android.png`` and the "## Android bridge" section of ``docs/benchmarks.md``.
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
SECTION = "## Android bridge"
PROJECT = ROOT / "android_bridge"
BATCH = 32
ROUNDS = 5  # interleaved runs of each side


def python_steps(bundle: Path, steps: int, warmup: int, repeats: int) -> list[float]:
    """Seconds per step of the Python ort-step trainer, one value per timed block."""
    import numpy as np

    from edge_sdk.trainers import load_trainer

    trainer = load_trainer(bundle, "ort-step")
    rng = np.random.default_rng(0)
    batches = [
        (rng.normal(size=(BATCH, 64)).astype(np.float32), rng.integers(0, 10, BATCH))
        for _ in range(16)
    ]
    for i in range(warmup):
        trainer.train_step(*batches[i % len(batches)])
    blocks = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            trainer.train_step(*batches[i % len(batches)])
        blocks.append((time.perf_counter() - t0) / steps)
    return blocks


def dependencies() -> dict[str, Any]:
    """The library's runtime classpath (what an app pulls) and its dependency tree."""
    from tests.android_bridge.jvm import mvn

    listing = PROJECT / "target" / "runtime.classpath"
    mvn("dependency:build-classpath", "-DincludeScope=runtime", f"-Dmdep.outputFile={listing}")
    runtime = [Path(p) for p in listing.read_text().strip().split(":") if p]
    tree_file = PROJECT / "target" / "dependency-tree.txt"
    mvn("dependency:tree", f"-DoutputFile={tree_file}")
    return {
        "runtime": [{"jar": p.name, "bytes": p.stat().st_size} for p in runtime],
        "runtime_bytes": sum(p.stat().st_size for p in runtime),
        # what an app sees: the test-scoped tooling (Robolectric, JUnit) left out
        "tree": [x for x in tree_file.read_text().strip().splitlines() if ":test" not in x],
    }


def run_all(steps: int, repeats: int, warmup: int) -> dict[str, Any]:
    from fedge.bundle_cache import digits_bundle
    from tests.android_bridge.jvm import build_tools, mvn

    bundle = digits_bundle()
    tools = build_tools()
    mvn("package", "-DskipTests")
    jar = next((PROJECT / "target").glob("fedge-android-*.jar"))
    kotlin_best: list[float] = []
    python_best: list[float] = []
    kotlin_all: list[float] = []
    python_all: list[float] = []
    for _ in range(ROUNDS):  # interleaved, so that a busy spell of the machine hits both sides
        out = tools.run(
            "bench", "--bundle", str(bundle), "--steps", str(steps), "--warmup", str(warmup),
            "--repeats", str(repeats), "--batch", str(BATCH),
        )  # fmt: skip
        k = json.loads(out.strip().splitlines()[-1])["step_s"]
        py = subprocess.run(
            [sys.executable, __file__, "--python-worker", str(bundle), "--steps", str(steps),
             "--repeats", str(repeats), "--warmup", str(warmup)],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        p = json.loads(py.stdout.strip().splitlines()[-1])
        kotlin_all += k
        python_all += p
        kotlin_best.append(min(k))
        python_best.append(min(p))
    import onnxruntime

    return {
        "model": "DigitsMLP 64-32-10, SGD, cross-entropy",
        "batch": BATCH,
        "steps_per_block": steps,
        "kotlin": {
            "runtime": "onnxruntime (Java) 1.29.0",
            "ms_median": 1e3 * statistics.median(kotlin_all),
            "ms_best": 1e3 * min(kotlin_best),
        },
        "python": {
            "runtime": f"onnxruntime {onnxruntime.__version__}",
            "ms_median": 1e3 * statistics.median(python_all),
            "ms_best": 1e3 * min(python_best),
        },
        "kotlin_vs_python_best": min(python_best) / min(kotlin_best),
        "jar": {"name": jar.name, "bytes": jar.stat().st_size},
        "dependencies": dependencies(),
    }


def table(r: dict[str, Any]) -> str:
    lines = [
        "| trainer | runtime | ms/step (median) | best | speed vs Python ort-step (best) |",
        "|---|---|---:|---:|---:|",
        f"| Python ort-step | {r['python']['runtime']} | {r['python']['ms_median']:.3f} | "
        f"{r['python']['ms_best']:.3f} | 1.00x |",
        f"| Kotlin OrtStepTrainer | {r['kotlin']['runtime']} | {r['kotlin']['ms_median']:.3f} | "
        f"{r['kotlin']['ms_best']:.3f} | {r['kotlin_vs_python_best']:.2f}x |",
    ]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    names = ["Python ort-step", "Kotlin (JVM)"]
    a.bar(names, [r["python"]["ms_best"], r["kotlin"]["ms_best"]], color=["#4c72b0", "#dd8452"])
    a.set_ylabel("ms per step (best block)")
    a.set_title(f"train step, {r['model'].split(',')[0]}, batch {r['batch']}")
    deps = r["dependencies"]["runtime"]
    b.barh([r["jar"]["name"], *[d["jar"] for d in deps]],
           [r["jar"]["bytes"] / 1024, *[d["bytes"] / 1024 for d in deps]])  # fmt: skip
    b.set_xlabel("KiB")
    b.set_title("library jar and what an app pulls")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def update_doc(r: dict[str, Any]) -> None:
    deps = r["dependencies"]
    listed = ", ".join(f"`{d['jar']}` ({d['bytes'] / 1024:.0f} KiB)" for d in deps["runtime"])
    tree = "\n".join(deps["tree"])
    body = f"""{SECTION}

`./dev bench bench_android` (about 2 min; writes `benchmarks/results/bench_android.json` and
`bench_android.png`). The Kotlin library's trainer (`android_bridge/`, ONNX Runtime's Java API,
the same calls as `onnxruntime-android`, here on a JVM with the desktop jar) against the Python
SDK's `ort-step` trainer, each in its own process with one thread, on the demo model's bundle
({r['model']}, batch {r['batch']}); ms/step is the median of the timed blocks of
{r['steps_per_block']} steps after warm-up, the ratio compares the best blocks (the sides
run interleaved {ROUNDS} times; the machine is shared, so medians carry other processes' load
and only the best blocks compare the trainers). The two use different ONNX Runtime builds: the
Python environment's `onnxruntime-training` and the Java jar the library is built against.

{table(r)}

Both run the same `step.onnx` with the parameters and optimizer state held in two buffers that
swap after each step: Python binds numpy views through IO binding, Kotlin passes zero-copy
tensors over direct buffers and pins the outputs to the other copy, so neither copies the
parameters per step (`tests/android_bridge/test_parity.py` checks that both end with the same
parameters).

The library jar `{r['jar']['name']}` is {r['jar']['bytes'] / 1024:.0f} KiB. An app that adds it
pulls {len(deps['runtime'])} more jar(s) at run time: {listed}, {deps['runtime_bytes'] / 1024:.0f}
KiB in all (an app written in Kotlin has them already; R8 shrinks both). ONNX
Runtime is `provided`: the app adds `com.microsoft.onnxruntime:onnxruntime-android`; the Android
framework, `org.json` included, is the phone's. `mvn dependency:tree` of the library (test
scope left out):

```
{tree}
```
"""
    from benchmarks.bench_step import write_section

    write_section(SECTION, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--python-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=500, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks per run")
    parser.add_argument("--warmup", type=int, default=300)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # run as a script: the repo's packages and tests helpers
    if args.python_worker:
        print(json.dumps(python_steps(args.python_worker, args.steps, args.warmup, args.repeats)))
        return
    results = run_all(args.steps, args.repeats, args.warmup)
    print()
    print(table(results))
    print(f"jar {results['jar']['name']}: {results['jar']['bytes']} B; runtime dependencies: "
          f"{[d['jar'] for d in results['dependencies']['runtime']]}")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_android.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "bench_android.png")
    update_doc(results)
    print(f"\nwrote {RESULTS / 'bench_android.json'}, bench_android.png and {DOC} ({SECTION})")


if __name__ == "__main__":
    main()
