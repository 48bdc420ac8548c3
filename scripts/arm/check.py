"""``./dev arm``: the edge SDK training on aarch64, emulated on this x86 machine.

1. builds (or reuses) the aarch64 environment (:mod:`aarch64_env`): qemu-user, Debian arm64
   CPython 3.11, ``fedge[edge]`` and ``fedge[litert]`` each installed alone from aarch64 wheels;
2. exports the demo bundle (DigitsMLP, SGD, with TFLite graphs) natively, cached;
3. trains N steps on fixed digits batches with ``ort-step`` (site ``fedge[edge]``) and with
   ``litert-step`` (site ``fedge[litert]``) under emulation, and the same steps natively on x86
   with the same script (``device.py``) in the x86 edge-only venv of the same extra (same
   runtime releases); compares the parameters (max abs diff <= 1e-5);
4. runs a coordinator natively on 127.0.0.1, creates a one-round task (goal 1) and runs
   ``fedge device run --once`` on the aarch64 python against it over loopback HTTP;
5. measures (emulated figures, labelled so): install size of each extra, peak RSS, step time
   emulated vs native.

Prints progress to stderr and, as its LAST stdout line, one JSON object, also written to
``benchmarks/results/arm.json`` (with a plot, ``arm.png``). Exit status 1 if a check fails.
Runs natively in the project's ``.venv`` (it needs the exporter and the coordinator).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aarch64_env as arm  # a sibling script, not a package

sys.path.insert(0, str(arm.REPO))
DEVICE = Path(__file__).with_name("device.py")
RESULTS = arm.REPO / "benchmarks" / "results"
TOLERANCE = 1e-5
# Which extra holds which backend's runtime: each backend runs with its extra alone installed.
BACKEND_EXTRA = {"ort-step": "edge", "litert-step": "litert"}
log = arm.log


def demo_bundle() -> Path:
    """The demo model's bundle with TFLite graphs, exported natively and cached."""
    from fedge.bundle_cache import digits_bundle

    log("bundle: exporting DigitsMLP with TFLite graphs (cached after the first run)")
    return digits_bundle(tflite=True)


def native_python(extra: str) -> str:
    """The x86 reference: the edge-only venv ``pip install -e .[extra]`` that the edge tests
    and benchmarks use, so both sides run the same runtime release and no torch is loaded."""
    from fedge.edge_venv import ensure_edge_venv

    return str(ensure_edge_venv(extra))


def write_data(path: Path, examples: int) -> None:
    from fedge.fleet import load_digits

    train, _ = load_digits(seed=0)
    np.savez(path, x=train.x[:examples], y=train.y[:examples])


def _last_json(out: str) -> dict[str, Any]:
    return dict(json.loads(out.strip().splitlines()[-1]))


class BackendFailed(Exception):
    """A backend's steps did not run (crash, import error): recorded, not fatal to the run."""


def _tail(stderr: str, lines: int = 4) -> str:
    return " | ".join(line.strip() for line in stderr.strip().splitlines()[-lines:])


def run_steps(env: arm.Env, backend: str, bundle: Path, data: Path, work: Path, steps: int,
              batch: int) -> dict[str, Any]:
    """The same device script on aarch64 (emulated) and natively; returns both reports."""
    reports: dict[str, Any] = {}
    for where in ("aarch64", "x86_64"):
        out = work / f"{backend}-{where}.npy"
        cmd = [str(DEVICE), str(bundle), str(data), str(out), "--backend", backend,
               "--steps", str(steps), "--batch", str(batch)]
        log(f"{backend}: {steps} steps on {where}{' (emulated)' if where == 'aarch64' else ''}")
        if where == "aarch64":
            done = env.run(BACKEND_EXTRA[backend], cmd)
        else:
            done = subprocess.run([native_python(BACKEND_EXTRA[backend]), *cmd], text=True,
                                  capture_output=True)
        if done.returncode != 0:
            raise BackendFailed(f"{backend} on {where} exited with {done.returncode}: "
                                f"{_tail(done.stderr)}")
        reports[where] = {**_last_json(done.stdout), "params": np.load(out)}
    return reports


def compare(reports: dict[str, Any], initial: np.ndarray) -> dict[str, Any]:
    a, x = reports["aarch64"]["params"], reports["x86_64"]["params"]
    return {
        "max_abs_diff": float(np.max(np.abs(a - x))),
        # How far training moved the parameters: parity means little if the steps did nothing.
        "param_change": float(np.max(np.abs(a - initial))),
        "finite": bool(np.isfinite(a).all()),
    }


