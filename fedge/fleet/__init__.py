"""The device fleet emulator: many real SDK clients against a real coordinator, and its data.

Owns: data sets and partitioners (``datasets``, ``partition``, ``synthetic``), the
heterogeneity model (``heterogeneity``) and emulated time (``clock``), the emulated device
(``device``: the SDK client's conditions, link and trainer, emulated) and the fleet
(``emulator``), the fleet split over processes behind an engine interface (``processes``,
``running``; a Ray cluster's engine in ``ray_engine``), device data recipes a worker process
can run (``sources``), ORT loaded without its torch-importing training part (``runtime``), and
the demo's baselines (``baselines``).

Talks to the coordinator only over HTTP, through ``edge_sdk``'s client. Must not import
``coordinator`` or ``model_export`` (the demo wires those in) nor torch.
"""

from __future__ import annotations

from fedge.fleet.clock import SimClock
from fedge.fleet.datasets import Dataset, load_digits
from fedge.fleet.heterogeneity import DeviceProfile, Heterogeneity
from fedge.fleet.partition import partition
from fedge.fleet.synthetic import fedprox_synthetic

__all__ = [
    "Dataset",
    "DeviceProfile",
    "Fleet",
    "FleetSummary",
    "Heterogeneity",
    "SimClock",
    "fedprox_synthetic",
    "load_digits",
    "partition",
]


def __getattr__(name: str) -> object:
    # The emulator pulls in the SDK client; data-only users need not pay for it.
    if name in ("Fleet", "FleetSummary"):
        from fedge.fleet import emulator

        return getattr(emulator, name)
    raise AttributeError(name)
