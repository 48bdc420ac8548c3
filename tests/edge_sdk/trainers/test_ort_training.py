"""The ``ort-training`` backend (onnxruntime-training artifacts) against torch."""

from __future__ import annotations

from tests.edge_sdk.trainers.trainer_suite import TrainerSuite


class TestOrtTraining(TrainerSuite):
    backend = "ort-training"
    runtime_module = "onnxruntime.training"
    # ORT's SGD has neither momentum nor weight decay: the manifest marks these unsupported.
    unsupported = frozenset({"mlp-sgd-momentum-wd", "cnn-sgd-momentum", "mse-sgd-momentum"})
    fedprox = False
