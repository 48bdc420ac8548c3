"""``fedge status`` prints the coordinator's counters."""

from __future__ import annotations

import json

import numpy as np

from fedge.cli import main
from tests.fixtures.coordinator import DeviceHTTP


def test_status_json_counts_what_was_stored(coordinator, tiny_bundle, capsys) -> None:
    admin = coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    admin.create_task(bundle_id, {"goal": 2, "selection_window_s": 0.0, "rounds": 5})
    devices = [DeviceHTTP(coordinator) for _ in range(3)]
    answers = [d.check_in() for d in devices]
    answers[0] = devices[0].check_in()
    for d, a in zip(devices[:2], answers[:2], strict=True):
        assert d.upload(a["assignment"]["assignment_id"], np.full(64, 0.01))[0] == 200
    auth = ["--admin-token", coordinator.admin_token]
    assert main(["status", "--coordinator", coordinator.url, "--json", *auth]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["model_version"] == 1 and status["rounds_completed"] == 1
    assert status["updates_accepted"] == 2 and status["devices_registered"] == 3
    assert main(["status", "--coordinator", coordinator.url, *auth]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["devices registered         3", "updates accepted           2"]
    header, rule, row = out[3:6]
    assert header.split() == ["task", "id", "mode", "state", "version", "rounds"]
    assert set(rule.replace(" ", "")) == {"-"}
    task = status["tasks"][0]
    assert row.split() == [task["name"], task["task_id"], "sync", "running", "1", "1"]
    assert out[-1].startswith(f"dashboard: {coordinator.url}/dashboard ")


def test_status_needs_the_admin_token(coordinator, capsys, monkeypatch) -> None:
    monkeypatch.delenv("FEDGE_ADMIN_TOKEN", raising=False)
    assert main(["status", "--coordinator", coordinator.url]) == 2
    assert "admin token" in capsys.readouterr().err
    assert main(["status", "--coordinator", coordinator.url, "--admin-token", "wrong"]) == 2
    err = capsys.readouterr().err
    # It answered: a wrong token is not a coordinator out of reach (as status and watch said).
    assert "401 unauthorized" in err and "cannot reach" not in err, err


def test_unreachable(capsys) -> None:
    assert main(["status", "--coordinator", "http://127.0.0.1:9", "--admin-token", "t"]) == 2
    assert "cannot reach" in capsys.readouterr().err


def test_output_into_a_closed_pipe_ends_without_a_traceback(coordinator) -> None:
    """``fedge status | head -1`` (or ``fedge task list | head``): the reader leaves, the
    next print raised BrokenPipeError and the command died with a traceback on stderr (and
    another at the interpreter's flush of stdout on exit)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedge.cli", "status", "--coordinator", coordinator.url,
         "--admin-token", coordinator.admin_token],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before it prints anything: its imports take far longer
    err = proc.stderr.read()
    assert proc.wait(60) != 0
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
