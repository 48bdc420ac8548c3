"""``fedge fleet`` against a real coordinator on loopback, and its argument errors."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.embedded import EmbeddedCoordinator
from fedge.cli import main
from tests.fixtures.requirements import unavailable


@pytest.mark.parametrize("where", [
    pytest.param([], id="one-process"),
    # Two parts as tasks on a private local Ray (fedge.fleet.ray_engine).
    pytest.param(["--processes", "2", "--engine", "ray"], id="ray", marks=pytest.mark.slow),
])
def test_fleet_runs_until_the_rounds_and_prints_a_json_summary(
    coordinator: EmbeddedCoordinator, digits_bundle: Path, capsys: pytest.CaptureFixture[str],
    where: list[str],
) -> None:
    if where and importlib.util.find_spec("ray") is None:
        unavailable("Ray is not installed (the cluster extra: pip install -e '.[cluster]')")
    admin = coordinator.admin()
    bundle_id = admin.upload_bundle(digits_bundle)["bundle_id"]
    admin.create_task(bundle_id, plan={"rounds": 1, "goal": 3, "selection_window_s": 1,
                                       "codec": {"name": "int8"}})
    code = main(["fleet", "--coordinator", coordinator.url, "--devices", "6", "--until-rounds",
                 "1", "--partition", "shards:2", "--duration", "120",
                 "--enrollment-token", str(coordinator.enrollment_token),
                 "--admin-token", coordinator.admin_token, *where])
    out, err = capsys.readouterr()
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    for key in ("devices", "checkins", "tasks_started", "uploads_acknowledged", "aborts",
                "bytes_up", "bytes_down"):
        assert key in summary
    assert summary["devices"] == 6 and summary["uploads_acknowledged"] >= 3
    assert admin.status()["rounds_completed"] == 1
    # A registration the stop cut short is counted by the coordinator only.
    assert 3 <= summary["devices_registered"] <= admin.status()["devices_registered"] <= 6
    assert "[fleet]" in err or where  # the progress line (a fleet in parts has none)


@pytest.mark.parametrize("server_lr, code, said", [
    (1.0, 0, "completed after 1 rounds, before --until-rounds 5"),
    # FedAvg with a server learning rate of 1e300: the first commit overflows, the task fails
    (1e300, 1, "failed after 0 rounds: "),
])
def test_until_rounds_stops_when_the_task_ends_short_of_them(
    coordinator: EmbeddedCoordinator, digits_bundle: Path, capsys: pytest.CaptureFixture[str],
    server_lr: float, code: int, said: str,
) -> None:
    """Before, a task of fewer rounds than --until-rounds (or one that failed) left the fleet
    polling the status until Ctrl-C: the task would never complete another round."""
    admin = coordinator.admin()
    bundle_id = admin.upload_bundle(digits_bundle)["bundle_id"]
    plan = {"rounds": 1, "goal": 2, "selection_window_s": 0, "robust": "none",
            "server_optimizer": {"lr": server_lr}}
    task_id = admin.create_task(bundle_id, plan=plan)["task_id"]
    fleet = ["fleet", "--coordinator", coordinator.url, "--devices", "4", "--until-rounds",
             "5", "--partition", "shards:2", "--quiet",
             "--enrollment-token", str(coordinator.enrollment_token),
             "--admin-token", coordinator.admin_token]
    started = time.monotonic()
    assert main([*fleet, "--duration", "600"]) == code
    assert time.monotonic() - started < 60
    assert admin.task(task_id)["state"] == ("completed" if code == 0 else "failed")
    err = capsys.readouterr().err
    assert f"task {task_id} {said}" in err, err
    # A task that ended before the fleet started does not stop it: the user may create the
    # next one while it runs. This fleet runs its --duration.
    started = time.monotonic()
    assert main([*fleet, "--duration", "2"]) == 0
    assert time.monotonic() - started >= 2
    assert "task" not in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--partition", "dirichlet:-1"], "alpha"),
    (["--data", "mnist"], "unknown --data"),
    (["--data", "synthetic:1"], "synthetic:ALPHA,BETA"),
    (["--dropout", "1.5"], "probability"),
    (["--start-hour", "25"], "start_hour must be an hour of the day"),
    (["--compute-sigma", "nan"], "compute_sigma must be a finite number >= 0"),
    (["--partition", "windows:0"], "windows:SIZE (SIZE >= 1)"),
    (["--engine", "spark"], "invalid choice: 'spark'"),
    # A backend no device has: every device registered with that runtime and was told to
    # wait, ineligible, for as long as the fleet ran.
    (["--backend", "ort"], "--backend must be one of ort-step, litert-step, ort-training"),
    (["--ray-address", "10.0.0.1:6379"], "--ray-address needs --engine ray"),
    (["--cpus-per-part", "2"], "--cpus-per-part needs --engine ray"),
    (["--engine", "ray", "--cpus-per-part", "0"], "--cpus-per-part must be > 0"),
    (["--engine", "ray", "--processes", "0"], "--processes must be at least 1"),
    # Numbers out of range were taken: a negative seed was a numpy ValueError traceback (the
    # data split and every device's draws seed on it), a negative worker count the fleet's
    # event loop failing, a zero round goal or duration a run that ended at once with exit
    # 0, and a NaN duration a run no emulated time ever ends.
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--workers", "-2"], "--workers must be at least 1"),
    (["--until-rounds", "0"], "--until-rounds must be at least 1"),
    (["--duration", "0"], "--duration must be a number of seconds > 0"),
    (["--duration", "nan"], "--duration must be a number of seconds > 0"),
    (["--speedup", "nan"], "--speedup must be > 0"),
    # Infinity passed "> 0": emulated time became NaN and every device checked in without
    # pause (hundreds of check-ins a second from two devices) until Ctrl-C.
    (["--speedup", "inf"], "--speedup must be > 0 and finite"),
    (["--step-time", "-0.5"], "--step-time must be a number of seconds >= 0"),
    # Taken before: inf made every feature NaN or Inf (trained on, uploaded); NaN gave every
    # device the label 0.
    (["--data", "synthetic:1,inf"], "alpha and beta must be finite numbers >= 0"),
    (["--data", "synthetic:nan,1"], "alpha and beta must be finite numbers >= 0"),
])
def test_bad_arguments_fail_with_a_clear_error(
    coordinator: EmbeddedCoordinator, capsys: pytest.CaptureFixture[str], extra: list[str],
    message: str,
) -> None:
    try:
        code = main(["fleet", "--coordinator", coordinator.url, "--devices", "4", *extra])
    except SystemExit as e:  # argparse's own refusals (choices)
        code = int(str(e.code))
    assert code == 2
    assert message in capsys.readouterr().err
    assert coordinator.admin().status()["devices_registered"] == 0


def test_until_rounds_needs_the_admin_token(
    coordinator: EmbeddedCoordinator, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FEDGE_ADMIN_TOKEN", raising=False)
    args = ["fleet", "--coordinator", coordinator.url, "--devices", "2", "--until-rounds", "1"]
    assert main(args) == 2
    assert "admin token" in capsys.readouterr().err
    assert main([*args, "--admin-token", "wrong"]) == 2
    assert "cannot read the status" in capsys.readouterr().err


def test_an_unreachable_coordinator_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", "--coordinator", "http://127.0.0.1:9", "--devices", "2"]) == 2
    assert "cannot reach" in capsys.readouterr().err


def test_a_part_that_fails_is_a_clear_error(
    coordinator: EmbeddedCoordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Part 1 cannot make its bundle cache (a file is in the way): the command ends with
    one line naming the part and why, exit 2. Before, the engine's RuntimeError escaped as a
    traceback (exit 1)."""
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "bundles-part-001").write_text("in the way")
    code = main(["fleet", "--coordinator", coordinator.url, "--devices", "4", "--processes",
                 "2", "--duration", "600", "--state-dir", str(tmp_path / "state"), "--quiet",
                 "--enrollment-token", str(coordinator.enrollment_token)])
    assert code == 2
    err = capsys.readouterr().err
    assert "fedge fleet: error: fleet parts [1] failed" in err and "FileExistsError" in err


