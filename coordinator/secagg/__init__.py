"""The server side of SecAgg+ (Bell et al. 2020): each sync round's state machine, stage by
stage, held durably and served over HTTP.

:mod:`coordinator.secagg.session` holds :class:`~coordinator.secagg.session.SecAggSession`:
the cohort, the neighbour graph, what each stage accepted, and the unmasking of the
survivors' sum. It sees public keys, share ciphertexts it cannot open, masked vectors, and at
the last stage the shares that let it remove the masks of the sum only. The primitives come
from :mod:`edge_sdk.secagg`; the session touches neither HTTP nor the store.

Around it: :mod:`coordinator.secagg.spec` (the plan's ``secagg`` key),
:mod:`coordinator.secagg.rounds` (a sync round's session, stored event by event before it is
applied, and rebuilt from the store), :mod:`coordinator.secagg.routes` (the HTTP calls),
:mod:`coordinator.secagg.dp` (distributed DP: a plan's ``dp`` with ``secagg``, the devices'
noise, the ring's headroom for it, and a committed round's privacy cost; privacy extra).
"""

from __future__ import annotations

from coordinator.secagg.session import STAGES, SecAggResult, SecAggSession

__all__ = ["STAGES", "SecAggResult", "SecAggSession"]
