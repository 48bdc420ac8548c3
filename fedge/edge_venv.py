"""Edge-only virtual environments under ``.cache/``: what a device installs, and nothing else.

``ensure_edge_venv("edge")`` builds (once; rebuilt when ``pyproject.toml`` changes) a fresh venv
with ``pip install -e ROOT[edge]``: numpy and plain onnxruntime, no torch, no aiohttp, no
coordinator dependencies. ``"litert"`` gives ai-edge-litert instead. Used by the edge-install
test, the edge benchmarks and ``scripts/arm``; a file lock keeps concurrent builds apart.
Development-host code (it installs this source checkout), never a device's.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["ensure_edge_venv"]

ROOT = Path(__file__).resolve().parents[1]


def _python() -> str:
    return os.environ.get("FEDGE_PYTHON") or shutil.which("python3.11") or sys.executable


def ensure_edge_venv(extra: str = "edge") -> Path:
    """The venv's python for ``pip install -e ROOT[extra]``, built if missing or stale."""
    venv = ROOT / ".cache" / f"edge-venv-{extra}"
    python = venv / "bin" / "python"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extra.encode()).hexdigest()
    stamp = venv / ".fedge-stamp"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"edge-venv-{extra}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == want and python.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([_python(), "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "--upgrade", "pip>=24"], check=True)
        subprocess.run([*pip, "-e", f"{ROOT}[{extra}]"], check=True)
        stamp.write_text(want)
    return python
