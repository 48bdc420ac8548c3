"""Orphaned blobs among replicas: collected while the others write, but only when old and
named by no row (a payload is installed moments before the row naming it commits)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import coordinator.service as service_module
from coordinator.admin import tar_directory
from coordinator.blobs import Collected
from coordinator.clock import FakeClock
from coordinator.embedded import EmbeddedCoordinator
from coordinator.errors import Overloaded
from coordinator.service import Coordinator
from tests.coordinator.replicas.fleet import start_task, thread_replicas
from tests.fixtures.coordinator import select_devices

WINDOW = 10.0
PLAN = {"rounds": 1, "goal": 2, "over_selection": 1.0, "selection_window_s": WINDOW,
        "round_deadline_s": 86400.0, "robust": "none",
        "eligibility": {"require_charging": False}}  # fmt: skip
HOUR = 3600.0


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_old_unnamed_blobs_go_and_everything_else_stays(
    replica_db: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    clock = FakeClock(1_700_000_000.0)
    with thread_replicas(2, replica_db, tmp_path / "blobs", clock) as reps:
        task_id, (device, aid), (second, aid2), delta = _two_selected(reps, tiny_bundle, clock)
        device.upload(aid, delta)  # its payload is named by an update of the open round
        service = reps[0].service
        blobs = service.blobs
        named = set(blobs.shas())
        old, fresh = blobs.put(b"orphan of a crash"), blobs.put(b"being stored right now")
        for sha in [*named, old]:
            _age(blobs.path(sha), 2 * HOUR)

        got = reps[0].call(service.collect_garbage)

        assert got == Collected(1, len(b"orphan of a crash"))
        assert set(blobs.shas()) == named | {fresh}
        # The other replica's tick collects at the retention cadence, on its own.
        _age(blobs.path(fresh), 2 * HOUR)
        clock.advance(reps[1].config.replica_orphan_age_s)
        reps[1].call(reps[1].service.tick)
        assert set(blobs.shas()) == named
        # The round still commits from what stayed.
        second.upload(aid2, delta)
        assert reps[0].admin().task(task_id)["model_version"] == 1


def _two_selected(
    reps: list[EmbeddedCoordinator], tiny_bundle: Path, clock: FakeClock
) -> tuple[str, tuple[Any, str], tuple[Any, str], np.ndarray]:
    """A task of goal 2 on the replicas, its two devices selected (each with its
    assignment), and the delta they upload."""
    _, task_id, devices = start_task([r.url for r in reps], tiny_bundle, PLAN, 2)
    first, second = select_devices(devices, lambda: clock.advance(WINDOW + 0.5))
    return task_id, first, second, np.random.default_rng(0).normal(0, 0.01, 64).astype(np.float32)


def _sweep_racing(
    serving: EmbeddedCoordinator,
    sweeper: Coordinator,
    targets: Callable[[str], bool],
    retry: Callable[[], object],
    reached: threading.Event,
    swept: threading.Event,
) -> bool:
    """``sweeper``'s orphan sweep, which, when it first locks a blob ``targets`` names,
    starts ``retry`` on another thread and waits until the retry ``reached`` its pause (its
    files placed again, its row not committed yet); the retry goes on once the sweep ended
    (``swept``). True if the sweep came to a target."""
    real_lock = sweeper.store.lock_blob
    started: list[threading.Thread] = []

    def lock_after_the_retry_reached_it(sha: str, **kwargs: Any) -> bool:
        if targets(sha) and not started:
            started.append(threading.Thread(target=retry))
            started[0].start()
            assert reached.wait(30)
        return real_lock(sha, **kwargs)

    sweeper.store.lock_blob = lock_after_the_retry_reached_it  # type: ignore[method-assign]
    try:
        serving.call(sweeper.collect_garbage)
    finally:
        swept.set()
        for t in started:
            t.join(30)
    return bool(started)


def test_a_version_whose_bytes_an_old_orphan_holds_keeps_its_blob(
    postgres_url: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    # PostgreSQL only: on SQLite a commit's turn holds the file's one write lock from before
    # its blobs are written to its commit, so no sweep runs in between.
    clock = FakeClock(1_700_000_000.0)
    with thread_replicas(2, postgres_url, tmp_path / "blobs", clock) as reps:
        task_id, (device, aid), (second, aid2), delta = _two_selected(reps, tiny_bundle, clock)
        sweeper, committer = reps[0].service, reps[1].service
        device.to(0).upload(aid, delta)
        # The round's commit on replica 1 writes the version's blobs, then its transaction
        # fails: the blobs stay, named by nothing, and the round commits again later.
        real_add = committer.store.add_version
        failed: list[bool] = []

        def fail_once(version: Any) -> None:
            if not failed:
                failed.append(True)
                raise OSError("I/O error")
            real_add(version)

        committer.store.add_version = fail_once  # type: ignore[method-assign]
        assert second.to(1).upload(aid2, delta)[0] == 200
        assert failed and reps[1].admin().task(task_id)["model_version"] == 0
        named = committer.store.referenced_blobs(closed_round_payloads=True)
        (orphan,) = set(committer.blobs.shas()) - named  # the version's parameters
        _age(committer.blobs.path(orphan), 2 * HOUR)  # the retry comes an hour later

        # The retry finds the file and skips its write; replica 0's sweep, which found it old
        # and named by nothing just before, decides on it before the retry's version commits.
        found, swept = threading.Event(), threading.Event()
        real_put = committer.blobs.put_with_derived

        def put_then_pause(data: bytes, derived: Any) -> str:
            sha = real_put(data, derived)
            found.set()
            assert swept.wait(30)
            return sha

        committer.blobs.put_with_derived = put_then_pause  # type: ignore[method-assign]
        retried = _sweep_racing(
            reps[0], sweeper, orphan.__eq__, lambda: reps[1].call(committer.tick), found, swept
        )
        assert retried, "the sweep never looked at the orphan"
        assert reps[0].admin().task(task_id)["model_version"] == 1
        v = committer.store.get_version(task_id, 1)
        assert v is not None and v.params_sha == orphan
        assert sweeper.blobs.exists(v.params_sha), "the current version's parameters are gone"


def test_a_bundle_whose_files_old_orphans_hold_is_stored_whole_or_not_at_all(
    postgres_url: str, tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL only, like the version's case: replicas on SQLite take turns on the file.
    clock = FakeClock(1_700_000_000.0)
    body = tar_directory(tiny_bundle)
    with thread_replicas(2, postgres_url, tmp_path / "blobs", clock) as reps:
        sweeper, uploader = reps[0].service, reps[1].service
        # An upload whose row failed (its files stay, named by nothing), retried hours later.
        real_add = uploader.store.add_bundle

        def fail(*args: Any) -> bool:
            raise OSError("I/O error")

        uploader.store.add_bundle = fail  # type: ignore[method-assign]
        with pytest.raises(OSError):
            reps[1].call(uploader.add_bundle, body)
        uploader.store.add_bundle = real_add  # type: ignore[method-assign]
        orphans = set(uploader.blobs.shas())
        assert orphans and not uploader.store.referenced_blobs(closed_round_payloads=True)
        for sha in orphans:
            _age(uploader.blobs.path(sha), 2 * HOUR)

        # The retry puts its files again; replica 0's sweep, which found them old and named by
        # nothing just before, decides on them before the retry's row commits.
        put, swept = threading.Event(), threading.Event()
        real_extract = service_module.extract_bundle

        def extract_then_pause(data: bytes, blobs: Any) -> dict[str, Any]:
            manifest = real_extract(data, blobs)
            put.set()
            assert swept.wait(30)
            return manifest

        monkeypatch.setattr(service_module, "extract_bundle", extract_then_pause)
        outcome: list[object] = []

        def add_again() -> None:
            try:
                outcome.append(reps[1].call(uploader.add_bundle, body))
            except Exception as e:
                outcome.append(e)

        retried = _sweep_racing(reps[0], sweeper, orphans.__contains__, add_again, put, swept)
        assert retried and outcome, "the sweep never looked at the orphans"
        monkeypatch.undo()
        # Refused (503: upload it again), or stored with every file it names.
        stored = [uploader.store.get_bundle(b) for b in _bundle_ids(uploader)]
        for manifest in stored:
            files = [meta["sha256"] for meta in manifest["files"].values()]
            missing = [sha for sha in files if not sweeper.blobs.exists(sha)]
            assert not missing, f"bundle stored without {len(missing)} of its files"
        if not stored:
            assert isinstance(outcome[0], Overloaded), outcome
            reps[1].call(uploader.add_bundle, body)
            assert referenced_exist(uploader)


def _bundle_ids(service: Coordinator) -> list[str]:
    return [r[0] for r in service.store._execute("select bundle_id from bundles").fetchall()]  # type: ignore[attr-defined]


def referenced_exist(service: Coordinator) -> bool:
    named = service.store.referenced_blobs(closed_round_payloads=True)
    return bool(named) and all(service.blobs.exists(sha) for sha in named)
