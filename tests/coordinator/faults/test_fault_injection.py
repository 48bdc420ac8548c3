"""Every durable step of a sync and an async workload made to fail in turn, as an error the
process goes on after and as a crash followed by a restart (see :mod:`.harness`).

The default suite fails the first two occurrences of every kind of step (each store write,
commit, blob write and delete, fsync) in both modes; ``--slow`` fails every single step, with
plain FedAvg (checked against numpy) and with the plan's default robust aggregation (whose
commit reads updates back from the blob store; checked for everything but the values).
DP-FedAvg with adaptive clipping runs as a third sync workload: the default suite fails its
clipping bound's write and that write's commit, ``--slow`` every step (each version checked
against its round's DP record and the bound chain, see :func:`.harness.check_dp_round`).
Retention's deletion of old rounds, with its count of their update rows in
``tasks.updates_retired``, runs after each mode's workload as a phase of its own: the
default suite fails every one of its steps (see :func:`.harness.check_retired`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from tests.coordinator.faults.harness import (
    BOUND_COMMIT,
    BOUND_WRITE,
    MODES,
    RETIRED_COMMIT,
    RETIRED_WRITE,
    Fleet,
    run_scenario,
)

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
def dp_steps(scratch: Path) -> list[str]:
    """The durable steps of the DP workload's clean run (checked like the others)."""
    return run_scenario(scratch / "clean-dp", "sync", None, False, dp=True).fault.steps


@pytest.fixture(scope="module")
def steps(scratch: Path) -> dict[str, list[str]]:
    """The durable steps of each mode's clean run (which must itself pass every check)."""
    return {mode: run_scenario(scratch / f"clean-{mode}", mode, None, False).fault.steps
            for mode in MODES}  # fmt: skip


@pytest.fixture(scope="module")
def retiring(scratch: Path) -> dict[str, Fleet]:
    """Each mode's clean run with the retention phase: its steps, and which are that
    phase's."""
    return {mode: run_scenario(scratch / f"clean-retire-{mode}", mode, None, False, retire=True)
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
    dp: bool = False,
    retire: bool = False,
) -> None:
    failures, outcomes = [], []
    for i in indices:
        where = root / f"{mode}-{variant}-{i}"
        try:
            crash = variant == "crash"
            fleet: Fleet = run_scenario(where, mode, i, crash, robust=robust, dp=dp,
                                        retire=retire)  # fmt: skip
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


def test_the_dp_workload_writes_and_commits_the_clipping_bound(dp_steps: list[str]) -> None:
    # once per version: the sweep below fails each of them
    assert dp_steps.count(BOUND_WRITE) == dp_steps.count(BOUND_COMMIT) == 2
    assert set(dp_steps) >= REQUIRED | {BOUND_WRITE, BOUND_COMMIT}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_adaptive_clipping_bound_write_failing(
    scratch: Path, dp_steps: list[str], variant: str
) -> None:
    """A failure at the bound's write or its commit, or a crash there: the round commits on
    a retry (or after the restart) and every version is at the bound the one before chose,
    which is the bound its devices were given."""
    at = [i for i, label in enumerate(dp_steps) if label in (BOUND_WRITE, BOUND_COMMIT)]
    _sweep(scratch / "dp", "sync", variant, at, dp_steps, dp=True)


def test_the_retention_phase_deletes_rounds_and_counts_their_updates(
    retiring: dict[str, Fleet],
) -> None:
    for fleet in retiring.values():
        labels = [fleet.fault.steps[i] for i in fleet.retire_steps]
        assert {"store.delete_rounds", RETIRED_WRITE, RETIRED_COMMIT} <= set(labels), labels


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_retention_s_delete_and_count_failing(
    scratch: Path, retiring: dict[str, Fleet], mode: str, variant: str
) -> None:
    """A failure at any step of the retention pass (its deletes, the count of the update
    rows deleted, the commits, the blobs' deletion), or a crash there: the pass is retried
    and ``updates_accepted`` counts every acknowledged update exactly once."""
    clean = retiring[mode]
    _sweep(scratch / "retire", mode, variant, clean.retire_steps, clean.fault.steps,
           retire=True)  # fmt: skip


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


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_durable_step_failing_with_adaptive_dp(
    scratch: Path, dp_steps: list[str], variant: str
) -> None:
    _sweep(scratch / "dp-all", "sync", variant, range(len(dp_steps)), dp_steps, dp=True)
