"""One contract for every codec (round trips, bounds, malformed frames), then each codec's own.

Every codec runs the whole :class:`CodecContract`; a subclass states the codec's error bound
and its exact payload size from the layout in docs/protocol.md.
"""

from __future__ import annotations

import math
import struct
import tracemalloc
import zlib
from typing import Any, ClassVar

import numpy as np
import pytest

from edge_sdk.codecs import (
    CodecError,
    CodecSpec,
    FrameError,
    UpdateError,
    decode_update,
    encode_update,
)
from edge_sdk.frame import (
    CODEC_FP16,
    CODEC_QINT,
    FLAG_DEFLATE,
    decode_frame,
    encode_frame,
    encode_tensor,
)

FRAME_OVERHEAD = 12 + 4 + 4 + 4  # fixed header, one dimension, payload length, CRC


def heavy_tailed(n: int, seed: int = 0) -> np.ndarray:
    """Delta-like values: Student-t(3) tails over three decades of scale."""
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, n) * 10.0 ** rng.uniform(-4, -1, n)).astype(np.float32)


def _wire_form(spec: CodecSpec, n: int) -> tuple[Any, ...]:
    """What of a spec shows in its frames of ``n`` elements (deflate aside)."""
    if spec.name == "int8":
        return spec.name, spec.bits, spec.block
    if spec.name == "topk":
        return spec.name, spec.values, spec.topk_count(n)
    return (spec.name,)


