"""The coordinator's declared dependency floors admit no version lacking what it calls."""

from __future__ import annotations

from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version
from sqlite_utils import Database

from coordinator.config import toml_loads

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
# sqlite-utils 4.0 (July 2026) introduced Database.atomic(), which every store transaction
# uses; 3.x has no such method.
FIRST_WITH_ATOMIC = Version("4.0")


def test_sqlite_utils_floor_has_database_atomic() -> None:
    extras = toml_loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    [req] = [Requirement(r) for r in extras["coordinator"] if r.startswith("sqlite-utils")]
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert floors and min(floors) >= FIRST_WITH_ATOMIC, str(req.specifier)
    assert not req.specifier.contains("3.39.1"), "the newest 3.x lacks Database.atomic()"
    assert callable(Database.atomic)  # and the installed one has it
