"""Streaming aggregation and the server optimizers.

Each accepted update (a delta: client parameters minus the round's base parameters) is folded
into a :class:`RunningSum` as soon as it arrives, weighted by its example count; memory is
O(model size) whatever the number of reports. At commit the weighted mean delta ``Δ`` is
handed to the task's server optimizer, which moves the parameters ``x`` (Reddi et al.,
"Adaptive Federated Optimization", 2021; Hsu et al. 2019 for momentum)::

    FedAvg    x ← x + η Δ
    FedAvgM   m ← μ m + Δ;                          x ← x + η m
    FedAdam   m ← β₁ m + (1-β₁) Δ;  v ← β₂ v + (1-β₂) Δ²;               x ← x + η m / (√v + τ)
    FedYogi   m ← β₁ m + (1-β₁) Δ;  v ← v - (1-β₂) Δ² sign(v - Δ²);     x ← x + η m / (√v + τ)

with ``m₀ = 0`` and ``v₀ = τ²`` (the paper's initialisation), no bias correction. State
vectors are kept in float64 between rounds; parameters are float32.

Which ``Δ`` a commit hands over is the task plan's ``robust`` choice
(:mod:`coordinator.robust`): this streaming mean for undefended FedAvg, else the updates read
back with capped weights and clipped norms, or their median, trimmed mean or multi-Krum.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from coordinator.validation import Fields

__all__ = [
    "OPTIMIZERS",
    "RunningSum",
    "ServerOptimizer",
    "ServerOptimizerSpec",
    "make_server_optimizer",
]


def _weighted(delta: np.ndarray, weight: float) -> np.ndarray:
    """``weight * delta`` as a new float64 vector (a float32 delta widened exactly)."""
    return np.multiply(delta, weight, dtype=np.float64)


class RunningSum:
    """``Σ wᵢ Δᵢ`` and ``Σ wᵢ`` in float64."""

    def __init__(self, num_parameters: int) -> None:
        self.total = np.zeros(num_parameters, dtype=np.float64)
        self.weight = 0.0
        self.count = 0

    def fold(self, delta: np.ndarray, weight: float) -> None:
        """Add one update in place (:meth:`check` it first where it may be refused)."""
        if delta.shape != self.total.shape:
            raise ValueError(f"delta of shape {delta.shape}, expected {self.total.shape}")
        if not weight > 0:
            raise ValueError("an update's weight must be positive")
        self.total += _weighted(delta, weight)
        self.weight += weight
        self.count += 1

    def check(self, delta: np.ndarray, weight: float) -> None:
        """``ValueError`` if the update could not count: a weight that is not a positive
        finite number, a delta that is not finite, or a sum that would overflow.

        A finite float32 delta times a weight below 2**64 is below 7e57, so no count of them
        a coordinator can hold reaches float64's 1.8e308: only other deltas need the sum
        itself checked (a pass over a copy)."""
        self._check_weight(delta, weight)
        if delta.dtype.kind == "f" and delta.dtype.itemsize <= 4 and weight < 2.0**64:
            if not np.isfinite(delta).all():
                raise ValueError("the update contains NaN or Inf")
        else:
            self.folded(delta, weight)

    def folded(self, delta: np.ndarray, weight: float) -> RunningSum:
        """This sum plus one update, as a new object (``self`` unchanged), so that a caller
        can check and store the update before its sum moves. ``ValueError`` if the update
        could not count: a weight that is not a positive finite number, or a sum that would
        overflow."""
        self._check_weight(delta, weight)
        out = RunningSum(0)
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            # One new vector per update (it becomes the new sum): float32 deltas are widened
            # inside the multiplication, not copied first.
            total = _weighted(delta, weight)
            out.total = np.add(total, self.total, out=total)
        out.weight = self.weight + weight
        out.count = self.count + 1
        if not (np.isfinite(out.weight) and np.isfinite(out.total).all()):
            raise ValueError("the weighted update overflows the running sum")
        return out

    def _check_weight(self, delta: np.ndarray, weight: float) -> None:
        if delta.shape != self.total.shape:
            raise ValueError(f"delta of shape {delta.shape}, expected {self.total.shape}")
        if not (weight > 0 and np.isfinite(weight)):
            raise ValueError("an update's weight must be a positive finite number")

    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("no update was folded in")
        return self.total / self.weight


_DEFAULT_LR = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01}


@dataclass(frozen=True)
class ServerOptimizerSpec:
    name: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    @classmethod
    def from_json(cls, obj: Any) -> ServerOptimizerSpec:
        f = Fields(obj if obj is not None else {}, "plan.server_optimizer")
        name = f.string("name", "fedavg", choices=_DEFAULT_LR.keys())
        out = cls(
            name=name,
            lr=f.number("lr", _DEFAULT_LR[name], minimum=0.0, exclusive_min=True),
            # 1 would never forget a step: momentum grows without bound, FedAdam's m never
            # moves from 0 (its (1 - beta1) factor).
            momentum=f.number("momentum", 0.9, minimum=0.0, maximum=1.0, exclusive_max=True),
            beta1=f.number("beta1", 0.9, minimum=0.0, maximum=1.0, exclusive_max=True),
            beta2=f.number("beta2", 0.99, minimum=0.0, maximum=1.0),
            tau=f.number("tau", 1e-3, minimum=0.0, exclusive_min=True),
        )
        f.done()
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "lr": self.lr}
        if self.name == "fedavgm":
            out["momentum"] = self.momentum
        if self.name in ("fedadam", "fedyogi"):
            out.update(beta1=self.beta1, beta2=self.beta2, tau=self.tau)
        return out


State = dict[str, np.ndarray]


class ServerOptimizer(ABC):
    """One server step: ``(x, Δ, state) -> (x', state')``; never mutates its inputs."""

    state_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: ServerOptimizerSpec) -> None:
        self.spec = spec

    def initial_state(self, n: int) -> State:
        return {name: np.zeros(n, dtype=np.float64) for name in self.state_names}

    @abstractmethod
    def step(
        self, params: np.ndarray, delta: np.ndarray, state: State
    ) -> tuple[np.ndarray, State]: ...

    def pack_state(self, state: State) -> bytes:
        """The state vectors as one little-endian float64 blob, in ``state_names`` order."""
        return b"".join(state[k].astype("<f8").tobytes() for k in self.state_names)

    def unpack_state(self, data: bytes | None, n: int) -> State:
        if data is None or not self.state_names:
            return self.initial_state(n)
        flat = np.frombuffer(data, dtype="<f8")
        if flat.size != n * len(self.state_names):
            raise ValueError("stored optimizer state does not match the model size")
        return {
            k: flat[i * n : (i + 1) * n].astype(np.float64) for i, k in enumerate(self.state_names)
        }


class FedAvg(ServerOptimizer):
    def step(self, params: np.ndarray, delta: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        return (params.astype(np.float64) + self.spec.lr * delta).astype(np.float32), {}


class FedAvgM(ServerOptimizer):
    state_names = ("m",)

    def step(self, params: np.ndarray, delta: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        m = self.spec.momentum * state["m"] + delta
        return (params.astype(np.float64) + self.spec.lr * m).astype(np.float32), {"m": m}


class _Adaptive(ServerOptimizer):
    state_names = ("m", "v")

    def initial_state(self, n: int) -> State:
        return {"m": np.zeros(n), "v": np.full(n, self.spec.tau**2)}

    @abstractmethod
    def second_moment(self, v: np.ndarray, sq: np.ndarray) -> np.ndarray: ...

    def step(self, params: np.ndarray, delta: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        s = self.spec
        m = s.beta1 * state["m"] + (1 - s.beta1) * delta
        v = self.second_moment(state["v"], delta * delta)
        new = params.astype(np.float64) + s.lr * m / (np.sqrt(v) + s.tau)
        return new.astype(np.float32), {"m": m, "v": v}


class FedAdam(_Adaptive):
    def second_moment(self, v: np.ndarray, sq: np.ndarray) -> np.ndarray:
        return self.spec.beta2 * v + (1 - self.spec.beta2) * sq


class FedYogi(_Adaptive):
    def second_moment(self, v: np.ndarray, sq: np.ndarray) -> np.ndarray:
        return v - (1 - self.spec.beta2) * sq * np.sign(v - sq)


OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
}


def make_server_optimizer(spec: ServerOptimizerSpec) -> ServerOptimizer:
    return OPTIMIZERS[spec.name](spec)
