"""Every durable step of a sync and an async workload made to fail in turn, as an error the
process goes on after and as a crash followed by a restart (see :mod:`.harness`).

The default suite fails the first two occurrences of every kind of step (each store write,
commit, blob write and delete, fsync) in both modes; ``--slow`` fails every single step, with
plain FedAvg (checked against numpy) and with the plan's default robust aggregation (whose
commit reads updates back from the blob store; checked for everything but the values).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from tests.coordinator.faults.harness import MODES, Fleet, run_scenario

VARIANTS = ("error", "crash")
# Seams the workloads must pass through, or the sweep proves less than it claims.
REQUIRED = {
    "store.add_update", "store.add_version", "store.update_task", "store.update_round",
    "store.add_assignments", "store.add_round", "store.commit", "blobs.put_with_derived",
    "blobs.delete",
    "os.fsync",
}  # fmt: skip


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """Scenario directories in memory where there is a tmpfs: hundreds of runs of real
    fsyncs on a busy disk take minutes, and what is checked does not depend on the disk
    (the fsyncs themselves are counted and failed by the harness)."""
    shm = "/dev/shm"
    parent = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="fedge-faults-", dir=parent))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def steps(scratch: Path) -> dict[str, list[str]]:
    """The durable steps of each mode's clean run (which must itself pass every check)."""
    return {mode: run_scenario(scratch / f"clean-{mode}", mode, None, False).fault.steps
            for mode in MODES}  # fmt: skip


def _first(steps: list[str], per_label: int) -> list[int]:
    seen: dict[str, int] = {}
    out = []
    for i, label in enumerate(steps):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= per_label:
            out.append(i)
    return out


def _sweep(
    root: Path,
    mode: str,
    variant: str,
    indices: Iterable[int],
    steps: list[str],
    robust: bool = False,
) -> None:
    failures, outcomes = [], []
    for i in indices:
        where = root / f"{mode}-{variant}-{i}"
        try:
            fleet: Fleet = run_scenario(where, mode, i, variant == "crash", robust=robust)
        except Exception as e:  # collected: one scenario's failure must not hide the others'
            failures.append(f"step {i} ({steps[i]}): {type(e).__name__}: {str(e)[:400]}")
            continue
        finally:
            shutil.rmtree(where, ignore_errors=True)
        seen = fleet.refusals[0] if fleet.refusals else "absorbed, nothing refused"
        outcomes.append(f"{mode} {variant} step {i} {steps[i]}: ok, restarts={fleet.restarts}, "
                        f"first refusal: {seen}")  # fmt: skip
    print("\n".join(outcomes))
    assert not failures, "\n".join(failures)


def test_the_workloads_pass_through_every_seam(steps: dict[str, list[str]]) -> None:
    for mode in MODES:
        assert set(steps[mode]) >= REQUIRED, REQUIRED - set(steps[mode])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_each_kind_of_durable_step_failing(
    scratch: Path, steps: dict[str, list[str]], mode: str, variant: str
) -> None:
    # Two occurrences: the first fsync of a blob is its file's, the second its directory's.
    _sweep(scratch, mode, variant, _first(steps[mode], 2), steps[mode])


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_every_durable_step_failing(
    scratch: Path, steps: dict[str, list[str]], mode: str, variant: str
) -> None:
    _sweep(scratch, mode, variant, range(len(steps[mode])), steps[mode])


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_every_durable_step_failing_with_robust_defaults(
    scratch: Path, mode: str, variant: str
) -> None:
    clean = run_scenario(scratch / f"robust-clean-{mode}-{variant}", mode, None, False,
                         robust=True)  # fmt: skip
    steps = clean.fault.steps
    _sweep(scratch / "robust", mode, variant, range(len(steps)), steps, robust=True)
