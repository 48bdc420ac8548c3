"""The error-feedback residual a device keeps between rounds, persisted to one ``.npy`` file."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np

from edge_sdk.durable import write_durably

__all__ = ["ErrorFeedback"]

log = logging.getLogger(__name__)


class ErrorFeedback:
    """Load and save the residual of one task on this device.

    ``load`` never fails the round: a missing, unreadable or mismatched file (say, the task's
    model changed size) means starting from zeros, i.e. ``None``, and is logged.

    >>> ef = ErrorFeedback(state_dir / "task-t1.residual.npy")          # doctest: +SKIP
    >>> frame, residual = encode_update(delta, spec, residual=ef.load(delta.size))
    >>> ef.save(residual)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self, length: int) -> np.ndarray | None:
        try:
            # allow_pickle=False: the file is data only; a pickle in it must never execute.
            residual = np.load(self.path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
            log.warning("ignoring unreadable error-feedback residual %s: %s", self.path, e)
            return None
        if residual.dtype != np.float32 or residual.shape != (length,):
            log.warning(
                "ignoring error-feedback residual %s: %s %s, expected float32 (%d,)",
                self.path,
                residual.dtype,
                residual.shape,
                length,
            )
            return None
        if not np.isfinite(residual).all():
            log.warning("ignoring error-feedback residual %s: NaN or Inf", self.path)
            return None
        return residual

    def save(self, residual: np.ndarray | None) -> None:
        """Replace the stored residual atomically and durably (``None`` clears it)."""
        if residual is None:
            self.clear()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        out = io.BytesIO()
        # allow_pickle=False: never write an object array that would need pickle to load.
        np.save(out, np.asarray(residual, dtype=np.float32).reshape(-1), allow_pickle=False)
        # Durable before the caller goes on: a pending upload's commit removes the upload
        # next, which must not survive a power cut that this write does not.
        write_durably(self.path, out.getvalue())

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
