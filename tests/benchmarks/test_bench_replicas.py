"""``bench_replicas``'s figures: each one run by the benchmark's own ``run`` on the test
PostgreSQL server (small rounds, real ``fedge serve`` processes), which must refuse to
produce a figure from uploads that did not do the work the figure claims."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench_replicas
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