class CodecContract:
    spec: ClassVar[dict[str, Any]]

    def check_bound(self, x: np.ndarray, decoded: np.ndarray) -> None:
        raise NotImplementedError

    def payload_size(self, n: int) -> int:
        raise NotImplementedError

    def encode(self, x: np.ndarray, seed: int = 0, **spec: Any) -> bytes:
        frame, _ = encode_update(x, {**self.spec, **spec}, rng=np.random.default_rng(seed))
        return frame

    @pytest.mark.parametrize("n", [1, 7, 1000, 4099])
    def test_round_trip_within_bound(self, n: int) -> None:
        x = heavy_tailed(n, seed=n)
        decoded = decode_update(self.encode(x), expected_length=n)
        assert decoded.dtype == np.float32 and decoded.shape == (n,)
        assert np.isfinite(decoded).all()
        self.check_bound(x, decoded)

    @pytest.mark.parametrize("n", [0, 1, 7, 1000, 4099])
    def test_size_follows_the_documented_layout(self, n: int) -> None:
        assert len(self.encode(heavy_tailed(n))) == FRAME_OVERHEAD + self.payload_size(n)

    def test_entropy_stage_is_lossless(self) -> None:
        x = np.repeat(heavy_tailed(500), 4)  # repetitive, so deflate has something to find
        plain, entropy = self.encode(x, seed=3), self.encode(x, seed=3, entropy=True)
        assert decode_frame(entropy).flags & FLAG_DEFLATE
        assert decode_frame(entropy).payload == decode_frame(plain).payload
        np.testing.assert_array_equal(decode_update(entropy), decode_update(plain))

    def test_same_seed_same_frame(self) -> None:
        x = heavy_tailed(300)
        assert self.encode(x, seed=5) == self.encode(x, seed=5)

    def test_error_feedback_keeps_what_was_not_delivered(self) -> None:
        # With feedback on, for any codec: decoded + new residual == delta + old residual.
        spec = {**self.spec, "error_feedback": True}
        rng = np.random.default_rng(1)
        residual = None
        for t in range(5):
            x = heavy_tailed(999, seed=t)
            frame, new = encode_update(x, spec, rng=rng, residual=residual)
            assert new is not None and new.dtype == np.float32
            carried = x if residual is None else x + residual
            # exact up to the float32 rounding of one subtraction
            np.testing.assert_allclose(decode_update(frame) + new, carried, rtol=0, atol=1e-8)
            residual = new

    def test_every_truncation_is_rejected(self) -> None:
        frame = self.encode(heavy_tailed(40))
        for cut in range(len(frame)):
            with pytest.raises(FrameError):
                decode_update(frame[:cut])

    def test_every_flipped_byte_is_rejected(self) -> None:
        frame = self.encode(heavy_tailed(40), entropy=True)
        for i in range(len(frame)):
            for mask in (0x01, 0x80, 0xFF):
                bad = bytearray(frame)
                bad[i] ^= mask
                with pytest.raises(FrameError):
                    decode_update(bytes(bad))

    def test_mutated_frames_with_valid_checksums_fail_cleanly(self) -> None:
        """Past the CRC (a hostile sender recomputes it): only FrameError or UpdateError."""
        rng = np.random.default_rng(7)
        frame = self.encode(heavy_tailed(40))
        for _ in range(400):
            body = bytearray(frame[:-4])
            for i in rng.integers(0, len(body), size=int(rng.integers(1, 4))):
                body[i] = int(rng.integers(0, 256))
            forged = bytes(body) + zlib.crc32(body).to_bytes(4, "little")
            try:
                out = decode_update(forged, max_elements=1000)
            except (FrameError, UpdateError):
                continue
            assert out.dtype == np.float32 and np.isfinite(out).all() and out.size <= 1000

    def test_wrong_length_is_a_bad_update(self) -> None:
        with pytest.raises(UpdateError, match="100 elements, the model has 101"):
            decode_update(self.encode(heavy_tailed(100)), expected_length=101)

    def test_only_the_specs_own_frames_pass_a_spec_check(self) -> None:
        """``decode_update(spec=...)`` takes frames of that spec, with or without the lossless
        deflate stage, and refuses every other codec spec's as a bad update."""
        x = heavy_tailed(100)
        own = CodecSpec.from_json(self.spec)
        for entropy in (False, True):
            frame = self.encode(x, entropy=entropy)
            decoded = decode_update(frame, expected_length=100, spec=own)
            np.testing.assert_array_equal(decoded, decode_update(frame))
        others = [{"name": "fp32"}, {"name": "fp16"}, {"name": "int8", "bits": 8},
                  {"name": "int8", "bits": 4}, {"name": "int8", "bits": 8, "block": 64},
                  {"name": "topk", "k": 10}, {"name": "topk", "k": 10, "values": "fp32"},
                  {"name": "topk", "fraction": 0.5}]  # fmt: skip
        for other in others:
            spec = CodecSpec.from_json(other)
            if _wire_form(spec, 100) == _wire_form(own, 100):
                continue  # the same encoding, however the spec is written
            with pytest.raises(UpdateError, match="plan's codec"):
                decode_update(self.encode(x), expected_length=100, spec=spec)

    def test_oversized_frame_is_rejected_before_decoding(self) -> None:
        with pytest.raises(FrameError, match="more than the 99 allowed"):
            decode_update(self.encode(heavy_tailed(100)), max_elements=99)

    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    def test_non_finite_input_is_refused(self, bad: float) -> None:
        x = heavy_tailed(10)
        x[3] = bad
        with pytest.raises(CodecError, match="NaN or Inf"):
            self.encode(x)

    def test_near_float32_limit_is_refused_or_exact(self) -> None:
        x = np.array([3.4e38, -3.4e38, 1.0], np.float32)
        try:
            frame = self.encode(x)
        except CodecError:
            return  # the codec cannot represent it, and says so
        assert np.isfinite(decode_update(frame)).all()

    def test_spec_without_feedback_refuses_a_residual(self) -> None:
        spec = {**self.spec, "error_feedback": False}
        _, residual = encode_update(heavy_tailed(10), spec, rng=np.random.default_rng(0))
        assert residual is None
        with pytest.raises(CodecError, match="takes no residual"):
            encode_update(heavy_tailed(10), spec, residual=np.zeros(10, np.float32))


class TestFp32(CodecContract):
    spec: ClassVar = {"name": "fp32"}

    def check_bound(self, x: np.ndarray, decoded: np.ndarray) -> None:
        np.testing.assert_array_equal(decoded, x)

    def payload_size(self, n: int) -> int:
        return 4 * n


class TestFp16(CodecContract):
    spec: ClassVar = {"name": "fp16"}

    def check_bound(self, x: np.ndarray, decoded: np.ndarray) -> None:
        # Round to nearest: half an ulp, i.e. 2^-11 relative; 2^-25 absolute below 2^-14.
        err = np.abs(decoded.astype(np.float64) - x)
        assert (err <= np.maximum(np.abs(x) * 2.0**-11, 2.0**-25)).all()

    def payload_size(self, n: int) -> int:
        return 2 * n

    def test_beyond_half_range_is_refused(self) -> None:
        with pytest.raises(CodecError, match="beyond the codec's range"):
            self.encode(np.array([1.0, 70000.0], np.float32))
        assert decode_update(self.encode(np.array([65504.0], np.float32)))[0] == 65504.0


