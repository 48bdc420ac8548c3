"""The on-device error-feedback residual: persisted, and never able to break a round."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.codecs import ErrorFeedback, decode_update, encode_update


def test_save_load_round_trip(tmp_path: Path) -> None:
    ef = ErrorFeedback(tmp_path / "state" / "t1.npy")
    assert ef.load(5) is None
    r = np.array([0.5, -1e-8, 0, 3, 7], np.float32)
    ef.save(r)
    np.testing.assert_array_equal(ef.load(5), r)
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["t1.npy"]  # no temp left over
    ef.save(None)
    assert ef.load(5) is None and not ef.path.exists()


def test_residual_survives_a_restart_between_rounds(tmp_path: Path) -> None:
    """Two rounds through the file equal two rounds in memory."""
    spec = {"name": "topk", "k": 3}
    deltas = [np.random.default_rng(s).normal(size=50).astype(np.float32) for s in (1, 2)]
    in_memory = None
    for d in deltas:
        frame_mem, in_memory = encode_update(d, spec, residual=in_memory)
        frame_disk, new = encode_update(
            d, spec, residual=ErrorFeedback(tmp_path / "r.npy").load(50)
        )
        ErrorFeedback(tmp_path / "r.npy").save(new)
        np.testing.assert_array_equal(decode_update(frame_disk), decode_update(frame_mem))


@pytest.mark.parametrize(
    "content",
    [
        b"not a numpy file",
        b"",
    ],
)
def test_unreadable_file_means_start_from_zero(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "r.npy"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert ErrorFeedback(path).load(3) is None
    assert "ignoring unreadable" in caplog.text


def test_pickled_object_array_is_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "r.npy"
    np.save(path, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    assert ErrorFeedback(path).load(1) is None


@pytest.mark.parametrize(
    "stored",
    [
        np.zeros(4, np.float32),  # model changed size
        np.zeros(3, np.float64),
        np.zeros((3, 1), np.float32),
        np.array([0, np.nan, 0], np.float32),
    ],
)
def test_mismatched_residual_is_ignored(tmp_path: Path, stored: np.ndarray) -> None:
    path = tmp_path / "r.npy"
    np.save(path, stored, allow_pickle=False)
    assert ErrorFeedback(path).load(3) is None
