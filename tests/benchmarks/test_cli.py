"""Every benchmark answers ``--help`` and refuses a word it does not know, at once and
without touching its results: before :mod:`benchmarks.cli`, six of them took either as a
start (``bench_codecs --help`` measured for minutes, then overwrote the figures the docs
cite)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cli

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = sorted((ROOT / "benchmarks").glob("bench_*.py"))


def _results() -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (ROOT / "benchmarks" / "results").glob("*")}


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_help_and_unknown_word_run_nothing(script: Path) -> None:
    before = _results()
    helped = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert helped.returncode == 0, helped.stderr[-2000:]
    doc = ast.get_docstring(ast.parse(script.read_text()))
    assert doc is not None
    assert doc.splitlines()[0].split()[0] in helped.stdout
    refused = subprocess.run([sys.executable, str(script), "no-such-word"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 2, (refused.stdout[-1000:], refused.stderr[-2000:])
    assert "no-such-word" in refused.stderr
    assert _results() == before


def test_words_are_checked_against_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.words("doc", ("quick",), []) == set()
    assert cli.words("doc", ("rounds", "idle"), ["idle", "idle"]) == {"idle"}
    for argv, known in ((["fast"], ("quick",)), (["quick"], ()), (["-x"], ("quick",))):
        with pytest.raises(SystemExit) as e:
            cli.words("doc", known, argv)
        assert e.value.code == 2
    assert "unknown 'quick'; known: none" in capsys.readouterr().err


def test_upload_floor_answers_help_and_creates_no_directory(tmp_path: Path) -> None:
    """``upload_floor.py`` is a server the coordinator benchmark starts, not a benchmark: it
    took its first argument as the directory to create, so ``--help`` made a tree named
    ``--help`` and then served forever."""
    script = ROOT / "benchmarks" / "upload_floor.py"
    helped = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "BLOB_DIR" in helped.stdout
    missing = subprocess.run([sys.executable, str(script), "no-such-dir"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert missing.returncode == 2
    assert "no-such-dir is not a directory" in missing.stderr
    assert list(tmp_path.iterdir()) == []
