"""An edge-only install (``pip install -e .[edge]`` in a fresh venv: numpy + plain onnxruntime)
runs a full round as a device against a coordinator running from the dev environment."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from coordinator.embedded import EmbeddedCoordinator
from fedge.edge_venv import ensure_edge_venv

pytestmark = pytest.mark.slow

HEAVY = ("torch", "aiohttp", "sqlite_utils", "coordinator", "sklearn")

PROBE = """
import importlib.metadata as md, importlib.util, json
def dist(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
try:
    import coordinator.app  # the sources ship in the same distribution, its dependencies not
    coordinator_usable = True
except ModuleNotFoundError:
    coordinator_usable = False
print(json.dumps({
    "coordinator_usable": coordinator_usable,
    "importable": {m: importlib.util.find_spec(m) is not None
                   for m in ("torch", "aiohttp", "sqlite_utils", "sklearn", "onnxruntime")},
    "dists": {d: dist(d) for d in ("onnxruntime", "onnxruntime-training", "torch", "aiohttp")},
}))
"""

DEVICE = f"""
import json, sys
from fedge.cli import main
code = main(sys.argv[1:])
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
print(json.dumps({{"code": code, "heavy": heavy}}))
"""


@pytest.fixture(scope="module")
def edge_python() -> Path:
    return ensure_edge_venv("edge")


def test_edge_env_holds_plain_onnxruntime_and_nothing_heavy(edge_python: Path) -> None:
    out = subprocess.run([str(edge_python), "-c", PROBE], capture_output=True, text=True,
                         check=True)
    probe = json.loads(out.stdout)
    assert probe["coordinator_usable"] is False
    assert probe["importable"] == {"torch": False, "aiohttp": False, "sqlite_utils": False,
                                   "sklearn": False, "onnxruntime": True}
    assert probe["dists"]["onnxruntime"] is not None
    assert probe["dists"]["onnxruntime-training"] is None and probe["dists"]["torch"] is None


def test_edge_only_device_runs_a_full_round(
    edge_python: Path, coordinator: EmbeddedCoordinator, digits_bundle: Path, tmp_path: Path
) -> None:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    data = tmp_path / "local.npz"
    np.savez(data, x=(x[:400] / 16.0).astype(np.float32), y=y[:400].astype(np.int64))
    admin = coordinator.admin()
    bundle_id = admin.upload_bundle(digits_bundle)["bundle_id"]
    task = admin.create_task(bundle_id, plan={"rounds": 1, "goal": 1, "selection_window_s": 0,
                                              "codec": {"name": "int8"}})
    out = subprocess.run(
        [str(edge_python), "-c", DEVICE, "device", "run", "--coordinator", coordinator.url,
         "--state-dir", str(tmp_path / "state"), "--data", str(data), "--backend", "ort-step",
         "--conditions", "always", "--once", "--json",
         "--enrollment-token", coordinator.enrollment_token],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    outcome_line, summary_line = out.stdout.strip().splitlines()
    outcome, summary = json.loads(outcome_line), json.loads(summary_line)
    assert summary == {"code": 0, "heavy": []}
    assert outcome["action"] == "trained", outcome
    assert outcome["metrics"]["num_examples"] == 400
    state = admin.task(task["task_id"])
    assert state["state"] == "completed" and state["model_version"] == 1
