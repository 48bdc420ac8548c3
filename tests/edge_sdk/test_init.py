"""The public API of ``edge_sdk`` is what ``__all__`` claims, and importing it stays light."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

import edge_sdk


def test_all_lists_exactly_the_exports_and_each_resolves_to_its_module() -> None:
    assert edge_sdk.__all__ == sorted(edge_sdk._EXPORTS)
    for name in edge_sdk.__all__:
        value = getattr(edge_sdk, name)
        home = importlib.import_module(edge_sdk._EXPORTS[name])
        assert getattr(home, name) is value
        assert name in dir(edge_sdk)


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Klient'"):
        edge_sdk.Klient  # noqa: B018


def _modules_after(statement: str) -> set[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def test_protocol_and_codecs_do_not_pull_in_the_client() -> None:
    # The coordinator imports these: it must not pay for the client or a runtime.
    loaded = _modules_after("import edge_sdk.protocol, edge_sdk.codecs")
    assert "edge_sdk.client" not in loaded and "edge_sdk.transport" not in loaded
    assert "onnxruntime" not in loaded


def test_the_client_imports_no_runtime_torch_aiohttp_or_coordinator() -> None:
    loaded = _modules_after("from edge_sdk import Client, AsyncClient, ScriptedConditions")
    assert "edge_sdk.client" in loaded
    forbidden = {"torch", "aiohttp", "coordinator", "model_export", "onnxruntime",
                 "ai_edge_litert", "requests"}
    assert not forbidden & {m.split(".")[0] for m in loaded}
