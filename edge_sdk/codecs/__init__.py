"""Delta codecs: how a device's model update is compressed into a frame and decoded back.

Owns the codec spec a task's plan names (:class:`CodecSpec`), the codecs (``fp32``, ``fp16``,
``int8`` with 8/4/2 bits and stochastic rounding, ``topk``), the optional lossless deflate
stage, error feedback and its on-device residual. Payload layouts: ``docs/protocol.md``,
"Codecs". Imports numpy, the standard library and :mod:`edge_sdk.frame` only: the coordinator
imports this package, so it must not import the client, a runtime, torch or aiohttp.

Errors: :class:`CodecSpecError` (a plan's codec is invalid), :class:`CodecError` (the encoder
cannot represent the input), :class:`~edge_sdk.frame.FrameError` (``malformed_frame``),
:class:`UpdateError` (``bad_update``); all are ``ValueError``.

>>> frame, _ = encode_update(delta, {"name": "int8", "bits": 8, "block": 256})  # doctest: +SKIP
>>> decode_update(frame, expected_length=delta.size)                            # doctest: +SKIP
"""

from __future__ import annotations

from edge_sdk.codecs.base import Codec, CodecError, UpdateError
from edge_sdk.codecs.feedback import ErrorFeedback
from edge_sdk.codecs.spec import CodecSpec, CodecSpecError
from edge_sdk.codecs.update import CODECS, DEFAULT_MAX_ELEMENTS, decode_update, encode_update
from edge_sdk.frame import FrameError

__all__ = [
    "CODECS",
    "DEFAULT_MAX_ELEMENTS",
    "Codec",
    "CodecError",
    "CodecSpec",
    "CodecSpecError",
    "ErrorFeedback",
    "FrameError",
    "UpdateError",
    "decode_update",
    "encode_update",
]
