"""Recorded outputs under ``data/``: real-format sysfs trees and command outputs."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

DATA = Path(__file__).parent / "data"


class Recorded:
    """A command runner that answers from recorded files; any other command is absent."""

    def __init__(self, outputs: dict[tuple[str, ...], str]) -> None:
        self.outputs = {
            argv: (DATA / "commands" / name).read_text() for argv, name in outputs.items()
        }
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str]) -> str | None:
        self.calls.append(tuple(argv))
        return self.outputs.get(tuple(argv))


def tree(name: str, tmp_path: Path) -> Path:
    """A writable copy of a recorded root directory (tests set terminal times in it)."""
    root = tmp_path / name
    shutil.copytree(DATA / name, root)
    return root
