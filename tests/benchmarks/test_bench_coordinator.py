"""``bench_coordinator``'s rounds, run small by the benchmark's own ``run_round`` (a real
``fedge serve`` subprocess): a round gives figures only once it committed what was sent."""

from __future__ import annotations

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
