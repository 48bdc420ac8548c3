"""``int8`` (and 4- and 2-bit): symmetric per-block quantization with stochastic rounding.

Each block of ``block`` consecutive elements gets one float32 scale ``s = max|x| / L`` with
``L = 2**(bits-1) - 1`` (rounded up so that ``|x| / s <= L`` holds in float32). An element is
coded as ``q = floor(x / s + u)``, ``u ~ U[0, 1)``: ``E[q * s] = x`` (unbiased, so averaging
many devices' updates cancels the rounding) and ``|q * s - x| < s``. Codes travel as the
unsigned ``q + L`` packed LSB-first (``bits`` bits each); the all-ones code is invalid.
"""

from __future__ import annotations

import struct

import numpy as np

from edge_sdk.codecs.base import Codec
from edge_sdk.codecs.spec import QINT_BITS, CodecSpec
from edge_sdk.frame import CODEC_QINT, FrameError

__all__ = ["QuantizedCodec", "pack_codes", "unpack_codes"]

_HEADER = struct.Struct("<B3sI")  # bits, reserved, block


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned codes (< 2**bits) LSB-first, ``8 // bits`` to a byte, zero padded."""
    per_byte = 8 // bits
    padded = np.zeros(-(-codes.size // per_byte) * per_byte, dtype=np.uint8)
    padded[: codes.size] = codes
    lanes = padded.reshape(-1, per_byte)
    packed = np.zeros(lanes.shape[0], dtype=np.uint8)
    for lane in range(per_byte):
        packed |= lanes[:, lane] << np.uint8(lane * bits)
    return packed.tobytes()


def unpack_codes(packed: bytes | memoryview, bits: int, n: int) -> np.ndarray:
    """The first ``n`` codes; raise FrameError if the padding bits are not zero."""
    per_byte = 8 // bits
    raw = np.frombuffer(packed, dtype=np.uint8)
    if per_byte == 1:  # one code a byte, no padding: the bytes are the codes (no copy)
        return raw[:n]
    mask = np.uint8((1 << bits) - 1)
    lanes = np.empty((raw.size, per_byte), dtype=np.uint8)
    for lane in range(per_byte):
        np.bitwise_and(raw >> np.uint8(lane * bits), mask, out=lanes[:, lane])
    codes = lanes.reshape(-1)
    if codes[n:].any():
        raise FrameError("int8 payload: padding bits after the last code are not zero")
    return codes[:n]


class QuantizedCodec(Codec):
    name = "int8"
    frame_codec = CODEC_QINT

    def encode(
        self, vec: np.ndarray, spec: CodecSpec, rng: np.random.Generator
    ) -> tuple[bytes, np.ndarray]:
        bits, block = spec.bits, spec.block
        levels = (1 << (bits - 1)) - 1
        n = vec.size
        nblocks = -(-n // block)
        flat = np.zeros(nblocks * block, dtype=np.float32)
        flat[:n] = vec
        blocks = flat.reshape(nblocks, block)
        amax = np.abs(blocks).max(axis=1) if nblocks else np.zeros(0, np.float32)
        scale = (amax / np.float32(levels)).astype(np.float32)
        # float32 division can round down; the scale must satisfy |x| <= L * s exactly, which
        # float64 checks without rounding (a 24-bit significand times L < 2^7).
        short = scale.astype(np.float64) * levels < amax.astype(np.float64)
        scale[short] = np.nextafter(scale[short], np.float32(np.inf))
        safe = np.where(scale > 0, scale, np.float32(1)).astype(np.float64)
        ratio = blocks.astype(np.float64) / safe[:, None]
        q = np.floor(ratio + rng.random(ratio.shape)).astype(np.int64)
        # Guards float64 rounding at the edges only; |ratio| <= L makes q stay in range.
        np.clip(q, -levels, levels, out=q)
        q = q.reshape(-1)[:n]
        payload = b"".join(
            [
                _HEADER.pack(bits, b"\0\0\0", block),
                scale.astype("<f4").tobytes(),
                pack_codes((q + levels).astype(np.uint8), bits),
            ]
        )
        return payload, _dequantize(q.astype(np.float32), scale, block)

    def decode(self, payload: bytes, n: int) -> np.ndarray:
        if len(payload) < _HEADER.size:
            raise FrameError(f"int8 payload of {len(payload)} bytes is shorter than its header")
        bits, reserved, block = _HEADER.unpack_from(payload, 0)
        if bits not in QINT_BITS:
            raise FrameError(f"int8 payload: bits {bits} not in {QINT_BITS}")
        if reserved != b"\0\0\0":
            raise FrameError("int8 payload: reserved bytes are not zero")
        if block < 1:
            raise FrameError("int8 payload: block size 0")
        nblocks = -(-n // block)
        code_bytes = -(-n * bits // 8)
        expected = _HEADER.size + 4 * nblocks + code_bytes
        if len(payload) != expected:
            raise FrameError(
                f"int8 payload of {len(payload)} bytes; {n} elements at {bits} bits in blocks of "
                f"{block} need {expected}"
            )
        scale = np.frombuffer(payload, dtype="<f4", count=nblocks, offset=_HEADER.size)
        if (scale < 0).any():
            raise FrameError("int8 payload: negative scale")
        levels = (1 << (bits - 1)) - 1
        codes = unpack_codes(memoryview(payload)[_HEADER.size + 4 * nblocks :], bits, n)
        if n and codes.max() > 2 * levels:
            raise FrameError(f"int8 payload: code {int(codes.max())} above {2 * levels}")
        q = np.subtract(codes, np.float32(levels), dtype=np.float32)
        return _dequantize(q, scale, block)

    def mismatch(self, payload: bytes, spec: CodecSpec, n: int) -> str | None:
        bits, _, block = _HEADER.unpack_from(payload, 0)
        if (bits, block) != (spec.bits, spec.block):
            return f"int8 with {bits} bits in blocks of {block}, not {spec.bits} in {spec.block}"
        return None


def _dequantize(q: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    """``q * scale`` per block, in float32 (in place: ``q`` is a float32 scratch vector).

    Whole blocks broadcast their scale over a (blocks, block) view, the short last block
    apart: nothing is allocated per block, so a hostile frame with ``block = 2**32 - 1``
    cannot make the receiver allocate more than its elements."""
    scale = scale.astype(np.float32, copy=False)
    whole = q.size // block
    body = q[: whole * block].reshape(whole, block)
    with np.errstate(over="ignore", invalid="ignore"):
        np.multiply(body, scale[:whole, None], out=body)
        if whole * block < q.size:
            q[whole * block :] *= scale[whole]
    return q
