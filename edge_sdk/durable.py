"""Making a rename or an unlink durable: fsync'ing a file's data does not make its directory
entry durable, so after a power cut a rename could be lost while later steps (another
directory's, or the coordinator's) survive. Device state writes a temporary file, fsyncs it,
renames it into place, then fsyncs the directory with :func:`fsync_dir`; the coordinator's
blob store does the same with its payloads.

Imports nothing of fedge: the device's state, its codecs and the coordinator all use it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir"]


def fsync_dir(directory: Path | str) -> None:
    """Make the renames and unlinks in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
