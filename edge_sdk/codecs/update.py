"""Encoding a model delta into a frame and decoding it back, with optional error feedback."""

from __future__ import annotations

from typing import Any, Final

import numpy as np

from edge_sdk.codecs.base import Codec, CodecError, UpdateError
from edge_sdk.codecs.floats import Float16Codec, Float32Codec
from edge_sdk.codecs.quantize import QuantizedCodec
from edge_sdk.codecs.spec import CodecSpec
from edge_sdk.codecs.topk import TopKCodec
from edge_sdk.frame import FLAG_DEFLATE, decode_frame, encode_frame

__all__ = ["CODECS", "DEFAULT_MAX_ELEMENTS", "decode_update", "encode_update"]

# 64 Mi float32 elements = 256 MiB decoded: far above any model meant for a phone, and the
# bound a receiver applies when it does not know the expected length.
DEFAULT_MAX_ELEMENTS: Final = 1 << 26

CODECS: Final[dict[str, Codec]] = {
    c.name: c for c in (Float32Codec(), Float16Codec(), QuantizedCodec(), TopKCodec())
}
_BY_FRAME_CODEC: Final = {c.frame_codec: c for c in CODECS.values()}


def _spec(spec: CodecSpec | dict[str, Any] | str) -> CodecSpec:
    return spec if isinstance(spec, CodecSpec) else CodecSpec.from_json(spec)


def encode_update(
    vec: np.ndarray,
    spec: CodecSpec | dict[str, Any] | str,
    *,
    rng: np.random.Generator | None = None,
    residual: np.ndarray | None = None,
) -> tuple[bytes, np.ndarray | None]:
    """``(frame, new_residual)`` for a flat delta.

    With error feedback (the spec's ``uses_error_feedback``: top-k by default) the codec sees
    ``vec + residual`` and ``new_residual`` is what it did not deliver, to be kept on the
    device for the next round (``residual=None`` means zeros); without it ``new_residual`` is
    None and ``residual`` must be None. ``rng`` drives stochastic rounding (fresh entropy if
    None).
    """
    spec = _spec(spec)
    v = np.asarray(vec, dtype=np.float32).reshape(-1)
    if not np.isfinite(v).all():
        raise CodecError("the update holds NaN or Inf")
    feedback = spec.uses_error_feedback
    if residual is not None:
        if not feedback:
            raise CodecError(f"codec {spec.name} without error feedback takes no residual")
        r = np.asarray(residual, dtype=np.float32).reshape(-1)
        if r.shape != v.shape or not np.isfinite(r).all():
            raise CodecError(f"residual of shape {r.shape} (finite?) does not fit {v.shape}")
        v = v + r
    codec = CODECS[spec.name]
    payload, decoded = codec.encode(v, spec, rng if rng is not None else np.random.default_rng())
    if not np.isfinite(decoded).all():  # magnitudes near float32's limit; never send those
        raise CodecError(f"{spec.name}: the update is beyond what the codec can represent")
    frame = encode_frame(
        codec.frame_codec, np.float32, (v.size,), payload, FLAG_DEFLATE if spec.entropy else 0
    )
    return frame, (v - decoded if feedback else None)


def decode_update(
    data: bytes | bytearray | memoryview,
    *,
    expected_length: int | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    spec: CodecSpec | dict[str, Any] | str | None = None,
) -> np.ndarray:
    """The float32 delta a frame holds.

    Raises :class:`~edge_sdk.frame.FrameError` for a frame that is broken (``malformed_frame``)
    and :class:`UpdateError` for one that is sound but not an acceptable update: not 1-D, the
    wrong length, NaN or Inf, or (with ``spec``) encoded with another codec or other codec
    parameters than ``spec`` asks for (``bad_update``); the deflate stage, lossless, may be
    used or not. Nothing is allocated beyond the header's claim until that claim is checked
    against ``max_elements`` and ``expected_length``.
    """

    def check_header(dtype: np.dtype, shape: tuple[int, ...]) -> None:
        # Before inflating: a deflated frame of the wrong length must not get to allocate.
        if len(shape) != 1:
            raise UpdateError(f"an update is a 1-D vector, this frame has shape {shape}")
        if expected_length is not None and shape[0] != expected_length:
            raise UpdateError(f"update has {shape[0]} elements, the model has {expected_length}")
        if dtype != np.float32:
            raise UpdateError(f"an update is float32, this frame holds {dtype}")

    frame = decode_frame(data, max_elements=max_elements, check_header=check_header)
    codec = _BY_FRAME_CODEC[frame.codec]
    wanted = None if spec is None else _spec(spec)
    # A task's plan fixes the codec: an update in another one (fp32 where int8 was asked for,
    # another quantization, more top-k entries) would change what the round aggregates and
    # what each device sends, behind the operator's back.
    if wanted is not None and codec.name != wanted.name:
        raise UpdateError(f"update is encoded {codec.name}, the plan's codec is {wanted.name}")
    out = codec.decode(frame.payload, frame.shape[0])
    if wanted is not None:
        why = codec.mismatch(frame.payload, wanted, frame.shape[0])
        if why is not None:
            raise UpdateError(f"update is encoded {why} as the plan's codec asks")
    if not np.isfinite(out).all():
        raise UpdateError("update decodes to NaN or Inf")
    return out
