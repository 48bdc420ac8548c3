"""The server side of SecAgg+ (Bell et al. 2020): one round's state machine, stage by stage.

:mod:`coordinator.secagg.session` holds :class:`~coordinator.secagg.session.SecAggSession`:
the cohort, the neighbour graph, what each stage accepted, and the unmasking of the
survivors' sum. It sees public keys, share ciphertexts it cannot open, masked vectors, and at
the last stage the shares that let it remove the masks of the sum only. The primitives come
from :mod:`edge_sdk.secagg`; nothing here touches HTTP or the store.
"""

from __future__ import annotations

from coordinator.secagg.session import STAGES, SecAggResult, SecAggSession

__all__ = ["STAGES", "SecAggResult", "SecAggSession"]
