"""``python -m tests.coordinator.replicas.dying_replica serve ...``: ``fedge`` whose replica
kills itself (SIGKILL: no cleanup, like a power cut) the moment it starts to close a round or
commit a buffer, holding that round's lock inside its transaction."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from coordinator.rounds.buffered import BufferedAsync
from coordinator.rounds.sync import SyncRounds
from fedge.cli import main


def _die(*args: Any, **kwargs: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    SyncRounds._close_round = _die  # type: ignore[method-assign]
    BufferedAsync._commit_buffer = _die  # type: ignore[method-assign]
    sys.exit(main(sys.argv[1:]))
