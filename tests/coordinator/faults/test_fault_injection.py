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

The same workloads run with their records in PostgreSQL (a fresh schema per scenario on the
test server; a store write fails as psycopg's full disk): the default suite fails the first
occurrence of every kind of step in both modes, ``--slow`` every step, and every step of the
retention phase.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.coordinator.faults.harness import (
    BOUND_COMMIT,
    BOUND_WRITE,
    MODES,
    RETIRED_COMMIT,
    RETIRED_DURATIONS_WRITE,
    RETIRED_WRITE,
    Fleet,
    run_scenario,
)
from tests.fixtures.postgres import new_schema

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


def _scenario(
    root: Path, mode: str, at: int | None, crash: bool, postgres: str | None, **kwargs: Any
) -> Fleet:
    """:func:`run_scenario`, with its records in a fresh schema of the ``postgres`` server
    if given (dropped after it), else in a SQLite file."""
    with contextlib.ExitStack() as stack:
        url = None if postgres is None else stack.enter_context(new_schema(postgres))
        return run_scenario(root, mode, at, crash, database_url=url, **kwargs)


def _sweep(
    root: Path,
    mode: str,
    variant: str,
    indices: Iterable[int],
    steps: list[str],
    robust: bool = False,
    dp: bool = False,
    retire: bool = False,
    postgres: str | None = None,
) -> None:
    """Scenario ``i`` for each index; ``postgres``: the server whose fresh schema holds each
    scenario's records."""
    failures, outcomes = [], []
    for i in indices:
        where = root / f"{mode}-{variant}-{i}"
        try:
            fleet = _scenario(where, mode, i, variant == "crash", postgres, robust=robust,
                              dp=dp, retire=retire)  # fmt: skip
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
        assert {"store.delete_rounds", RETIRED_WRITE, RETIRED_DURATIONS_WRITE,
            RETIRED_COMMIT} <= set(labels), labels


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


# -- the same seams with the records in PostgreSQL (the replicas' database) ------------------


@pytest.fixture(scope="module")
def pg_steps(scratch: Path, postgres_server: str) -> dict[str, list[str]]:
    """Each mode's clean run on PostgreSQL: its durable steps."""
    out = {}
    for mode in MODES:
        fleet = _scenario(scratch / f"pg-clean-{mode}", mode, None, False, postgres_server)
        assert type(fleet.coord.store).__name__ == "PostgresStore"
        assert not (scratch / f"pg-clean-{mode}" / "fedge.db").exists()  # no SQLite file
        out[mode] = fleet.fault.steps
    return out


@pytest.fixture(scope="module")
def pg_retiring(scratch: Path, postgres_server: str) -> dict[str, Fleet]:
    """Each mode's clean run with the retention phase, on PostgreSQL."""
    return {mode: _scenario(scratch / f"pg-clean-retire-{mode}", mode, None, False,
                            postgres_server, retire=True)
            for mode in MODES}  # fmt: skip


def test_the_workloads_on_postgresql_pass_through_every_seam(
    pg_steps: dict[str, list[str]],
) -> None:
    for mode in MODES:
        assert set(pg_steps[mode]) >= REQUIRED, REQUIRED - set(pg_steps[mode])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_each_kind_of_durable_step_failing_on_postgresql(
    scratch: Path, postgres_server: str, pg_steps: dict[str, list[str]], mode: str, variant: str
) -> None:
    """The first occurrence of each kind of step (a store write failing as psycopg's full
    disk, a transaction's commit, a blob write, an fsync), or a crash there: nothing
    acknowledged is lost or counted twice."""
    steps = pg_steps[mode]
    _sweep(scratch / "pg", mode, variant, _first(steps, 1), steps, postgres=postgres_server)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_every_durable_step_failing_on_postgresql(
    scratch: Path, postgres_server: str, pg_steps: dict[str, list[str]], mode: str, variant: str
) -> None:
    steps = pg_steps[mode]
    _sweep(scratch / "pg-all", mode, variant, range(len(steps)), steps, postgres=postgres_server)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_retention_s_delete_and_count_failing_on_postgresql(
    scratch: Path, postgres_server: str, pg_retiring: dict[str, Fleet], mode: str, variant: str
) -> None:
    clean = pg_retiring[mode]
    labels = {clean.fault.steps[i] for i in clean.retire_steps}
    assert {"store.delete_rounds", RETIRED_WRITE, RETIRED_DURATIONS_WRITE,
            RETIRED_COMMIT} <= labels, labels
    _sweep(scratch / "pg-retire", mode, variant, clean.retire_steps, clean.fault.steps,
           retire=True, postgres=postgres_server)  # fmt: skip
