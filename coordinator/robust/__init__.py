"""Robust aggregation: what a task does so that a few hostile devices cannot steer its model.

Owns the plan's ``robust`` object (:mod:`~coordinator.robust.spec`), the per-device weight
cap and the adaptive update-norm clipping bound (:mod:`~coordinator.robust.clipping`), the
robust aggregators over a matrix of updates read in coordinate chunks
(:mod:`~coordinator.robust.aggregators`), the check that drops updates pointing away from
their median (:mod:`~coordinator.robust.agreement`), and the one step both task modes call when they
commit (:mod:`~coordinator.robust.commit`): read the aggregated updates back from the blob
store, weigh, clip and combine them, and say what the next clipping bound is.

The server optimizers (FedAvg, FedAdam, ...) stay in :mod:`coordinator.aggregation`; this
package only decides the delta they are given.
"""

from __future__ import annotations

from coordinator.robust.spec import AGGREGATORS, AgreementSpec, ClipSpec, RobustSpec

__all__ = ["AGGREGATORS", "AgreementSpec", "ClipSpec", "RobustSpec"]
