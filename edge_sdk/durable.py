"""Making a rename or an unlink durable: fsync'ing a file's data does not make its directory
entry durable, so after a power cut a rename could be lost while later steps (another
directory's, or the coordinator's) survive. Device state writes a temporary file, fsyncs it,
renames it into place, then fsyncs the directory (:func:`write_durably`, with
:func:`fsync_dir`); the coordinator's blob store does the same with its payloads.

Imports nothing of fedge: the device's state, its codecs and the coordinator all use it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "write_durably"]


def fsync_dir(directory: Path | str) -> None:
    """Make the renames and unlinks in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``, atomically and durably once this returns: a temporary
    file beside it, fsync'ed, renamed into place, then the directory fsync'ed."""
    tmp = path.with_name(f".{path.name}.tmp")
    # A fresh file (O_EXCL) gets ``mode`` from the start; reusing a leftover tmp would keep its
    # permissions, and whoever had opened it then could read the secret before a chmod.
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
