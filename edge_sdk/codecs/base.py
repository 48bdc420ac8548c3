"""The codec interface every delta codec implements, and the errors codecs raise."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from edge_sdk.codecs.spec import CodecSpec

__all__ = ["Codec", "CodecError", "UpdateError"]


class CodecError(ValueError):
    """The encoder cannot represent this input (NaN/Inf, beyond the codec's range)."""


class UpdateError(ValueError):
    """A well-formed frame whose content is not an acceptable update: wrong length, NaN/Inf.

    Receivers map it to the ``bad_update`` error code (a structurally broken frame raises
    :class:`edge_sdk.frame.FrameError` instead: ``malformed_frame``).
    """


class Codec(ABC):
    """Turns a finite float32 vector into a frame payload and back.

    ``encode`` returns the payload AND the vector a receiver will decode from it, so that error
    feedback can keep the exact residual without decoding again. ``decode`` raises
    :class:`~edge_sdk.frame.FrameError` for a payload that does not follow the layout; it does
    not judge the values (NaN/Inf are caught once, for every codec, by the caller).
    """

    name: ClassVar[str]  # the spec name ("int8")
    frame_codec: ClassVar[int]  # the frame's codec id

    @abstractmethod
    def encode(
        self, vec: np.ndarray, spec: CodecSpec, rng: np.random.Generator
    ) -> tuple[bytes, np.ndarray]:
        """``(payload, decoded)`` for a 1-D finite float32 ``vec``."""

    @abstractmethod
    def decode(self, payload: bytes, n: int) -> np.ndarray:
        """The 1-D float32 vector of ``n`` elements a payload holds."""

    def mismatch(self, payload: bytes, spec: CodecSpec, n: int) -> str | None:
        """Why a payload of ``n`` elements that :meth:`decode` accepted was not encoded with
        ``spec``'s parameters (None if it was). Codecs without parameters have nothing to
        differ in."""
        return None
