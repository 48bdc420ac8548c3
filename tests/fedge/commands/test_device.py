"""``fedge device run`` as a real device against a real coordinator on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coordinator.embedded import EmbeddedCoordinator
from fedge.cli import main


def _npz(path: Path, n: int = 200) -> Path:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    np.savez(path, x=(x[:n] / 16.0).astype(np.float32), y=y[:n].astype(np.int64))
    return path


def test_device_run_once_trains_a_round(
    coordinator: EmbeddedCoordinator, digits_bundle: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    admin = coordinator.admin()
    bundle_id = admin.upload_bundle(digits_bundle)["bundle_id"]
    task = admin.create_task(bundle_id, plan={"rounds": 1, "goal": 1, "selection_window_s": 0})
    code = main(["device", "run", "--coordinator", coordinator.url,
                 "--enrollment-token", str(coordinator.enrollment_token),
                 "--state-dir", str(tmp_path / "state"), "--data", str(_npz(tmp_path / "d.npz")),
                 "--conditions", "always", "--once", "--json", "--seed", "1"])
    assert code == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    outcome = json.loads(line)
    assert outcome["action"] == "trained" and outcome["task_id"] == task["task_id"]
    assert outcome["metrics"]["num_examples"] == 200
    assert admin.task(task["task_id"])["rounds_completed"] == 1
    assert (tmp_path / "state" / "credentials.json").is_file()


def test_device_run_reports_unreadable_data_as_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["device", "run", "--coordinator", "http://127.0.0.1:9", "--state-dir",
                 str(tmp_path), "--data", str(tmp_path / "missing.npz"), "--once"])
    assert code == 2
    assert "cannot read data" in capsys.readouterr().err


def test_device_run_refuses_a_bad_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["device", "run", "--coordinator", "http://127.0.0.1:9", "--state-dir",
                 str(tmp_path), "--data", str(_npz(tmp_path / "d.npz", 10)), "--once",
                 "--policy", '{"require_sunshine": true}'])
    assert code == 2
    assert "require_sunshine" in capsys.readouterr().err


def test_device_run_refuses_an_unknown_backend(
    coordinator: EmbeddedCoordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, "--backend ort" registered the device with a runtime no task asks for: told
    to wait (ineligible) on every pass, for as long as it ran."""
    code = main(["device", "run", "--coordinator", coordinator.url,
                 "--enrollment-token", str(coordinator.enrollment_token),
                 "--state-dir", str(tmp_path / "state"),
                 "--data", str(_npz(tmp_path / "d.npz", 10)),
                 "--conditions", "always", "--once", "--backend", "ort"])
    assert code == 2
    assert "backend must be one of ort-step, litert-step, ort-training, not 'ort'" in (
        capsys.readouterr().err)
    assert coordinator.admin().status()["devices_registered"] == 0


def test_sigterm_ends_a_wait_at_once(coordinator: EmbeddedCoordinator, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "fedge.cli", "device", "run", "--coordinator", coordinator.url,
         "--enrollment-token", str(coordinator.enrollment_token),
         "--state-dir", str(tmp_path / "state"), "--data", str(_npz(tmp_path / "d.npz", 10)),
         "--conditions", "always", "--json"],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())  # no task: told to come back in about a minute
    assert first["action"] == "wait" and first["next_run_in_s"] > 10
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 5
