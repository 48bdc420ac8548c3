"""``bench_downloads`` in its quick form: every phase runs the loop it names over the
transport it names (the phase checks the server's log), and the results file holds each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_quick_run_measures_each_loop_on_each_transport(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_downloads.py", "quick"], cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "bench_downloads.json").read_text())
    kinds = {(r["transport"], r["loop"]) for r in results["runs"]}
    assert kinds == {(t, loop) for t in ("http", "https") for loop in ("asyncio", "uvloop")}
    assert all(r["bytes"] == results["runs"][0]["bytes"] > 0 for r in results["runs"])
    assert set(results["ratios"]) == {
        f"{what}_uvloop_vs_asyncio{suffix}"
        for what in ("downloads", "server_cpu") for suffix in ("", "_tls")
    }  # fmt: skip
    assert (tmp_path / "bench_downloads.png").stat().st_size > 0
