"""The codec spec: which codec a task's plan asks for, parsed and validated from its JSON.

The coordinator validates task plans with :meth:`CodecSpec.from_json`; devices read the same
JSON from their assignment. Forms (every key but ``name`` optional)::

    {"name": "fp32"}
    {"name": "fp16"}
    {"name": "int8", "bits": 8, "block": 256}           # bits: 8, 4 or 2
    {"name": "topk", "fraction": 0.01, "values": "fp16"}  # or "k": 1000 instead of fraction
    ... any of them plus "entropy": true                 # lossless deflate stage
    ... any of them plus "error_feedback": true|false    # default true for topk only
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["CODEC_NAMES", "CodecSpec", "CodecSpecError"]

CODEC_NAMES: Final = ("fp32", "fp16", "int8", "topk")
QINT_BITS: Final = (8, 4, 2)
TOPK_VALUES: Final = ("fp32", "fp16")
MAX_BLOCK: Final = 1 << 20

_COMMON_KEYS: Final = {"name", "entropy", "error_feedback"}
_KEYS: Final = {
    "fp32": _COMMON_KEYS,
    "fp16": _COMMON_KEYS,
    "int8": _COMMON_KEYS | {"bits", "block"},
    "topk": _COMMON_KEYS | {"fraction", "k", "values"},
}


class CodecSpecError(ValueError):
    """A codec spec that is malformed: unknown codec or key, wrong type, value out of range."""


def _int(obj: dict[str, Any], key: str, default: int) -> int:
    value = obj.get(key, default)
    # bool is an int in Python; a spec saying "bits": true is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise CodecSpecError(f"codec {key!r} must be an integer, got {value!r}")
    return value


def _bool(obj: dict[str, Any], key: str, default: bool) -> bool:
    value = obj.get(key, default)
    if not isinstance(value, bool):
        raise CodecSpecError(f"codec {key!r} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class CodecSpec:
    """A validated codec choice. Build it with :meth:`from_json` or the constructor."""

    name: str = "fp32"
    bits: int = 8
    block: int = 256
    fraction: float | None = None
    k: int | None = None
    values: str = "fp16"
    entropy: bool = False
    error_feedback: bool | None = None  # None: the codec's default (on for topk only)

    def __post_init__(self) -> None:
        if self.name not in CODEC_NAMES:
            raise CodecSpecError(f"unknown codec {self.name!r}; known: {', '.join(CODEC_NAMES)}")
        if self.name == "int8":
            if self.bits not in QINT_BITS:
                raise CodecSpecError(f"int8 'bits' must be one of {QINT_BITS}, got {self.bits}")
            if not 1 <= self.block <= MAX_BLOCK:
                raise CodecSpecError(f"int8 'block' must be in 1..{MAX_BLOCK}, got {self.block}")
        if self.name == "topk":
            if (self.fraction is None) == (self.k is None):
                raise CodecSpecError("topk needs exactly one of 'fraction' and 'k'")
            if self.fraction is not None and not (
                math.isfinite(self.fraction) and 0.0 < self.fraction <= 1.0
            ):
                raise CodecSpecError(f"topk 'fraction' must be in (0, 1], got {self.fraction}")
            if self.k is not None and self.k < 1:
                raise CodecSpecError(f"topk 'k' must be at least 1, got {self.k}")
            if self.values not in TOPK_VALUES:
                raise CodecSpecError(f"topk 'values' must be one of {TOPK_VALUES}")

    @classmethod
    def from_json(cls, obj: Any) -> CodecSpec:
        """Parse a plan's ``codec`` object (a dict, or a bare codec name string)."""
        if isinstance(obj, str):
            obj = {"name": obj}
        if not isinstance(obj, dict):
            raise CodecSpecError(f"codec must be an object like {{'name': 'int8'}}, got {obj!r}")
        name = obj.get("name")
        if not isinstance(name, str):
            raise CodecSpecError("codec needs a string 'name'")
        if name not in _KEYS:
            raise CodecSpecError(f"unknown codec {name!r}; known: {', '.join(CODEC_NAMES)}")
        unknown = set(obj) - _KEYS[name]
        if unknown:
            raise CodecSpecError(f"unknown keys for codec {name!r}: {', '.join(sorted(unknown))}")
        fraction = obj.get("fraction")
        if fraction is not None and (
            isinstance(fraction, bool) or not isinstance(fraction, int | float)
        ):
            raise CodecSpecError(f"topk 'fraction' must be a number, got {fraction!r}")
        if isinstance(fraction, int) and abs(fraction) > 1:
            # An integer beyond 1 is out of range anyway, and a huge one overflows float().
            raise CodecSpecError(f"topk 'fraction' must be in (0, 1], got {fraction}")
        k = _int(obj, "k", 0) if "k" in obj else None
        values = obj.get("values", "fp16")
        if not isinstance(values, str):
            raise CodecSpecError(f"topk 'values' must be a string, got {values!r}")
        ef = obj.get("error_feedback")
        return cls(
            name=name,
            bits=_int(obj, "bits", 8),
            block=_int(obj, "block", 256),
            fraction=None if fraction is None else float(fraction),
            k=k,
            values=values,
            entropy=_bool(obj, "entropy", False),
            error_feedback=None if ef is None else _bool(obj, "error_feedback", False),
        )

    def to_json(self) -> dict[str, Any]:
        """The canonical JSON form (only the keys that apply to this codec)."""
        out: dict[str, Any] = {"name": self.name}
        if self.name == "int8":
            out.update(bits=self.bits, block=self.block)
        if self.name == "topk":
            out.update({"fraction": self.fraction} if self.k is None else {"k": self.k})
            out["values"] = self.values
        if self.entropy:
            out["entropy"] = True
        if self.error_feedback is not None:
            out["error_feedback"] = self.error_feedback
        return out

    @property
    def uses_error_feedback(self) -> bool:
        return self.name == "topk" if self.error_feedback is None else self.error_feedback

    def topk_count(self, n: int) -> int:
        """How many entries a top-k frame of an ``n``-element vector keeps."""
        if self.k is not None:
            return min(self.k, n)
        assert self.fraction is not None
        # round, not ceil: 0.07 * 100 is 7.000000000000001 in floating point.
        return min(n, max(1, round(self.fraction * n))) if n else 0