def run_round(env: arm.Env, bundle: Path, data: Path, work: Path, attempts: int) -> dict[str, Any]:
    """One federated round: coordinator natively on loopback, the device on aarch64."""
    from coordinator.embedded import EmbeddedCoordinator

    with EmbeddedCoordinator(work / "fedge.db") as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(bundle)["bundle_id"]
        plan = {"rounds": 1, "goal": 1, "over_selection": 1.0, "selection_window_s": 1.0,
                "steps": 5, "batch_size": 32}
        task_id = admin.create_task(bundle_id, plan, name="arm-emulated")["task_id"]
        log(f"round: coordinator at {coord.url}, task {task_id} (1 round, goal 1)")
        cmd = ["-m", "fedge.cli", "device", "run", "--coordinator", coord.url,
               "--enrollment-token", str(coord.enrollment_token),
               "--state-dir", str(work / "device"), "--data", str(data),
               "--conditions", "always", "--backend", "ort-step", "--once", "--json",
               "--seed", "0"]
        outcomes: list[dict[str, Any]] = []
        for _ in range(attempts):
            t0 = time.perf_counter()
            done = env.run("edge", cmd)
            if done.returncode != 0:
                outcomes.append({"action": "crashed", "error": _tail(done.stderr)})
                log(f"round: fedge device run on aarch64 FAILED: {outcomes[-1]['error']}")
                break
            outcome = _last_json(done.stdout)
            outcomes.append(outcome)
            log(f"round: aarch64 device -> {outcome['action']} "
                f"({time.perf_counter() - t0:.1f} s, emulated)")
            if outcome["action"] not in ("wait", "failed"):
                break
            time.sleep(min(float(outcome.get("next_run_in_s") or 1.0), 2.0))
        trained = bool(outcomes) and outcomes[-1]["action"] == "trained"
        deadline = time.monotonic() + 30  # the commit follows the report asynchronously
        task = admin.task(task_id)
        while trained and task["rounds_completed"] < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
            task = admin.task(task_id)
        rounds = admin.rounds(task_id)
        admin.close()
    last = outcomes[-1] if outcomes else {}
    return {
        "device_outcome": last.get("action"),
        "device_metrics": last.get("metrics", {}),
        "device_error": last.get("error"),
        "task_state": task["state"],
        "model_version": task["model_version"],
        "rounds_completed": task["rounds_completed"],
        "round_metrics": rounds[0]["metrics"] if rounds else None,
        "round_completed": (trained and task["rounds_completed"] == 1
                            and task["model_version"] == 1),
    }


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def sizes(env: arm.Env) -> dict[str, Any]:
    mb = 1 << 20
    out: dict[str, Any] = {
        f"install_mb_{extra}": round(dir_bytes(site) / mb, 1) for extra, site in env.sites.items()
    }
    out["install_mb_edge_sdk"] = round(dir_bytes(env.sites["edge"] / "edge_sdk") / mb, 2)
    out["rootfs_mb"] = round(dir_bytes(env.root) / mb, 1)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Step time and peak RSS per backend, native x86 next to emulated aarch64; a backend
    that did not run on aarch64 is shown as such instead of being left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(result["backends"])
    xs = np.arange(len(backends))
    panels = (("step_ms", "ms per train step (median, log)", True),
              ("peak_rss_mb", "peak RSS, MB (VmHWM)", False))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (key, label, log_scale) in zip(axes, panels, strict=True):
        for offset, where, name in ((-0.2, "x86_64", "x86_64 native"),
                                    (0.2, "aarch64_emulated", "aarch64, qemu (emulated)")):
            values = [result[key].get(b, {}).get(where, np.nan) for b in backends]
            ax.bar(xs + offset, values, 0.4, label=name)
        for x, b in zip(xs, backends, strict=True):
            if "error" in result["backends"][b]:
                ax.annotate("crashed on\naarch64", (x, 0.5), xycoords=("data", "axes fraction"),
                            ha="center", va="center", fontsize=8, color="firebrick")
            elif key == "step_ms":
                ms = result[key][b]
                ax.annotate(f"{ms['ratio']:.0f}x", (x + 0.2, ms["aarch64_emulated"]),
                            ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, backends)
        ax.set_xlim(-0.7, len(backends) - 0.3)
        if log_scale:
            ax.set_yscale("log")
            ax.set_ylim(top=ax.get_ylim()[1] * 3)  # room for the ratio labels
        ax.set_ylabel(label)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.suptitle(f"Demo bundle (DigitsMLP, batch {result['batch']}): aarch64 under "
                 f"{result['emulator']} vs native x86_64", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="local steps per backend")
    parser.add_argument("--backend", action="append", choices=list(BACKEND_EXTRA),
                        help="check only this backend (repeatable; default: all)")
    parser.add_argument("--attempts", type=int, default=5, help="device check-ins for the round")
    parser.add_argument("--no-write", action="store_true",
                        help="do not write benchmarks/results/arm.json and arm.png")
    args = parser.parse_args(argv)

    env = arm.ensure_env()
    t0 = time.perf_counter()
    bundle = demo_bundle()
    export_s = round(time.perf_counter() - t0, 1)
    manifest = json.loads((bundle / "manifest.json").read_text())
    with tempfile.TemporaryDirectory(prefix="run-", dir=arm.CACHE) as tmp:
        result = measure(env, bundle, manifest, Path(tmp), args.steps, args.attempts,
                         args.backend or list(BACKEND_EXTRA))
    result["bundle_export_s"] = export_s  # about 0 when the export was cached
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "arm.json").write_text(json.dumps(result, indent=2) + "\n")
        plot(result, RESULTS / "arm.png")
        log(f"wrote {RESULTS / 'arm.json'} and arm.png")
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def measure(env: arm.Env, bundle: Path, manifest: dict[str, Any], work: Path, steps: int,
            attempts: int, backends: list[str]) -> dict[str, Any]:
    # The TFLite step has a fixed batch; full batches of it keep both backends unpadded.
    batch = int((manifest.get("tflite") or {}).get("batch", 32))
    initial = np.fromfile(bundle / manifest["initial_parameters"], dtype="<f4")
    data = work / "digits.npz"
    write_data(data, steps * batch)

    parity: dict[str, float | None] = {}
    details: dict[str, Any] = {}
    step_ms: dict[str, dict[str, float]] = {}
    rss: dict[str, dict[str, float]] = {}
    for backend in backends:
        try:
            reports = run_steps(env, backend, bundle, data, work, steps, batch)
        except BackendFailed as e:
            log(f"{backend}: FAILED: {e}")
            parity[backend] = None
            details[backend] = {"error": str(e)}
            continue
        cmp = compare(reports, initial)
        parity[backend] = cmp["max_abs_diff"]
        a, x = reports["aarch64"], reports["x86_64"]
        details[backend] = {**cmp, "runtime_aarch64": a["runtime_version"],
                            "runtime_x86_64": x["runtime_version"],
                            "loss_first": a["losses"][0], "loss_last": a["losses"][-1],
                            "heavy_importable_aarch64": a["heavy_importable"]}
        step_ms[backend] = {"aarch64_emulated": round(a["step_s_median"] * 1e3, 3),
                            "x86_64": round(x["step_s_median"] * 1e3, 3)}
        step_ms[backend]["ratio"] = round(step_ms[backend]["aarch64_emulated"]
                                          / step_ms[backend]["x86_64"], 1)
        rss[backend] = {"aarch64_emulated": round(a["peak_rss_mb"], 1),
                        "x86_64": round(x["peak_rss_mb"], 1)}
        log(f"{backend}: max |aarch64 - x86| = {parity[backend]:.2e}, "
            f"step {step_ms[backend]['aarch64_emulated']} ms emulated vs "
            f"{step_ms[backend]['x86_64']} ms native")
    probe = env.run("edge", ["-c", "import platform; print(platform.machine(), "
                                   "platform.python_version())"]).stdout.split()
    arch, python = probe if len(probe) == 2 else ("unknown", "unknown")
    round_result = run_round(env, bundle, data, work, attempts)
    log(f"round: completed = {round_result['round_completed']}")

    result: dict[str, Any] = {
        "arch": arch,
        "parity_max_abs_diff": parity,
        "parity_tolerance": TOLERANCE,
        "round_completed": round_result["round_completed"],
        "emulated": True,
        "emulator": "qemu-user " + arm.qemu_version(),
        "python_aarch64": python,
        "steps": steps,
        "batch": batch,
        "step_ms": step_ms,
        "peak_rss_mb": rss,
        **sizes(env),
        # pip on the aarch64 python picks the same distributions as the host's --platform pip.
        "aarch64_pip_resolves_same": {k: bool(v["same"]) for k, v in arm.pip_check().items()},
        "env_build_seconds": env.env_build_seconds,
        "env_build_layers_s": env.build_seconds,
        "env_rebuilt_now": list(env.rebuilt),
        "backends": details,
        "round": round_result,
        "bundle_id": manifest["bundle_id"],
    }
    ok = (arch == "aarch64" and result["round_completed"]
          and all(result["aarch64_pip_resolves_same"].values())
          and all(v is not None and v <= TOLERANCE for v in parity.values())
          and all(d["param_change"] > 100 * TOLERANCE and not d["heavy_importable_aarch64"]
                  for d in details.values() if "error" not in d))
    result["ok"] = ok
    return result


if __name__ == "__main__":
    sys.exit(main())
