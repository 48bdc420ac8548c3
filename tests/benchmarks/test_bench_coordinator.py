"""``bench_coordinator``'s rounds, run small by the benchmark's own ``run_round`` (a real
``fedge serve`` subprocess): a round gives figures only once it committed what was sent."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import bench_coordinator, loadgen
from benchmarks.bench_coordinator import Config
from tests.fixtures.coordinator import make_synthetic_bundle

pytestmark = pytest.mark.slow

UPDATES = 6


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bundle")
    return make_synthetic_bundle(directory, bench_coordinator.NUM_PARAMETERS)


@pytest.mark.parametrize("config", [Config(updates=UPDATES, steered=0),
                                    Config(updates=UPDATES, steered=0, separate=2)],
                         ids=["one", "separate"])  # fmt: skip
def test_a_round_that_did_not_commit_the_deltas_sent_gives_no_figure(
    tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch, config: Config
) -> None:
    """One upload carries another delta than the one the benchmark means to send (as a
    server folding the wrong payload would make the model): every answer is 200 and the
    round commits with the right count, and still the run must not give a figure."""
    frames = bench_coordinator.int8_frames(UPDATES + 1)
    sent, other = frames[:UPDATES], frames[UPDATES]
    upload_request = loadgen.upload_request

    def swapped(port: int, device: Any, aid: str, frame: bytes, *rest: Any, **kw: Any) -> Any:
        return upload_request(port, device, aid, other if frame == sent[0] else frame, *rest,
                              **kw)  # fmt: skip

    monkeypatch.setattr(loadgen, "upload_request", swapped)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        bench_coordinator.run_round(bundle, config, sent, tmp_path)
    monkeypatch.undo()
    result = bench_coordinator.run_round(bundle, config, sent, tmp_path)
    assert result["uploads_per_s"] > 0 and result["upload_cpu_ms"]["server"] > 0


@pytest.fixture
def in_memory() -> Iterator[Path]:
    """A directory on a memory filesystem (tmpfs), where fsync costs nothing: /tmp is one on
    many systems (Debian 13's default)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        yield Path(tmp)


def test_a_round_on_a_memory_filesystem_gives_no_figure(bundle: Path, in_memory: Path) -> None:
    """Acknowledged means on disk: a database and blob directory in memory would time
    uploads whose fsyncs cost nothing. Likewise the platform's floor and the in-process
    durable path."""
    frames = bench_coordinator.int8_frames(UPDATES)
    with pytest.raises(SystemExit, match="tmpfs"):
        bench_coordinator.run_round(bundle, Config(updates=UPDATES, steered=0), frames, in_memory)
    with pytest.raises(SystemExit, match="tmpfs"):
        bench_coordinator.upload_floor(frames, in_memory, keep_alive=True)
    with pytest.raises(SystemExit, match="tmpfs"):
        bench_coordinator.durable_path(bundle, UPDATES, frames, in_memory, 1, 0)