def test_a_state_dir_it_cannot_use_is_a_clear_error(
    coordinator: EmbeddedCoordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A one-process fleet whose bundle cache cannot be made (a file is in the way) ends
    with one line naming the path, exit 2, as a fleet in parts does; before, the
    FileExistsError escaped as a traceback."""
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "bundles").write_text("in the way")
    code = main(["fleet", "--coordinator", coordinator.url, "--devices", "4", "--duration",
                 "600", "--state-dir", str(tmp_path / "state"), "--quiet",
                 "--enrollment-token", str(coordinator.enrollment_token)])
    assert code == 2
    err = capsys.readouterr().err
    assert "fedge fleet: error: --state-dir" in err and str(tmp_path / "state" / "bundles") in err
    assert coordinator.admin().status()["devices_registered"] == 0


def test_a_fleet_in_parts_shows_the_progress_line_the_help_promises(
    coordinator: EmbeddedCoordinator, capsys: pytest.CaptureFixture[str],
) -> None:
    """The command's help says it prints one updating progress line on stderr; with
    --processes it printed none. Its last state is the fleet's final summary."""
    code = main(["fleet", "--coordinator", coordinator.url, "--devices", "4", "--processes",
                 "2", "--duration", "200", "--speedup", "20",
                 "--enrollment-token", str(coordinator.enrollment_token)])
    out, err = capsys.readouterr()
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    last = err.rstrip("\n").split("\r")[-1]
    assert last.startswith("[fleet] ") and "devices 4 " in last, err
    assert f"| check-ins {summary['checkins']} |" in last and summary["checkins"] >= 4


@pytest.mark.parametrize("where", [
    pytest.param([], id="processes"),
    pytest.param(["--engine", "ray"], id="ray", marks=pytest.mark.slow),
])
def test_ctrl_c_ends_a_fleet_in_parts_with_its_summary(
    coordinator: EmbeddedCoordinator, where: list[str],
) -> None:
    """Ctrl-C in a terminal sends SIGINT to the whole foreground process group, the fleet's
    part processes too. The help names Ctrl-C as a way to end a run; with --processes the
    parts died of the KeyboardInterrupt, so the run failed without a summary."""
    if where and importlib.util.find_spec("ray") is None:
        unavailable("Ray is not installed (the cluster extra: pip install -e '.[cluster]')")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedge.cli", "fleet", "--coordinator", coordinator.url,
         "--devices", "4", "--processes", "2", "--quiet",
         "--enrollment-token", str(coordinator.enrollment_token), *where],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    try:
        deadline = time.monotonic() + 120
        while coordinator.admin().status()["devices_registered"] < 4:
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["devices"] == 4 and summary["devices_registered"] == 4
