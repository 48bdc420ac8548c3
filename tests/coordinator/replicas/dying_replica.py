"""``python -m tests.coordinator.replicas.dying_replica serve ...``: ``fedge`` whose replica
kills itself (SIGKILL: no cleanup, like a power cut) half-way through closing a round or
committing a buffer, holding that round's lock inside its transaction: it has already marked
the round closed and its assignments expired, writes that only the transaction's rollback
undoes (were they to persist, the round would never commit and the last upload's retry would
be refused)."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from coordinator.rounds.buffered import BufferedAsync
from coordinator.rounds.sync import SyncRounds
from coordinator.store import Round
from fedge.cli import main


def _die_half_way(self: SyncRounds | BufferedAsync, task: Any, plan: Any, rnd: Round,
                  *rest: Any) -> None:  # fmt: skip
    now = rest[-1]
    self.ctx.store.update_round(rnd.round_id, state="abandoned", closed_at=now)
    self.ctx.store.expire_assignments(rnd.round_id, now)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    SyncRounds._close_round = _die_half_way  # type: ignore[method-assign,assignment]
    BufferedAsync._commit_buffer = _die_half_way  # type: ignore[method-assign,assignment]
    sys.exit(main(sys.argv[1:]))
