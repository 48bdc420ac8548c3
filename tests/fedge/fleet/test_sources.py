"""Device data recipes (the user's own .npz partitions, digits, synthetic) and ``fedge fleet
--partitions``/``--processes`` against a real coordinator."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest

from coordinator.embedded import EmbeddedCoordinator
from fedge.cli import main
from fedge.commands import fleet as fleet_command
from fedge.fleet.datasets import load_digits
from fedge.fleet.partition import partition
from fedge.fleet.sources import (
    DigitsPartitions,
    DigitsWindows,
    FedProxSynthetic,
    NpzPartitions,
    SourceError,
)
from fedge.fleet.synthetic import fedprox_synthetic


def _write_parts(root: Path, n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    root.mkdir(parents=True, exist_ok=True)
    train, _ = load_digits(seed=seed)
    parts = partition(train.y, n, "iid", np.random.default_rng(seed))
    out = []
    for i, p in enumerate(parts):
        x, y = train.x[p], train.y[p].astype(np.int32)  # any integer dtype is accepted
        np.savez(root / f"device-{i:03d}.npz", x=x, y=y)
        out.append((x, y))
    return out


def test_npz_partitions_give_each_device_its_file_in_name_order(tmp_path: Path) -> None:
    written = _write_parts(tmp_path / "parts", 5)
    source = NpzPartitions(tmp_path / "parts")
    assert source.devices == 5 and source.classes() == 10
    got = source(1, 3)
    assert len(got) == 3
    for d, (x, y) in zip(got, written[1:4], strict=True):
        assert np.array_equal(d.x, x) and np.array_equal(d.y, y.astype(np.int64))
        assert d.x.dtype == np.float32 and d.y.dtype == np.int64


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no .npz"),
    (lambda d: np.savez(d / "a.npz", x=np.zeros((3, 2))), "arrays x and y"),
    (lambda d: np.savez(d / "a.npz", x=np.zeros((3, 2)), y=np.zeros(3)), "integers"),
    (lambda d: np.savez(d / "a.npz", x=np.zeros((3, 2)), y=np.zeros(4, int)), "data set"),
    (lambda d: (d / "a.npz").write_bytes(b"not a zip"), "arrays x and y"),
    (lambda d: _truncated(d / "a.npz"), "arrays x and y"),  # was a BadZipFile traceback
])
def test_bad_partition_files_are_clear_errors(tmp_path: Path, make: object,
                                              message: str) -> None:
    d = tmp_path / "parts"
    d.mkdir()
    make(d)  # type: ignore[operator]
    with pytest.raises(SourceError, match=message):
        NpzPartitions(d)(0, 1)


def _truncated(path: Path) -> None:
    np.savez(path, x=np.zeros((30, 4)), y=np.zeros(30, int))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


_LATER_FILE_DEFECTS = [
    (dict(y=-1), "labels must be from 0, found -1"),
    (dict(n=0), "0 examples in x"),
    (dict(features=60), "examples of shape (60,), but device-000.npz's are (64,)"),
    (dict(x=np.nan), "NaN or Inf"),
]


def _bad_later_file(root: Path, y: int = 0, n: int = 8, features: int = 64,
                    x: float = 0.0) -> None:  # fmt: skip
    """Three good device files, then a fourth with one defect."""
    _write_parts(root, 3)
    np.savez(root / "device-999.npz", x=np.full((n, features), x, np.float32),
             y=np.full(n, y, np.int64))  # fmt: skip


@pytest.mark.parametrize("defect, message", _LATER_FILE_DEFECTS)
def test_check_reads_every_file_not_only_the_first(tmp_path: Path, defect: dict[str, float],
                                                   message: str) -> None:  # fmt: skip
    """Before, only the first file was checked: a later bad one failed its device mid-run
    (a run that ended "successfully" with a round left open) or its part after the others
    registered."""
    _bad_later_file(tmp_path / "parts", **defect)  # type: ignore[arg-type]
    source = NpzPartitions(tmp_path / "parts")
    source(0, 1)  # the first file is fine
    with pytest.raises(SourceError, match=re.escape(message)):
        source.check()


@pytest.mark.parametrize("arrays, message", [
    # A column of labels, or one-hot rows: check() passed them (lengths and values were
    # fine) and the device's data set failed later, in a fleet part after the others started.
    (dict(x=np.zeros((3, 64)), y=np.zeros((3, 1), np.int64)), "labels y must be one"),
    (dict(x=np.zeros((3, 64)), y=np.eye(3, dtype=np.int64)), "labels y must be one"),
    # 0-d arrays: a TypeError traceback (len() of unsized object).
    (dict(x=np.float32(1.0), y=np.zeros(1, np.int64)), "x must hold one row per example"),
    (dict(x=np.zeros((1, 64)), y=np.int64(0)), "labels y must be one"),
])
def test_check_refuses_arrays_that_are_not_examples_and_labels(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str,
) -> None:
    _write_parts(tmp_path / "parts", 2)
    np.savez(tmp_path / "parts" / "device-999.npz", **arrays)
    with pytest.raises(SourceError, match=message):
        NpzPartitions(tmp_path / "parts").check()


def test_check_holds_labels_below_the_classes_given(tmp_path: Path) -> None:
    _write_parts(tmp_path / "parts", 2)
    NpzPartitions(tmp_path / "parts", num_classes=10).check()
    with pytest.raises(SourceError, match=re.escape("labels must be from 0 below 9, found 0..9")):
        NpzPartitions(tmp_path / "parts", num_classes=9).check()


def test_check_gives_the_classes_and_the_command_fixes_them(tmp_path: Path) -> None:
    """Each process of ``fedge fleet --processes`` would otherwise read every file's labels
    again to count the classes: 50,000 files per process for a 50,000-device fleet."""
    _write_parts(tmp_path / "parts", 3)
    assert NpzPartitions(tmp_path / "parts").check() == 10
    assert NpzPartitions(tmp_path / "parts", num_classes=12).check() == 12
    source = fleet_command._source(argparse.Namespace(partitions=tmp_path / "parts", devices=None))
    assert source == NpzPartitions(tmp_path / "parts", num_classes=10)


def test_slices_outside_a_source_are_refused(tmp_path: Path) -> None:
    _write_parts(tmp_path / "p", 3)
    with pytest.raises(SourceError, match="outside"):
        NpzPartitions(tmp_path / "p")(2, 2)
    with pytest.raises(SourceError, match="not a directory"):
        NpzPartitions(tmp_path / "missing")


def test_built_in_sources_match_their_one_process_counterparts() -> None:
    train, _ = load_digits(seed=3)
    parts = partition(train.y, 12, "dirichlet:0.5", np.random.default_rng(3))
    got = DigitsPartitions(12, "dirichlet:0.5", seed=3)(4, 5)
    for d, p in zip(got, parts[4:9], strict=True):
        assert np.array_equal(d.y, train.y[p]) and np.array_equal(d.x, train.x[p])
    windows = DigitsWindows(size=8)(0, 200)  # 200 x 8 > 1,347 digits: the windows wrap
    full, _ = load_digits(seed=0)
    assert np.array_equal(windows[199].x, full.x[(199 * 8 + np.arange(8)) % len(full)])
    synth = FedProxSynthetic(6, 1.0, 1.0, seed=2, max_samples=50)(2, 2)
    direct = fedprox_synthetic(1.0, 1.0, 6, seed=2, max_samples=50)
    assert np.array_equal(synth[1].x, direct[3].x)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_fleet_command_trains_a_plain_fedavg_task_on_own_partitions(
    coordinator: EmbeddedCoordinator, digits_bundle: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], processes: int,
) -> None:
    _write_parts(tmp_path / "parts", 6)
    admin = coordinator.admin()
    bundle_id = admin.upload_bundle(digits_bundle)["bundle_id"]
    admin.create_task(bundle_id, plan={
        "rounds": 1, "goal": 3, "over_selection": 1.0, "robust": "none",
        "server_optimizer": {"name": "fedavg"}, "selection_window_s": 1, "steps": 5,
        "codec": {"name": "int8"}})
    code = main(["fleet", "--coordinator", coordinator.url, "--partitions",
                 str(tmp_path / "parts"), "--processes", str(processes), "--until-rounds", "1",
                 "--duration", "300", "--quiet",
                 "--enrollment-token", str(coordinator.enrollment_token),
                 "--admin-token", coordinator.admin_token])
    out, _ = capsys.readouterr()
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["devices"] == 6 and summary["uploads_acknowledged"] >= 1
    rounds = [r for r in admin.rounds(admin.tasks()[0]["task_id"]) if r["kind"] == "train"]
    # The coordinator is the reference: the stop may cut the last device's pass short of
    # recording its acknowledged upload in the fleet's counters.
    assert rounds[0]["state"] == "committed" and rounds[0]["target"] == 3  # no over-selection
    assert rounds[0]["metrics"]["reported"] == 3


@pytest.mark.parametrize("args, message", [
    (["--partitions", "{empty}"], "no .npz"),
    (["--partitions", "{bad_later}"], "examples of shape (60,)"),
    (["--partitions", "{parts}", "--devices", "9"], "holds 4 device files"),
    (["--processes", "0", "--devices", "2"], "--processes"),
    ([], "--devices is required"),
])
def test_fleet_command_refuses_bad_partitions(
    coordinator: EmbeddedCoordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    args: list[str], message: str,
) -> None:
    (tmp_path / "empty").mkdir()
    _write_parts(tmp_path / "parts", 4)
    _bad_later_file(tmp_path / "bad_later", features=60)
    args = [a.format(empty=tmp_path / "empty", parts=tmp_path / "parts",
                     bad_later=tmp_path / "bad_later") for a in args]  # fmt: skip
    assert main(["fleet", "--coordinator", coordinator.url, *args]) == 2
    assert message in capsys.readouterr().err
    assert coordinator.admin().status()["devices_registered"] == 0
