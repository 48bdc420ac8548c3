"""``fedge export``: the flags reach the manifest, and failures are one line, exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.bundle import verify_bundle
from edge_sdk.trainers import load_trainer
from fedge.cli import main

ROOT = Path(__file__).resolve().parents[3]
BAD = ROOT / "tests" / "model_export" / "bad_models.py"


def test_export_command_writes_the_bundle_the_flags_describe(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedge.cli",
            "export",
            "model_export.models:BackboneHead",
            "--out",
            str(out),
            "--input-shape",
            "1,64",
            "--loss",
            "cross_entropy",
            "--optimizer",
            "adamw",
            "--lr",
            "0.02",
            "--weight-decay",
            "0.001",
            "--freeze",
            "backbone.0",
            "--freeze",
            "backbone.2.weight",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    raw = verify_bundle(out).raw
    assert run.stdout.startswith(f"bundle {raw['bundle_id']} written to {out}")
    assert raw["optimizer"] == {
        "name": "adamw",
        "lr": 0.02,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": 0.001,
    }
    assert [p["name"] for p in raw["frozen"]] == [
        "backbone.0.weight",
        "backbone.0.bias",
        "backbone.2.weight",
    ]
    assert [p["name"] for p in raw["parameters"]] == ["backbone.2.bias", "head.weight", "head.bias"]
    assert raw["backends"]["litert-step"]["supported"] is False  # no --tflite
    trainer = load_trainer(out)
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    assert np.isfinite(trainer.train_step(x, np.array([0, 1, 2, 3])))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["/nonexistent/net.py:Net"], "model file /nonexistent/net.py does not exist"),
        ([f"{BAD}:Missing"], "has no attribute 'Missing'"),
        (["no_such_pkg.models:Net"], "no module named 'no_such_pkg'"),
        ([f"{BAD}:not_a_module"], "returned a int, not an nn.Module"),
        ([f"{BAD}:UnsupportedOp", "--loss", "mse"], "operator prims.bessel_j0 cannot be exported"),
        ([f"{BAD}:DataDependent"], "data-dependent control flow"),
        ([f"{BAD}:OneLogit"], "cross_entropy needs logits"),
        ([f"{BAD}:make_linear", "--optimizer", "adamw", "--momentum", "0.9"], "SGD option"),
        ([f"{BAD}:make_linear", "--freeze", "conv"], "matches no parameter"),
    ],
)
def test_failures_are_one_line_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = main(["export", *argv, "--out", str(tmp_path / "b"), "--input-shape", "1,8"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("[fedge export] ")]
    assert code == 2
    assert len(lines) == 1, err  # progress lines, then the error on one line
    assert lines[0].startswith("fedge export: error: ") and message in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_an_out_directory_that_cannot_be_made_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "sub" / "bundle"  # under a file: NotADirectoryError
    code = main(["export", f"{BAD}:make_linear", "--out", str(out), "--input-shape", "1,8"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code == 2
    assert err.splitlines()[-1].startswith("fedge export: error: ")
    assert "notes.txt" in err.splitlines()[-1]


@pytest.mark.parametrize("shape", ["1,x", "0,8", ""])
def test_bad_input_shape_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], shape: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["export", f"{BAD}:make_linear", "--out", str(tmp_path), "--input-shape", shape])
    assert exc.value.code == 2
    assert "--input-shape" in capsys.readouterr().err


def test_parser_does_not_import_torch() -> None:
    code = "import sys, fedge.cli; fedge.cli.build_parser(); print('torch' in sys.modules)"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert run.stdout.strip() == "False"
