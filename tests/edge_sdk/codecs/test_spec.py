"""Codec specs as task plans carry them: parsing, canonical JSON, clear errors."""

from __future__ import annotations

from typing import Any

import pytest

from edge_sdk.codecs import CodecSpec, CodecSpecError


@pytest.mark.parametrize(
    ("obj", "canonical"),
    [
        ("fp16", {"name": "fp16"}),
        ({"name": "fp32"}, {"name": "fp32"}),
        ({"name": "int8"}, {"name": "int8", "bits": 8, "block": 256}),
        ({"name": "int8", "bits": 2, "block": 3}, {"name": "int8", "bits": 2, "block": 3}),
        (
            {"name": "topk", "fraction": 0.01},
            {"name": "topk", "fraction": 0.01, "values": "fp16"},
        ),
        ({"name": "topk", "k": 5, "values": "fp32"}, {"name": "topk", "k": 5, "values": "fp32"}),
        ({"name": "fp16", "entropy": True}, {"name": "fp16", "entropy": True}),
        (
            {"name": "int8", "error_feedback": True},
            {"name": "int8", "bits": 8, "block": 256, "error_feedback": True},
        ),
    ],
)
def test_parse_and_canonical_json(obj: Any, canonical: dict[str, Any]) -> None:
    spec = CodecSpec.from_json(obj)
    assert spec.to_json() == canonical
    assert CodecSpec.from_json(canonical) == spec


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (None, "must be an object"),
        (["int8"], "must be an object"),
        ({}, "needs a string 'name'"),
        ({"name": "zstd"}, "unknown codec 'zstd'"),
        ({"name": "fp16", "bits": 8}, "unknown keys for codec 'fp16': bits"),
        ({"name": "int8", "bits": 3}, "must be one of"),
        ({"name": "int8", "bits": True}, "must be an integer"),
        ({"name": "int8", "bits": 8.0}, "must be an integer"),
        ({"name": "int8", "block": 0}, "'block' must be in"),
        ({"name": "int8", "block": 1 << 21}, "'block' must be in"),
        ({"name": "topk"}, "exactly one of 'fraction' and 'k'"),
        ({"name": "topk", "fraction": 0.1, "k": 3}, "exactly one of"),
        ({"name": "topk", "fraction": 0}, "must be in \\(0, 1\\]"),
        ({"name": "topk", "fraction": 1.5}, "must be in \\(0, 1\\]"),
        ({"name": "topk", "fraction": 10**400}, "must be in \\(0, 1\\]"),
        ({"name": "topk", "fraction": float("nan")}, "must be in"),
        ({"name": "topk", "fraction": "0.1"}, "must be a number"),
        ({"name": "topk", "k": 0}, "at least 1"),
        ({"name": "topk", "k": 4, "values": "int8"}, "'values' must be one of"),
        ({"name": "topk", "k": 4, "values": 16}, "'values' must be a string"),
        ({"name": "fp32", "entropy": 1}, "must be true or false"),
        ({"name": "fp32", "error_feedback": "yes"}, "must be true or false"),
    ],
)
def test_invalid_specs_say_why(obj: Any, message: str) -> None:
    with pytest.raises(CodecSpecError, match=message):
        CodecSpec.from_json(obj)


def test_spec_error_is_a_value_error() -> None:
    assert issubclass(CodecSpecError, ValueError)


@pytest.mark.parametrize(
    ("obj", "n", "k"),
    [
        ({"name": "topk", "fraction": 0.01}, 100_000, 1000),
        ({"name": "topk", "fraction": 0.07}, 100, 7),  # 0.07 * 100 == 7.000000000000001
        ({"name": "topk", "fraction": 0.001}, 10, 1),
        ({"name": "topk", "k": 50}, 10, 10),
        ({"name": "topk", "k": 50}, 0, 0),
    ],
)
def test_topk_count(obj: dict[str, Any], n: int, k: int) -> None:
    assert CodecSpec.from_json(obj).topk_count(n) == k


def test_error_feedback_defaults_on_for_topk_only() -> None:
    assert CodecSpec.from_json({"name": "topk", "k": 1}).uses_error_feedback
    assert not CodecSpec.from_json("int8").uses_error_feedback
    assert not CodecSpec.from_json(
        {"name": "topk", "k": 1, "error_feedback": False}
    ).uses_error_feedback


def test_public_api_is_what_it_claims() -> None:
    import edge_sdk.codecs as codecs

    assert sorted(codecs.__all__) == sorted(
        name for name in vars(codecs) if not name.startswith("_") and name not in {"annotations"}
        and not isinstance(getattr(codecs, name), type(codecs))
    )  # fmt: skip
    assert set(codecs.CODECS) == {"fp32", "fp16", "int8", "topk"}
