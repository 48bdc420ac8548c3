"""``bench_replicas``'s figures: each one run by the benchmark's own ``run`` on the test
PostgreSQL server (small rounds, real ``fedge serve`` processes), which must refuse to
produce a figure from uploads that did not do the work the figure claims."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from benchmarks import bench_replicas
from tests.coordinator.replicas.fleet import Spread
from tests.fixtures.coordinator import make_synthetic_bundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_bundle(tmp_path_factory.mktemp("bundle"), bench_replicas.NUM_PARAMETERS)


def test_a_payload_sent_twice_is_refused_before_anything_is_measured(
    postgres_server: str, tmp_path: Path, bundle: Path
) -> None:
    """A repeated payload is found in the content-addressed blob directory and skips its
    write and fsync: cycling a few frames over the round would time cheaper uploads than
    the "payload fsynced" ones the figure stands for (the benchmark cycled 16 over 600)."""
    frames = bench_replicas.int8_frames(3)
    with pytest.raises(ValueError, match="payload of their own"):
        bench_replicas.run(postgres_server, tmp_path, bundle, frames, 1, False, 6, 4)


def test_a_round_that_did_not_commit_the_reference_gives_no_figure(
    postgres_server: str, tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counts that add up are not enough: one upload carries another delta than the one the
    benchmark means to send (as a replica folding the wrong payload, or losing a partial
    sum, would make the model), every answer is still 200 and the round commits with the
    right count; the model is not version 0 plus the weighted mean of the deltas sent."""
    frames = bench_replicas.int8_frames(7)
    sent, other = frames[:6], frames[6]
    upload_raw = Spread.upload_raw

    def swapped(self: Spread, assignment_id: str, frame: bytes, **kw: Any) -> Any:
        return upload_raw(self, assignment_id, other if frame == sent[0] else frame, **kw)

    monkeypatch.setattr(Spread, "upload_raw", swapped)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        bench_replicas.run(postgres_server, tmp_path, bundle, sent, 2, False, 6, 4)
    monkeypatch.undo()
    # The same round with the deltas meant: a figure.
    result = bench_replicas.run(postgres_server, tmp_path, bundle, sent, 2, False, 6, 4)
    assert result["updates"] == 6 and result["uploads_per_s"] > 0


def test_the_steered_check_ins_timed_are_check_ins_only(
    postgres_server: str, tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The steered figures (rate and replicas' CPU per check-in) stand for check-ins that
    write nothing: the devices that make them register (a write) before the clock starts,
    not in the timed interval."""
    phase: list[str | None] = [None]  # the timed phase under way, by its function's name
    registered: list[str | None] = []
    timed, init = bench_replicas.timed, Spread.__init__

    def in_phase(n: int, fn: Any, threads: int) -> Any:
        phase[0] = fn.__name__
        try:
            return timed(n, fn, threads)
        finally:
            phase[0] = None

    def registering(self: Spread, *args: Any, **kw: Any) -> None:
        registered.append(phase[0])
        init(self, *args, **kw)

    monkeypatch.setattr(bench_replicas, "timed", in_phase)
    monkeypatch.setattr(Spread, "__init__", registering)
    frames = bench_replicas.int8_frames(4)
    result = bench_replicas.run(postgres_server, tmp_path, bundle, frames, 1, False, 4, 40)
    assert result["checkins_steered_per_s"] > 0
    assert "steer" not in registered and registered.count("register") == 4


def test_a_server_whose_commits_are_not_durable_gives_no_figure(
    postgres_server: str, tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The figures are those of acknowledged-means-durable uploads: on PostgreSQL that is
    the server's ``fsync`` and ``synchronous_commit``, which a test server is often tuned
    without. Here the sessions of the benchmark's URL run with ``synchronous_commit=off``
    (a commit returns before its WAL is flushed): the benchmark must refuse, not time it."""
    in_schema = bench_replicas.in_schema

    def relaxed(url: str, schema: str) -> str:
        return in_schema(url, schema) + "%20-csynchronous_commit%3Doff"

    monkeypatch.setattr(bench_replicas, "in_schema", relaxed)
    frames = bench_replicas.int8_frames(4)
    with pytest.raises(SystemExit, match="synchronous_commit"):
        bench_replicas.run(postgres_server, tmp_path, bundle, frames, 1, False, 4, 4)


def test_a_look_without_the_docs_leaves_the_results_they_cite(
    postgres_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--no-doc`` (a quick look, another machine) leaves docs/benchmarks.md alone, so the
    committed JSON and PNG, which its "Replicas" section is written from (``--doc-only``)
    and cites, must stay too: the run's results go to the temporary directory instead."""
    committed, scratch = tmp_path / "results", tmp_path / "tmp"
    committed.mkdir()
    scratch.mkdir()
    monkeypatch.setattr(bench_replicas, "RESULTS", committed)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(bench_replicas, "write_section", lambda *_: pytest.fail("docs written"))
    monkeypatch.setattr(bench_replicas, "partial_write_ms", lambda _server: 1.0)
    monkeypatch.setattr(sys, "argv", ["bench_replicas.py", "--updates", "4", "--steered", "4",
                                      "--repeats", "1", "--no-doc"])  # fmt: skip
    bench_replicas.main()
    assert list(committed.iterdir()) == []
    results = json.loads((scratch / "bench_replicas.json").read_text())
    assert results["updates"] == 4 and len(results["runs"]) == 4
    assert (scratch / "bench_replicas.png").stat().st_size > 0


def test_a_blob_directory_in_memory_gives_no_figure(
    postgres_server: str, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replicas' shared blob directory is made under the work directory: on a memory
    filesystem (tmpfs: /tmp on many systems) the payloads' fsyncs would cost nothing."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    frames = bench_replicas.int8_frames(4)
    with tempfile.TemporaryDirectory(dir=shm) as tmp, pytest.raises(SystemExit, match="tmpfs"):
        bench_replicas.run(postgres_server, Path(tmp), bundle, frames, 1, False, 4, 4)
