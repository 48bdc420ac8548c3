"""Committed test vectors (tests/vectors/*.json) against the codecs AND a second decoder.

``reference_decode`` below is written from docs/protocol.md alone, in plain Python (struct,
zlib; no numpy, nothing from ``edge_sdk``), the way a Kotlin client would be: if the docs, the
vectors and the codecs disagree anywhere, a test here fails.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.codecs import FrameError, UpdateError, decode_update, encode_update

VECTORS = Path(__file__).parents[2] / "vectors"
GOOD = sorted(p for p in VECTORS.glob("*.json") if not p.name.startswith("bad-"))
BAD = sorted(VECTORS.glob("bad-*.json"))


class Malformed(Exception):
    pass


class BadUpdate(Exception):
    pass


def f32(x: float) -> float:
    """Round a double to the nearest float32 (struct packs with round-to-nearest-even)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def reference_decode(data: bytes) -> list[float]:
    """A 1-D float32 update from a frame, following docs/protocol.md step by step."""
    if len(data) < 12:
        raise Malformed("short")
    if data[0:4] != b"FEDG" or data[4] != 1:
        raise Malformed("magic or version")
    codec, dtype, flags, ndim = data[5], data[6], data[7], data[8]
    if ndim > 8:
        raise Malformed("ndim")
    header = 12 + 4 * ndim + 4
    if len(data) < header + 4:
        raise Malformed("short")
    shape = [int.from_bytes(data[12 + 4 * i : 16 + 4 * i], "little") for i in range(ndim)]
    stored_len = int.from_bytes(data[header - 4 : header], "little")
    if len(data) != header + stored_len + 4:
        raise Malformed("length")
    if zlib.crc32(data[:-4]) != int.from_bytes(data[-4:], "little"):
        raise Malformed("crc")
    itemsize = {1: 4, 2: 2, 3: 8, 4: 1, 5: 1, 6: 4, 7: 8}.get(dtype)
    if codec not in (1, 2, 3, 4) or itemsize is None or flags & ~1 or data[9:12] != b"\0\0\0":
        raise Malformed("header field")
    if codec != 1 and dtype != 1:
        raise Malformed("non-raw codec with a dtype other than float32")
    n = math.prod(shape)
    cap = n * itemsize if codec == 1 else 8 * n + 64
    payload = data[header : header + stored_len]
    if flags & 1:
        inflater = zlib.decompressobj()
        try:
            payload = inflater.decompress(payload, cap + 1)
        except zlib.error as e:
            raise Malformed("zlib") from e
        if len(payload) > cap or not inflater.eof or inflater.unused_data:
            raise Malformed("zlib size")
    if codec == 1 and len(payload) != cap:
        raise Malformed("raw length")
    # --- an update: 1-D float32 ---
    if ndim != 1 or dtype != 1:
        raise BadUpdate("not a 1-D float32 vector")
    if codec == 1:
        out = list(struct.unpack(f"<{n}f", payload))
    elif codec == 2:
        if len(payload) != 2 * n:
            raise Malformed("fp16 length")
        out = list(struct.unpack(f"<{n}e", payload))
    elif codec == 3:
        out = _reference_qint(payload, n)
    else:
        out = _reference_topk(payload, n)
    if not all(math.isfinite(v) for v in out):
        raise BadUpdate("NaN or Inf")
    return out


