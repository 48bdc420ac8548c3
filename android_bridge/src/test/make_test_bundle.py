"""Regenerate the small bundle the Kotlin tests train on (``resources/bundle/``):
``.venv/bin/python android_bridge/src/test/make_test_bundle.py``.

The demo model (DigitsMLP 64-32-10, SGD, cross-entropy) exported without ORT training
artifacts: ``manifest.json``, ``params.f32`` and the portable step, eval and inference graphs.
Rerun it when the bundle format changes; the Kotlin tests need no Python to run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fedge.bundle_cache import DIGITS_BUNDLE_ARGS, DIGITS_MODEL, cached_bundle

OUT = Path(__file__).parent / "resources" / "bundle"


def main() -> None:
    bundle = cached_bundle(DIGITS_MODEL, **DIGITS_BUNDLE_ARGS, ort_training=False)
    if OUT.exists():
        shutil.rmtree(OUT)
    shutil.copytree(bundle, OUT)


if __name__ == "__main__":
    main()
