"""``ort-step`` on plain onnxruntime 1.17 (the oldest release the SDK supports) in a venv that
has numpy and that runtime only: the bundle loads and trains exactly as in the dev env.

Slow: builds ``.cache/venv-ort117`` once (pip install onnxruntime==1.17.3).
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.trainers import load_trainer
from tests.edge_sdk.trainers.trainer_suite import batch

ROOT = Path(__file__).resolve().parents[3]
VENV = ROOT / ".cache" / "venv-ort117"
PINS = ["onnxruntime==1.17.3", "numpy<2"]

SCRIPT = """
import json, sys
import numpy as np
from edge_sdk.trainers import load_trainer
import onnxruntime
t = load_trainer(sys.argv[1], backend="ort-step")
for x, y in json.load(open(sys.argv[2])):
    t.train_step(np.asarray(x, np.float32), np.asarray(y))
json.dump({"ort": onnxruntime.__version__, "torch": "torch" in sys.modules,
           "params": t.get_parameters().tolist()}, sys.stdout)
"""


def _venv_python() -> Path:
    python = VENV / "bin" / "python"
    stamp = VENV / ".pins"
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / "venv-ort117.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (python.exists() and stamp.is_file() and stamp.read_text() == " ".join(PINS)):
            shutil.rmtree(VENV, ignore_errors=True)
            base = shutil.which("python3.11") or sys.executable
            subprocess.run([base, "-m", "venv", str(VENV)], check=True)
            subprocess.run(
                [
                    str(python),
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    *PINS,
                ],
                check=True,
            )
            stamp.write_text(" ".join(PINS))
    return python


@pytest.mark.slow
def test_ort_step_on_onnxruntime_1_17(digits_bundle: Path, tmp_path: Path) -> None:
    python = _venv_python()
    here = load_trainer(digits_bundle, backend="ort-step")
    batches = [batch(here.manifest, n, seed=i) for i, n in enumerate((1, 8, 5))]
    (tmp_path / "batches.json").write_text(
        json.dumps([[x.tolist(), y.tolist()] for x, y in batches])
    )
    for x, y in batches:
        here.train_step(x, y)
    # The venv has no fedge install: the SDK comes from the source tree, as on a device.
    run = subprocess.run(
        [str(python), "-c", SCRIPT, str(digits_bundle), str(tmp_path / "batches.json")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["ort"] == "1.17.3" and out["torch"] is False
    np.testing.assert_allclose(
        np.asarray(out["params"], np.float32), here.get_parameters(), rtol=1e-6, atol=1e-7
    )
