"""fedge edge SDK: what runs on the device.

Owns: the wire protocol and tensor frame (``protocol``, ``frame``), delta codecs
(``codecs``), bundle manifests (``bundle``), training runtimes behind one interface
(``trainers``), device conditions and the eligibility policy (``conditions``), and the client
that checks in, trains and uploads (``client``).

Must not import: torch, aiohttp's server, ``coordinator``, ``model_export``. It needs numpy and
one runtime (onnxruntime, onnxruntime-training or ai-edge-litert).
"""

from __future__ import annotations

from edge_sdk.trainers import load_trainer

__all__ = ["load_trainer"]
