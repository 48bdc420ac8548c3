"""fedge edge SDK: what runs on the device.

Owns: the wire protocol and tensor frame (``protocol``, ``frame``), delta codecs
(``codecs``), bundle manifests (``bundle``), training runtimes behind one interface
(``trainers``), device conditions and the eligibility policy (``conditions``), and the client
that checks in, trains and uploads (``client``, over ``transport``, ``cache``, ``data``,
``state``, ``durable``, ``local_training``, ``pool``).

Must not import: torch, aiohttp, ``coordinator``, ``model_export``. It needs numpy and one
runtime (onnxruntime, onnxruntime-training or ai-edge-litert).

The names below are the public API. They load on first use (PEP 562), so that the coordinator,
which imports ``edge_sdk.protocol`` and ``edge_sdk.codecs``, does not pay for the client, and a
device does not pay for a runtime before it trains::

    from edge_sdk import Client, default_provider

    client = Client("http://127.0.0.1:8080", state_dir="state", data=(x, y),
                    conditions=default_provider())
    outcome = client.run_once()     # Outcome(action="ineligible", reasons=("not charging",))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # the client
    "AsyncClient": "edge_sdk.client",
    "Client": "edge_sdk.client",
    "ClientConfig": "edge_sdk.client",
    "Outcome": "edge_sdk.client",
    "BundleCache": "edge_sdk.cache",
    "TrainerPool": "edge_sdk.pool",
    "RetryPolicy": "edge_sdk.transport",
    "Plan": "edge_sdk.local_training",
    # the app's data
    "ArrayDataset": "edge_sdk.data",
    "BatchStreamDataset": "edge_sdk.data",
    "Dataset": "edge_sdk.data",
    # device conditions
    "DeviceConditions": "edge_sdk.conditions",
    "EligibilityPolicy": "edge_sdk.conditions",
    "ScriptedConditions": "edge_sdk.conditions",
    "default_provider": "edge_sdk.conditions",
    # runtimes
    "Trainer": "edge_sdk.trainers.base",
    "load_trainer": "edge_sdk.trainers",
    # codecs
    "CodecSpec": "edge_sdk.codecs",
    "decode_update": "edge_sdk.codecs",
    "encode_update": "edge_sdk.codecs",
    # errors (the hierarchy is drawn in edge_sdk.errors)
    "ApiError": "edge_sdk.errors",
    "ClientError": "edge_sdk.errors",
    "ConditionsLapsed": "edge_sdk.errors",
    "TransportError": "edge_sdk.errors",
}

# Spelled out for readers and linters; a test checks it equals _EXPORTS' keys.
__all__ = [
    "ApiError",
    "ArrayDataset",
    "AsyncClient",
    "BatchStreamDataset",
    "BundleCache",
    "Client",
    "ClientConfig",
    "ClientError",
    "CodecSpec",
    "ConditionsLapsed",
    "Dataset",
    "DeviceConditions",
    "EligibilityPolicy",
    "Outcome",
    "Plan",
    "RetryPolicy",
    "ScriptedConditions",
    "Trainer",
    "TrainerPool",
    "TransportError",
    "decode_update",
    "default_provider",
    "encode_update",
    "load_trainer",
]

if TYPE_CHECKING:
    from edge_sdk.cache import BundleCache
    from edge_sdk.client import AsyncClient, Client, ClientConfig, Outcome
    from edge_sdk.codecs import CodecSpec, decode_update, encode_update
    from edge_sdk.conditions import (
        DeviceConditions,
        EligibilityPolicy,
        ScriptedConditions,
        default_provider,
    )
    from edge_sdk.data import ArrayDataset, BatchStreamDataset, Dataset
    from edge_sdk.errors import ApiError, ClientError, ConditionsLapsed, TransportError
    from edge_sdk.local_training import Plan
    from edge_sdk.pool import TrainerPool
    from edge_sdk.trainers import load_trainer
    from edge_sdk.trainers.base import Trainer
    from edge_sdk.transport import RetryPolicy


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
