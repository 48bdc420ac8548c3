"""The edge SDK on aarch64 under qemu-user (``./dev arm``): parity with x86 and one real round.

Builds the emulated environment on first use (``.cache/arm/``, 3 to 5 minutes cold from the
Debian and PyPI registries; reused afterwards), then runs ``scripts/arm/check.py``, which
trains the demo bundle on the aarch64 python with each backend's extra installed alone,
repeats the same steps natively, and runs ``fedge device run`` on aarch64 against a
coordinator on 127.0.0.1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5
BACKEND_EXTRA = {"ort-step": "edge", "litert-step": "litert"}


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "arm" / "check.py"), "--no-write"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )
    assert done.stdout.strip(), f"check.py printed nothing:\n{done.stderr[-4000:]}"
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _backend(result: dict[str, Any], backend: str) -> dict[str, Any]:
    details = dict(result["backends"][backend])
    assert "error" not in details, f"{backend} did not run on aarch64: {details['error']}"
    return details


@pytest.mark.timeout(2400)
def test_runs_on_aarch64(result: dict[str, Any]) -> None:
    assert result["arch"] == "aarch64"
    assert result["emulated"] is True


@pytest.mark.timeout(2400)
@pytest.mark.parametrize("backend", ["ort-step", "litert-step"])
def test_parameters_match_x86(result: dict[str, Any], backend: str) -> None:
    details = _backend(result, backend)
    assert result["parity_max_abs_diff"][backend] <= TOLERANCE
    assert details["finite"]
    # Parity is only meaningful if the steps moved the parameters well beyond the tolerance.
    assert details["param_change"] > 100 * TOLERANCE


@pytest.mark.timeout(2400)
@pytest.mark.parametrize("backend", ["ort-step", "litert-step"])
def test_each_extra_alone_suffices(result: dict[str, Any], backend: str) -> None:
    assert _backend(result, backend)["heavy_importable_aarch64"] == []
    # pip running on the aarch64 python resolves the extra to the same distributions.
    assert result["aarch64_pip_resolves_same"][BACKEND_EXTRA[backend]] is True
    assert result["install_mb_edge"] > 0 and result["install_mb_litert"] > 0


@pytest.mark.timeout(2400)
def test_one_round_completes_from_aarch64(result: dict[str, Any]) -> None:
    rnd = result["round"]
    assert rnd["device_outcome"] == "trained"
    assert rnd["rounds_completed"] == 1 and rnd["model_version"] == 1
    assert result["round_completed"] is True