def _reference_qint(p: bytes, n: int) -> list[float]:
    if len(p) < 8:
        raise Malformed("qint header")
    bits, block = p[0], int.from_bytes(p[4:8], "little")
    if bits not in (8, 4, 2) or p[1:4] != b"\0\0\0" or block < 1:
        raise Malformed("qint header")
    nb = -(-n // block)
    if len(p) != 8 + 4 * nb + -(-n * bits // 8):
        raise Malformed("qint length")
    scales = struct.unpack(f"<{nb}f", p[8 : 8 + 4 * nb])
    if any(s < 0 for s in scales):
        raise Malformed("negative scale")
    codes_at = 8 + 4 * nb
    levels = 2 ** (bits - 1) - 1
    out = []
    total_bits = (len(p) - codes_at) * 8
    for i in range(total_bits // bits):
        byte = p[codes_at + i * bits // 8]
        code = (byte >> (i * bits % 8)) & ((1 << bits) - 1)
        if i >= n:
            if code:
                raise Malformed("padding bits")
            continue
        if code > 2 * levels:
            raise Malformed("code out of range")
        # product of a small integer and a float32 is exact in a double: one rounding
        out.append(f32((code - levels) * scales[i // block]))
    return out


def _reference_topk(p: bytes, n: int) -> list[float]:
    if len(p) < 8 or p[0] not in (1, 2) or p[1:4] != b"\0\0\0":
        raise Malformed("topk header")
    k = int.from_bytes(p[4:8], "little")
    size = 4 if p[0] == 1 else 2
    if k > n or len(p) != 8 + k * (4 + size):
        raise Malformed("topk length")
    idx = struct.unpack(f"<{k}I", p[8 : 8 + 4 * k])
    values = struct.unpack(f"<{k}{'f' if size == 4 else 'e'}", p[8 + 4 * k :])
    if any(b <= a for a, b in itertools.pairwise(idx)) or (k and idx[-1] >= n):
        raise Malformed("indices")
    out = [0.0] * n
    for i, v in zip(idx, values, strict=True):
        out[i] = v
    return out


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_there_are_vectors_for_every_codec() -> None:
    names = {load(p)["spec"]["name"] for p in GOOD}
    assert names == {"fp32", "fp16", "int8", "topk"}
    assert {load(p)["spec"].get("bits", 8) for p in GOOD if "int" in p.name} == {8, 4, 2}
    assert any(load(p)["spec"].get("entropy") for p in GOOD)
    assert len(BAD) >= 15


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.stem)
def test_encoder_reproduces_the_committed_frame(path: Path) -> None:
    v = load(path)
    x = np.array([f32(t) for t in v["input"]], dtype=np.float32)
    frame, _ = encode_update(x, v["spec"], rng=np.random.default_rng(v["seed"]))
    assert frame.hex() == v["frame_hex"]


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.stem)
def test_both_decoders_agree_with_the_vector(path: Path) -> None:
    v = load(path)
    data = bytes.fromhex(v["frame_hex"])
    assert reference_decode(data) == v["decoded"]
    assert decode_update(data).tolist() == v["decoded"]


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.stem)
def test_vector_decodes_within_its_codec_bound(path: Path) -> None:
    """The committed expectation itself is sane (not just whatever the code once printed)."""
    v = load(path)
    x, got, spec = v["input"], v["decoded"], v["spec"]
    if spec["name"] == "fp32":
        assert got == x
    elif spec["name"] == "fp16":
        assert all(abs(a - b) <= max(abs(a) * 2**-11, 2**-25) for a, b in zip(x, got, strict=True))
    elif spec["name"] == "int8":
        block, levels = spec["block"], 2 ** (spec["bits"] - 1) - 1
        for i, (a, b) in enumerate(zip(x, got, strict=True)):
            start = i // block * block
            scale = max(abs(t) for t in x[start : start + block]) / levels
            assert abs(a - b) <= scale * (1 + 1e-6)
    else:
        kept = [i for i, b in enumerate(got) if b != 0]
        ranked = sorted(range(len(x)), key=lambda i: -abs(x[i]))
        assert sorted(kept) == sorted(ranked[: len(kept)])


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_vectors_are_rejected_by_both_decoders(path: Path) -> None:
    v = load(path)
    data = bytes.fromhex(v["frame_hex"])
    ours, theirs = (
        (FrameError, Malformed) if v["error"] == "malformed_frame" else (UpdateError, BadUpdate)
    )
    with pytest.raises(ours):
        decode_update(data)
    with pytest.raises(theirs):
        reference_decode(data)
