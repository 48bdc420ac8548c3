"""Staleness weighting for asynchronous (FedBuff) tasks: how much a late update still counts.

An update trained on model version ``v`` that arrives when the server is at version ``V`` has
staleness ``s = V - v`` (versions behind). Its aggregation weight is multiplied by ``w(s)``;
updates with ``s`` beyond the task's ``max_staleness`` are refused (``409 too_stale``).

The plan names the function under ``"staleness"``, either as a bare name or as an object::

    "staleness": "sqrt"                                   # 1/sqrt(1+s), FedBuff's default
    "staleness": {"name": "polynomial", "a": 0.5}         # (1+s)^-a; a=0.5 is "sqrt"
    "staleness": {"name": "constant"}                     # 1: staleness ignored
    "staleness": {"name": "hinge", "a": 10, "b": 4}       # 1 if s<=b else 1/(a*(s-b)+1)

(the polynomial and hinge forms are those of Xie et al., "Asynchronous Federated
Optimization", 2019; 1/sqrt(1+s) is Nguyen et al., "Federated Learning with Buffered
Asynchronous Aggregation", 2022). Pure functions and value objects: no I/O, no store. The
plan fields are read with :class:`~coordinator.validation.Fields`, like every plan field; a
mistake is :class:`~coordinator.errors.InvalidRequest` (400) naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from coordinator.errors import InvalidRequest
from coordinator.validation import Fields

__all__ = [
    "DEFAULT_MAX_STALENESS",
    "STALENESS_FUNCTIONS",
    "StalenessPolicy",
    "TooStale",
]

STALENESS_FUNCTIONS: Final = ("sqrt", "polynomial", "constant", "hinge")
# FedBuff drops updates more than about this many versions behind; a plan can change it.
DEFAULT_MAX_STALENESS: Final = 20


class TooStale(Exception):
    """An update trained on a version further behind than the task's bound accepts."""

    def __init__(self, staleness: int, max_staleness: int, *, weightless: bool = False) -> None:
        super().__init__(
            f"update is {staleness} versions behind the current model; "
            + (
                "its staleness weight is 0, it cannot count"
                if weightless
                else f"this task accepts at most {max_staleness}"
            )
        )
        self.staleness = staleness
        self.max_staleness = max_staleness


@dataclass(frozen=True)
class StalenessPolicy:
    """A staleness weighting function and the bound past which updates are refused.

    >>> p = StalenessPolicy.from_plan({"staleness": "sqrt", "max_staleness": 8})
    >>> round(p.weight(3), 4), p.accepts(8), p.accepts(9)
    (0.5, True, False)
    """

    name: str = "sqrt"
    a: float = 0.5
    b: float = 0.0
    max_staleness: int = DEFAULT_MAX_STALENESS

    def __post_init__(self) -> None:
        if self.name not in STALENESS_FUNCTIONS:
            choices = ", ".join(STALENESS_FUNCTIONS)
            raise InvalidRequest(f"unknown staleness function {self.name!r} (one of {choices})")
        if self.max_staleness < 0:
            raise InvalidRequest(f"max_staleness must be >= 0, got {self.max_staleness}")
        # The weight falls with staleness: if it underflows to 0 within the bound, an update
        # the bound admits could not count (and would divide a buffer of such updates by 0).
        if not self.weight(self.max_staleness) > 0:
            raise InvalidRequest(
                f"staleness weight underflows to 0 at staleness {self.max_staleness}: lower "
                "max_staleness or use a gentler function"
            )

    @classmethod
    def from_plan(cls, plan: Mapping[str, Any]) -> StalenessPolicy:
        """Read ``staleness`` and ``max_staleness`` from a task plan (both optional)."""
        return cls.from_fields(Fields(dict(plan), "plan"))

    @classmethod
    def from_fields(cls, f: Fields) -> StalenessPolicy:
        """Read ``staleness`` and ``max_staleness`` from a plan's fields (both optional)."""
        # At most the longest task (rounds <= 1e6): it is also a query parameter.
        bound = f.integer("max_staleness", DEFAULT_MAX_STALENESS, minimum=0, maximum=1_000_000)
        raw = f.raw("staleness")
        spec = Fields(
            {"name": raw} if isinstance(raw, str) else {} if raw is None else raw,
            f"{f.where}.staleness",
        )
        name = spec.string("name", "sqrt", max_len=32, choices=STALENESS_FUNCTIONS)
        a = b = 0.0
        if name == "sqrt":  # takes no parameters (use "polynomial" with a)
            a = 0.5
        elif name == "polynomial":
            a = spec.number("a", 0.5, minimum=0.0)
        elif name == "hinge":
            a = spec.number("a", 10.0, minimum=0.0)
            b = spec.number("b", 4.0, minimum=0.0)
        spec.done()
        return cls(name, a, b, bound)

    def to_plan(self) -> dict[str, Any]:
        """The plan fields that rebuild this policy (``from_plan(p.to_plan()) == p``)."""
        spec: dict[str, Any] = {"name": self.name}
        if self.name == "polynomial":
            spec["a"] = self.a
        elif self.name == "hinge":
            spec.update(a=self.a, b=self.b)
        return {"staleness": spec, "max_staleness": self.max_staleness}

    def accepts(self, staleness: int) -> bool:
        return 0 <= staleness <= self.max_staleness

    def check(self, staleness: int) -> None:
        """Raise :class:`TooStale` for an update past the bound (or from a future version)."""
        if staleness < 0:
            raise ValueError(f"staleness {staleness} < 0: the update names a future version")
        if staleness > self.max_staleness:
            raise TooStale(staleness, self.max_staleness)

    def weight(self, staleness: int) -> float:
        """``w(s)`` in (0, 1]; it does not apply the bound (see :meth:`check`)."""
        if staleness < 0:
            raise ValueError(f"staleness {staleness} < 0: the update names a future version")
        s = float(staleness)
        if self.name in ("sqrt", "polynomial"):
            return float((1.0 + s) ** -self.a)
        if self.name == "constant":
            return 1.0
        # hinge: full weight while only a little stale, then hyperbolic decay.
        return 1.0 if s <= self.b else 1.0 / (self.a * (s - self.b) + 1.0)

    def weights(self, staleness: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`weight`, for analysis and plots."""
        return np.array([self.weight(int(s)) for s in np.asarray(staleness).ravel()])
