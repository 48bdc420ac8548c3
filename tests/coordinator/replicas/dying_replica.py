"""``python -m tests.coordinator.replicas.dying_replica serve ...``: ``fedge`` whose replica
kills itself (SIGKILL: no cleanup, like a power cut) at a chosen step.

By default it dies half-way through closing a round or committing a buffer, holding that
round's lock inside its transaction: it has already marked the round closed and its
assignments expired, writes that only the transaction's rollback undoes (were they to
persist, the round would never commit and the last upload's retry would be refused).

With ``--die-after STEP FILE`` (anywhere in the arguments) it dies instead right after one
of an upload batch's durable steps (:data:`STEPS`), and only once: the process that removes
``FILE`` dies, the others (and a replacement started later) go on. With ``--processes K``
every serving child carries the patch: a spawned child imports this module again, as
``__mp_main__``, with the supervisor's arguments."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordinator.replicas import Replica
from coordinator.rounds.buffered import BufferedAsync
from coordinator.rounds.sync import SyncRounds
from coordinator.service import Coordinator
from coordinator.store import Round
from fedge.cli import main

# Where an upload batch can die, in the order of its steps (owner, method: dies once it
# returned).
STEPS: dict[str, tuple[type, str]] = {
    "installed": (Coordinator, "install_uploads"),  # payloads fsynced and renamed, no row yet
    "flushed": (Replica, "flush"),  # rows and partial sums written, the transaction open
    "committed": (Coordinator, "accept_uploads"),  # committed, no answer sent
}


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _die_half_way(self: SyncRounds | BufferedAsync, task: Any, plan: Any, rnd: Round,
                  *rest: Any) -> None:  # fmt: skip
    now = rest[-1]
    self.ctx.store.update_round(rnd.round_id, state="abandoned", closed_at=now)
    self.ctx.store.expire_assignments(rnd.round_id, now)
    _die()


def _dying_after(method: Callable[..., Any], trigger: Path) -> Callable[..., Any]:
    def step(*args: Any, **kwargs: Any) -> Any:
        result = method(*args, **kwargs)
        try:
            trigger.unlink()  # the one process that removes it dies
        except FileNotFoundError:
            return result
        _die()

    return step


def _install(argv: list[str]) -> list[str]:
    """Patch the step ``argv`` names in; ``argv`` without this module's option."""
    if "--die-after" not in argv:
        SyncRounds._close_round = _die_half_way  # type: ignore[method-assign,assignment]
        BufferedAsync._commit_buffer = _die_half_way  # type: ignore[method-assign,assignment]
        return argv
    i = argv.index("--die-after")
    owner, name = STEPS[argv[i + 1]]
    setattr(owner, name, _dying_after(getattr(owner, name), Path(argv[i + 2])))
    return argv[:i] + argv[i + 3 :]


if __name__ in ("__main__", "__mp_main__"):
    _argv = _install(sys.argv[1:])
    if __name__ == "__main__":
        sys.exit(main(_argv))
