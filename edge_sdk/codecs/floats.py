"""Dense float codecs: ``fp32`` (the raw frame, lossless) and ``fp16`` (IEEE binary16)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from edge_sdk.codecs.base import Codec, CodecError
from edge_sdk.codecs.spec import CodecSpec
from edge_sdk.frame import CODEC_FP16, CODEC_RAW, FrameError

__all__ = ["Float16Codec", "Float32Codec"]


class _DenseCodec(Codec):
    wire_dtype: ClassVar[np.dtype]

    def encode(
        self, vec: np.ndarray, spec: CodecSpec, rng: np.random.Generator
    ) -> tuple[bytes, np.ndarray]:
        with np.errstate(over="ignore"):
            wire = vec.astype(self.wire_dtype)
        if not np.isfinite(wire).all():
            worst = float(np.abs(vec).max())
            raise CodecError(f"{self.name}: magnitude {worst:g} is beyond the codec's range")
        return wire.tobytes(), wire.astype(np.float32)

    def decode(self, payload: bytes, n: int) -> np.ndarray:
        if len(payload) != n * self.wire_dtype.itemsize:
            raise FrameError(f"{self.name} payload of {len(payload)} bytes for {n} elements")
        return np.frombuffer(payload, dtype=self.wire_dtype).astype(np.float32)


class Float32Codec(_DenseCodec):
    name = "fp32"
    frame_codec = CODEC_RAW
    wire_dtype = np.dtype("<f4")


class Float16Codec(_DenseCodec):
    name = "fp16"
    frame_codec = CODEC_FP16
    wire_dtype = np.dtype("<f2")
