"""Task modes: how a task turns check-ins and uploads into model versions.

One :class:`~coordinator.rounds.base.TaskPolicy` per task mode, registered in ``POLICIES``
under the ``mode`` a task is created with. ``sync`` (:mod:`coordinator.rounds.sync`) runs
rounds with selection windows, over-selection, deadlines and commits; ``async``
(:mod:`coordinator.rounds.buffered`) folds updates as they come and commits every K (FedBuff),
with the same hooks. Must not import aiohttp.
"""

from __future__ import annotations

from coordinator.rounds.base import PolicyContext, TaskPolicy
from coordinator.rounds.buffered import BufferedAsync
from coordinator.rounds.sync import SyncRounds

POLICIES: dict[str, type[TaskPolicy]] = {
    SyncRounds.mode: SyncRounds,
    BufferedAsync.mode: BufferedAsync,
}

__all__ = ["POLICIES", "BufferedAsync", "PolicyContext", "SyncRounds", "TaskPolicy"]
