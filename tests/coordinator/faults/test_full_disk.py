"""A real disk that fills up mid-task: the database and the blob directory on a size-limited
tmpfs, a filler file leaving room for about one update. Uploads and commits then fail
with the kernel's ``ENOSPC`` and SQLite's "database or disk is full", wherever they happen
to; devices retry; after a few refusals the filler is deleted and the task must finish with
the invariants of :func:`~tests.coordinator.faults.harness.check_invariants`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.coordinator.faults.harness import MODES, Fleet, run_scenario
from tests.fixtures.requirements import unavailable

PARAMETERS = 60_000  # 240 kB a payload, a version, a frame: the disk fills in a few updates
DISK = "16m"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        unavailable("mounting a size-limited tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        unavailable(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(path: Path, leave: int) -> None:
    """Write zeros to ``path`` until only about ``leave`` bytes stay free."""
    st = os.statvfs(path.parent)
    size = st.f_bavail * st.f_frsize - leave
    chunk = b"\0" * (1 << 20)
    with open(path, "wb") as f:
        while size > 0:
            f.write(chunk[: min(size, len(chunk))])
            size -= len(chunk)
        f.flush()
        os.fsync(f.fileno())


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_disk_full_mid_task_then_freed(small_disk: Path, mode: str) -> None:
    filler = small_disk / "filler"
    refused: list[int] = []

    def free_after_a_few() -> None:  # an operator noticing and making room
        refused.append(1)
        if len(refused) == 4:
            filler.unlink()

    def prepare(fleet: Fleet) -> None:
        _fill(filler, leave=4 * PARAMETERS)
        fleet.on_trouble = free_after_a_few

    fleet = run_scenario(
        small_disk / "run", mode, None, False, num_parameters=PARAMETERS, prepare=prepare
    )
    # Four troubles came (refused uploads, or ticks whose commit could not be written).
    assert not filler.exists(), f"the disk never filled up (refusals: {fleet.refusals})"
    assert all(r.startswith("503 overloaded: storage unavailable") for r in fleet.refusals)
    print(f"{mode}: refused while full: {fleet.refusals}")
