"""Small value objects for an export: the loss and the optimizer with torch's defaults filled in.

Hyper-parameters not given take ``torch.optim``'s defaults for that optimizer, so that the same
step in torch gives the same result::

    >>> OptimizerConfig.make("adamw").to_manifest()
    {'name': 'adamw', 'lr': 0.001, 'betas': [0.9, 0.999], 'eps': 1e-08, 'weight_decay': 0.01}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["INPUT_DTYPES", "LOSSES", "OPTIMIZERS", "OptimizerConfig", "StateSpec"]

INPUT_DTYPES = ("float32", "float64", "int64")
LOSSES = ("cross_entropy", "mse", "bce")
OPTIMIZERS = ("sgd", "adamw")

# torch.optim defaults (torch 2.13): SGD(lr=1e-3, momentum=0, dampening=0, weight_decay=0,
# nesterov=False), AdamW(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2).
_DEFAULTS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 1e-3, "momentum": 0.0, "weight_decay": 0.0},
    "adamw": {"lr": 1e-3, "weight_decay": 1e-2},
}


@dataclass(frozen=True)
class StateSpec:
    """One optimizer-state tensor of the step graph: flat over the trainable parameters, or a
    scalar (``per_parameter=False``, e.g. AdamW's step count)."""

    name: str
    per_parameter: bool


@dataclass(frozen=True)
class OptimizerConfig:
    name: str
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    @classmethod
    def make(
        cls,
        name: str,
        *,
        lr: float | None = None,
        momentum: float | None = None,
        weight_decay: float | None = None,
    ) -> OptimizerConfig:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})")
        if name == "adamw" and momentum not in (None, 0.0):
            raise ValueError("momentum is an SGD option (AdamW has betas)")
        d = _DEFAULTS[name]
        cfg = cls(
            name=name,
            lr=float(d["lr"] if lr is None else lr),
            momentum=float(d.get("momentum", 0.0) if momentum is None else momentum),
            weight_decay=float(d["weight_decay"] if weight_decay is None else weight_decay),
        )
        values = (cfg.lr, cfg.momentum, cfg.weight_decay)
        # NaN passes the sign checks below and inf every one of them; either trains to NaN
        if not all(math.isfinite(v) for v in values):
            raise ValueError("lr, momentum and weight decay must be finite numbers")
        if not cfg.lr > 0 or cfg.momentum < 0 or cfg.weight_decay < 0:
            raise ValueError("lr must be > 0; momentum and weight decay must be >= 0")
        return cfg

    @property
    def state(self) -> tuple[StateSpec, ...]:
        """The optimizer state the step graph carries, in graph input order."""
        if self.name == "adamw":
            return (
                StateSpec("exp_avg", True),
                StateSpec("exp_avg_sq", True),
                StateSpec("step", False),
            )
        if self.momentum:
            return (StateSpec("momentum_buffer", True),)
        return ()

    def to_manifest(self) -> dict[str, Any]:
        if self.name == "sgd":
            return {
                "name": "sgd",
                "lr": self.lr,
                "momentum": self.momentum,
                "dampening": 0.0,
                "weight_decay": self.weight_decay,
                "nesterov": False,
            }
        return {
            "name": "adamw",
            "lr": self.lr,
            "betas": list(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }
