"""The ``litert-step`` backend (TFLite step on ai-edge-litert) against torch.

TFLite conversion takes about 15 s a bundle; the demo bundle's case runs by default (cached
under .cache/bundles after the first run), the other cases with ``--slow``.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.trainers import load_trainer
from tests.edge_sdk.trainers.trainer_suite import CASES, TrainerSuite, batch


class TestLiteRTStep(TrainerSuite):
    backend = "litert-step"
    runtime_module = "ai_edge_litert"
    tflite = True
    slow_cases = frozenset(CASES) - {"mlp-sgd"}

    def test_batch_beyond_tflite_batch_is_refused(self) -> None:
        trainer = load_trainer(self.bundle_for("mlp-sgd"), backend=self.backend)
        before = trainer.get_parameters()
        x, y = batch(trainer.manifest, 9, seed=0)  # the suite's TFLite batch is 8
        with pytest.raises(ValueError, match="at most 8"):
            trainer.train_step(x, y)
        np.testing.assert_array_equal(trainer.get_parameters(), before)
        assert trainer.evaluate(x, y)["num_examples"] == 9  # evaluation goes chunk by chunk
        assert trainer.predict(x).shape == (9, 10)
