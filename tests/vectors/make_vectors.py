"""Regenerate the committed codec test vectors: ``python tests/vectors/make_vectors.py``.

Run this only when the format changes on purpose (and bump the format version then): the
vectors pin the bytes other-language clients are written against. ``tests/edge_sdk/codecs/
test_vectors.py`` checks every vector against the codecs and against an independent reference
decoder written from ``docs/protocol.md``.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.codecs import decode_update, encode_update

HERE = Path(__file__).parent


def _input(seed: int, n: int, zero_block: slice | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Heavy-tailed like real deltas, with magnitudes over several decades.
    x = (rng.standard_t(3, n) * 10.0 ** rng.uniform(-4, -1, n)).astype(np.float32)
    if zero_block is not None:
        x[zero_block] = 0.0
    return x


GOOD: list[tuple[str, dict[str, Any], int, np.ndarray]] = [
    ("fp32", {"name": "fp32"}, 1, _input(1, 7)),
    ("fp16", {"name": "fp16"}, 2, _input(2, 9)),
    ("int8-block4", {"name": "int8", "bits": 8, "block": 4}, 3, _input(3, 14, slice(4, 8))),
    ("int4-block5", {"name": "int8", "bits": 4, "block": 5}, 4, _input(4, 13)),
    ("int2-block3", {"name": "int8", "bits": 2, "block": 3}, 5, _input(5, 11)),
    ("topk-fp16", {"name": "topk", "k": 4, "values": "fp16"}, 6, _input(6, 16)),
    ("topk-fp32", {"name": "topk", "fraction": 0.25, "values": "fp32"}, 7, _input(7, 12)),
    ("int8-entropy", {"name": "int8", "bits": 8, "block": 8, "entropy": True}, 8, _input(8, 20)),
    ("topk-entropy", {"name": "topk", "k": 3, "entropy": True}, 9, _input(9, 10)),
    ("fp32-empty", {"name": "fp32"}, 10, np.zeros(0, np.float32)),
]


def frame(
    codec: int,
    dtype: int,
    shape: tuple[int, ...],
    payload: bytes,
    *,
    flags: int = 0,
    magic: bytes = b"FEDG",
    version: int = 1,
    reserved: bytes = b"\0\0\0",
) -> bytes:
    """A frame assembled by hand, so that bad ones still carry a valid CRC."""
    body = (
        struct.pack("<4sBBBBB3s", magic, version, codec, dtype, flags, len(shape), reserved)
        + struct.pack(f"<{len(shape)}I", *shape)
        + struct.pack("<I", len(payload))
        + payload
    )
    return body + struct.pack("<I", zlib.crc32(body))


def _bad() -> list[tuple[str, str, bytes]]:
    ok = frame(1, 1, (2,), struct.pack("<2f", 1.0, 2.0))
    half_nan = np.array([1.0, np.nan], dtype="<f2").tobytes()
    qint_hdr = struct.pack("<B3sI", 4, b"\0\0\0", 4)
    return [
        ("bad-magic", "malformed_frame", b"FEDH" + ok[4:]),
        ("bad-truncated", "malformed_frame", ok[:-1]),
        ("bad-trailing", "malformed_frame", ok + b"\0"),
        ("bad-crc", "malformed_frame", ok[:-4] + bytes([ok[-4] ^ 1]) + ok[-3:]),
        ("bad-version", "malformed_frame", frame(1, 1, (2,), ok[16:24], version=2)),
        ("bad-codec", "malformed_frame", frame(9, 1, (2,), ok[16:24])),
        ("bad-dtype", "malformed_frame", frame(1, 8, (2,), ok[16:24])),
        ("bad-flags", "malformed_frame", frame(1, 1, (2,), ok[16:24], flags=0x02)),
        ("bad-reserved", "malformed_frame", frame(1, 1, (2,), ok[16:24], reserved=b"\0\1\0")),
        ("bad-raw-length", "malformed_frame", frame(1, 1, (3,), ok[16:24])),
        (
            "bad-qint-code",  # 4 bits: code 15 is invalid
            "malformed_frame",
            frame(3, 1, (2,), qint_hdr + struct.pack("<f", 0.5) + bytes([0xF7])),
        ),
        (
            "bad-qint-padding",  # 4 bits, one element: the high nibble must be 0
            "malformed_frame",
            frame(3, 1, (1,), qint_hdr + struct.pack("<f", 0.5) + bytes([0x17])),
        ),
        (
            "bad-topk-order",
            "malformed_frame",
            frame(4, 1, (5,), struct.pack("<B3sI2I2e", 2, b"\0\0\0", 2, 3, 1, 1.0, 2.0)),
        ),
        (
            "bad-topk-k",
            "malformed_frame",
            frame(4, 1, (1,), struct.pack("<B3sI2I2e", 2, b"\0\0\0", 2, 0, 1, 1.0, 2.0)),
        ),
        (
            "bad-deflate-bomb",  # 1 MiB of zeros claimed to be a 2-element fp16 tensor
            "malformed_frame",
            frame(2, 1, (2,), zlib.compress(bytes(1 << 20), 9), flags=1),
        ),
        ("bad-fp16-nan", "bad_update", frame(2, 1, (2,), half_nan)),
        (
            "bad-qint-inf-scale",
            "bad_update",
            frame(3, 1, (1,), qint_hdr + struct.pack("<f", np.inf) + bytes([0x08])),
        ),
        ("bad-not-1d", "bad_update", frame(1, 1, (1, 2), ok[16:24])),
    ]


def main() -> None:
    for old in HERE.glob("*.json"):
        old.unlink()
    for name, spec, seed, x in GOOD:
        data, _ = encode_update(x, spec, rng=np.random.default_rng(seed))
        decoded = decode_update(data)
        vector = {
            "name": name,
            "spec": spec,
            "seed": seed,
            "input": [float(v) for v in x],
            "frame_hex": data.hex(),
            "decoded": [float(v) for v in decoded],
        }
        (HERE / f"{name}.json").write_text(json.dumps(vector, indent=1) + "\n")
    for name, error, data in _bad():
        vector = {"name": name, "error": error, "frame_hex": data.hex()}
        (HERE / f"{name}.json").write_text(json.dumps(vector, indent=1) + "\n")


if __name__ == "__main__":
    main()