class QuantizedContract(CodecContract):
    bits: ClassVar[int]
    block: ClassVar[int] = 64

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def scales(self, x: np.ndarray) -> np.ndarray:
        """Per element, its block's max |x| / L, computed independently in float64."""
        n = x.size
        blocks = np.zeros(-(-n // self.block) * self.block)
        blocks[:n] = np.abs(x)
        amax = blocks.reshape(-1, self.block).max(axis=1)
        return np.repeat(amax / self.levels, self.block)[:n]

    def check_bound(self, x: np.ndarray, decoded: np.ndarray) -> None:
        scale = self.scales(x)
        err = np.abs(decoded.astype(np.float64) - x)
        assert (err <= scale * (1 + 1e-6)).all()
        # decoded values sit on the grid q * s with |q| <= L
        q = np.divide(decoded, scale, out=np.zeros_like(scale), where=scale > 0)
        np.testing.assert_allclose(q, np.round(q), atol=1e-3)
        assert np.abs(np.round(q)).max() <= self.levels

    def payload_size(self, n: int) -> int:
        return 8 + 4 * math.ceil(n / self.block) + math.ceil(n * self.bits / 8)

    def setup_method(self) -> None:
        self.spec = {"name": "int8", "bits": self.bits, "block": self.block}

    def test_stochastic_rounding_is_unbiased(self) -> None:
        x = heavy_tailed(256, seed=11)
        draws = 2000
        rng = np.random.default_rng(12)
        total = np.zeros(x.size)
        for _ in range(draws):
            frame, _ = encode_update(x, self.spec, rng=rng)
            total += decode_update(frame)
        # Each draw is q*s with q one of two neighbours: std <= s/2. Round-to-nearest would
        # miss by up to s/2 on every draw, far outside this band.
        band = 5 * (self.scales(x) / 2) / math.sqrt(draws)
        assert (np.abs(total / draws - x) <= band + 1e-12).all()

    def test_zero_block_decodes_to_zero(self) -> None:
        x = heavy_tailed(3 * self.block)
        x[self.block : 2 * self.block] = 0
        decoded = decode_update(self.encode(x))
        assert not decoded[self.block : 2 * self.block].any()


class TestInt8(QuantizedContract):
    bits = 8


class TestInt4(QuantizedContract):
    bits = 4
    block = 32


class TestInt2(QuantizedContract):
    bits = 2
    block = 5  # blocks that do not divide the length or a byte of codes


class TestTopK(CodecContract):
    spec: ClassVar = {"name": "topk", "fraction": 0.05, "values": "fp16"}

    def k(self, n: int) -> int:
        return min(n, max(1, round(0.05 * n)))

    def value_size(self) -> int:
        return 2

    def check_bound(self, x: np.ndarray, decoded: np.ndarray) -> None:
        k = self.k(x.size)
        mag = np.abs(x.astype(np.float64))
        # brute force: an element is among the k largest iff fewer than k are larger
        larger = (mag[None, :] > mag[:, None]).sum(axis=1)
        top = larger < k
        assert top.sum() == k  # continuous data: no ties at the boundary
        np.testing.assert_array_equal(decoded != 0, top)
        np.testing.assert_array_equal(
            decoded[top], x[top].astype(np.dtype(f"<f{self.value_size()}")).astype(np.float32)
        )

    def payload_size(self, n: int) -> int:
        return 8 + (4 + self.value_size()) * (self.k(n) if n else 0)

    def test_error_feedback_drives_accumulated_error_to_zero(self) -> None:
        n, rounds = 2000, 400
        rng = np.random.default_rng(21)
        drift = heavy_tailed(n, seed=22)  # a consistent direction, as SGD deltas have
        true_sum = np.zeros(n)
        sums = {True: np.zeros(n), False: np.zeros(n)}
        residual = None
        relative = []
        for t in range(rounds):
            delta = (drift + 0.5 * heavy_tailed(n, seed=100 + t)).astype(np.float32)
            true_sum += delta
            frame, residual = encode_update(delta, self.spec, rng=rng, residual=residual)
            sums[True] += decode_update(frame)
            plain, _ = encode_update(delta, {**self.spec, "error_feedback": False}, rng=rng)
            sums[False] += decode_update(plain)
            relative.append(np.linalg.norm(sums[True] - true_sum) / np.linalg.norm(true_sum))
        assert residual is not None
        np.testing.assert_allclose(sums[True] + residual, true_sum, atol=1e-3)
        assert relative[-1] < 0.02 < relative[9]
        assert relative[-1] < relative[rounds // 2] < relative[rounds // 8]
        without = np.linalg.norm(sums[False] - true_sum) / np.linalg.norm(true_sum)
        # the test could fail: plain top-k loses a third of the sum and never recovers it
        assert without > 10 * relative[-1] and without > 0.2

    def test_k_spec_and_ties(self) -> None:
        x = np.array([1, -1, 1, -1, 0.5], np.float32)
        decoded = decode_update(self.encode(x, k=2, fraction=None))
        assert np.count_nonzero(decoded) == 2 and set(np.abs(decoded[decoded != 0])) == {1.0}


class TestTopKFp32(TestTopK):
    spec: ClassVar = {"name": "topk", "fraction": 0.05, "values": "fp32"}

    def value_size(self) -> int:
        return 4


class TestEntropyOnTop(CodecContract):
    """The deflate stage combined with a lossy codec still satisfies that codec's bound."""

    spec: ClassVar = {"name": "int8", "bits": 8, "block": 64, "entropy": True}

    def check_bound(self, x: np.ndarray, decoded: np.ndarray) -> None:
        TestInt8().check_bound(x, decoded)

    def payload_size(self, n: int) -> int:
        plain = decode_frame(self.encode(heavy_tailed(n), entropy=False)).payload
        return len(zlib.compress(plain, 6))  # docs: the stored payload is its zlib stream


def test_targets_on_a_100k_delta() -> None:
    """The issue's targets hold on a 100k-parameter heavy-tailed delta (benchmarked too)."""
    x = heavy_tailed(100_000)
    fp32 = len(encode_update(x, "fp32")[0])
    int8 = len(encode_update(x, {"name": "int8", "bits": 8, "block": 256})[0])
    topk = len(encode_update(x, {"name": "topk", "fraction": 0.01})[0])
    assert fp32 / int8 >= 3.9 and fp32 / topk >= 20


def test_spec_objects_and_json_are_interchangeable() -> None:
    x = heavy_tailed(50)
    spec = CodecSpec.from_json({"name": "int8", "bits": 4, "block": 16})
    assert encode_update(x, spec, rng=np.random.default_rng(0)) == encode_update(
        x, spec.to_json(), rng=np.random.default_rng(0)
    )


def test_update_frames_must_be_float32_vectors() -> None:
    with pytest.raises(UpdateError, match="1-D"):
        decode_update(encode_tensor(np.zeros((2, 2), np.float32)))
    with pytest.raises(UpdateError, match="float32"):
        decode_update(encode_tensor(np.zeros(4, np.float64)))


def test_huge_block_size_allocates_nothing_big() -> None:
    """A legal qint frame with B = 2^32 - 1 (one block) decodes without a per-block buffer."""
    payload = struct.pack("<B3sIf", 8, b"\0\0\0", 0xFFFFFFFF, 0.5) + bytes([127 + 2, 127, 0])
    frame = encode_frame(CODEC_QINT, np.float32, (3,), payload)
    tracemalloc.start()
    try:
        out = decode_update(frame)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.tolist() == [1.0, 0.0, -63.5] and peak < 1 << 20


def test_wrong_length_is_refused_before_inflating() -> None:
    """A deflated fp16 frame claiming 2^24 elements (a 32 MiB payload in 32 KiB) is a bad
    update for a 10-element model without the receiver ever inflating it."""
    bomb = encode_frame(CODEC_FP16, np.float32, (1 << 24,), bytes(2 << 24), FLAG_DEFLATE)
    assert len(bomb) < 1 << 16
    tracemalloc.start()
    try:
        with pytest.raises(UpdateError, match="16777216 elements, the model has 10"):
            decode_update(bomb, expected_length=10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
