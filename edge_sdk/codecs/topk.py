"""``topk``: keep the k largest-magnitude entries (indices + fp16 or fp32 values).

Meant for use with error feedback (:mod:`edge_sdk.codecs.feedback`): what is not sent this
round stays in the device's residual and is added to the next round's delta, so nothing is
lost in the sum over rounds, only delayed.
"""

from __future__ import annotations

import struct

import numpy as np

from edge_sdk.codecs.base import Codec, CodecError
from edge_sdk.codecs.spec import CodecSpec
from edge_sdk.frame import CODEC_TOPK, DTYPES, FrameError

__all__ = ["TopKCodec"]

_HEADER = struct.Struct("<B3sI")  # value dtype id, reserved, k
_VALUE_DTYPE_IDS = {"fp32": 1, "fp16": 2}  # the frame's dtype ids


class TopKCodec(Codec):
    name = "topk"
    frame_codec = CODEC_TOPK

    def encode(
        self, vec: np.ndarray, spec: CodecSpec, rng: np.random.Generator
    ) -> tuple[bytes, np.ndarray]:
        n = vec.size
        k = spec.topk_count(n)
        # argpartition's pick among equal magnitudes is arbitrary, which is fine: any k of the
        # tied entries are "the k largest"; the residual keeps the others.
        idx = np.sort(np.argpartition(np.abs(vec), n - k)[n - k :]) if 0 < k < n else np.arange(k)
        value_id = _VALUE_DTYPE_IDS[spec.values]
        with np.errstate(over="ignore"):
            values = vec[idx].astype(DTYPES[value_id])
        if not np.isfinite(values).all():
            raise CodecError(f"topk: a value is beyond the range of {spec.values}")
        payload = b"".join(
            [
                _HEADER.pack(value_id, b"\0\0\0", k),
                idx.astype("<u4").tobytes(),
                values.tobytes(),
            ]
        )
        decoded = np.zeros(n, dtype=np.float32)
        decoded[idx] = values
        return payload, decoded

    def decode(self, payload: bytes, n: int) -> np.ndarray:
        if len(payload) < _HEADER.size:
            raise FrameError(f"topk payload of {len(payload)} bytes is shorter than its header")
        value_id, reserved, k = _HEADER.unpack_from(payload, 0)
        if value_id not in _VALUE_DTYPE_IDS.values():
            raise FrameError(f"topk payload: value dtype id {value_id} is not fp32 (1) or fp16 (2)")
        if reserved != b"\0\0\0":
            raise FrameError("topk payload: reserved bytes are not zero")
        if k > n:
            raise FrameError(f"topk payload: k = {k} exceeds the {n} elements")
        value_dtype = DTYPES[value_id]
        expected = _HEADER.size + k * (4 + value_dtype.itemsize)
        if len(payload) != expected:
            raise FrameError(f"topk payload of {len(payload)} bytes; k = {k} needs {expected}")
        idx = np.frombuffer(payload, dtype="<u4", count=k, offset=_HEADER.size)
        if k and (int(idx[-1]) >= n or (k > 1 and (np.diff(idx.astype(np.int64)) <= 0).any())):
            raise FrameError("topk payload: indices are not strictly increasing below n")
        values = np.frombuffer(payload, dtype=value_dtype, count=k, offset=_HEADER.size + 4 * k)
        out = np.zeros(n, dtype=np.float32)
        out[idx] = values
        return out

    def mismatch(self, payload: bytes, spec: CodecSpec, n: int) -> str | None:
        value_id, _, k = _HEADER.unpack_from(payload, 0)
        values = next(name for name, i in _VALUE_DTYPE_IDS.items() if i == value_id)
        want = spec.topk_count(n)
        if (values, k) != (spec.values, want):
            return f"topk of {k} {values} values, not {want} {spec.values}"
        return None
