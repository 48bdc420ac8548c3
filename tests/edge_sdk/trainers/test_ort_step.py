"""The ``ort-step`` backend (portable step graph on onnxruntime) against torch."""

from __future__ import annotations

from tests.edge_sdk.trainers.trainer_suite import TrainerSuite


class TestOrtStep(TrainerSuite):
    backend = "ort-step"
    runtime_module = "onnxruntime"
