"""FedBuff's buffer: fold asynchronous updates as they arrive, step the server every K of them.

Pure and persistence-agnostic: it holds one running float64 sum of model size, whatever the
number of updates, and knows nothing of HTTP or SQLite. The coordinator :meth:`~AsyncBuffer.
stage`-s an update (every check that could make it unusable: bound, a weight that underflows
to 0, shape, finiteness, overflow of the sum), persists it, acknowledges it and only then
:meth:`~AsyncBuffer.apply`-s the staged fold, so a failed write leaves the buffer as the store
says. After a crash or any error it rebuilds the buffer by folding the accepted-but-uncommitted
updates again in acceptance order (:meth:`AsyncBuffer.replay`), which gives bit-for-bit the
sum the lost process held (and the commit it may not have finished), or restores a saved
:meth:`AsyncBuffer.state`.

The aggregate of one buffer, for updates ``d_i`` with ``n_i`` examples and staleness ``s_i``::

    delta = sum_i (n_i * w(s_i) * d_i) / sum_i (n_i * w(s_i))

a weighted mean: a buffer of fresh updates is exactly FedAvg of them, and staleness moves
weight from stale to fresh updates without shrinking the server step. (FedBuff divides by K,
here the examples ``sum_i n_i``, which also damps the step by the mean staleness weight; on
the stragglers benchmark,
mean staleness 1.5, that damping cost 1.8 accuracy points at an equal update budget: see
docs/benchmarks.md.) The caller applies ``delta`` with the task's server optimizer (FedAvg,
FedAvgM, FedAdam, FedYogi) to make the next model version. The sum is the synchronous mode's
:class:`~coordinator.aggregation.RunningSum`, fed the staleness-scaled weights.

Usage::

    buf = AsyncBuffer(num_parameters=2410, config=AsyncConfig.from_plan(plan), version=0)
    fold = buf.fold(delta, num_examples=480, base_version=0)   # raises TooStale past the bound
    if fold.commit is not None:
        new_params = server_optimizer.step(params, fold.commit.delta)  # now version 1
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from coordinator.aggregation import RunningSum
from coordinator.errors import InvalidRequest
from coordinator.staleness import StalenessPolicy, TooStale
from coordinator.validation import Fields

__all__ = [
    "DEFAULT_BUFFER_K",
    "AsyncBuffer",
    "AsyncConfig",
    "BufferedUpdate",
    "Commit",
    "Fold",
    "Staged",
    "TooStale",
]

DEFAULT_BUFFER_K: Final = 10
# Concurrency well above K is what lets async absorb stragglers: a slow device holds one
# slot while faster ones fill the buffer. FedBuff runs it at 10-100x K; a plan can raise it.
DEFAULT_CONCURRENCY_PER_K: Final = 5


# Like a sync plan's goal; they are stored in integer columns (rounds' goal and target).
MAX_PLAN_COUNT: Final = 1_000_000


@dataclass(frozen=True)
class AsyncConfig:
    """The async fields of a task plan: ``buffer_k``, ``max_concurrency``, staleness policy."""

    buffer_k: int = DEFAULT_BUFFER_K
    max_concurrency: int = DEFAULT_BUFFER_K * DEFAULT_CONCURRENCY_PER_K
    staleness: StalenessPolicy = field(default_factory=StalenessPolicy)

    @classmethod
    def from_plan(cls, plan: Mapping[str, Any]) -> AsyncConfig:
        return cls.from_fields(Fields(dict(plan), "plan"))

    @classmethod
    def from_fields(cls, f: Fields) -> AsyncConfig:
        """Read the async fields of a plan (all optional); mistakes are ``InvalidRequest``."""
        k = f.integer("buffer_k", DEFAULT_BUFFER_K, minimum=1, maximum=MAX_PLAN_COUNT)
        concurrency = f.integer(
            "max_concurrency",
            min(k * DEFAULT_CONCURRENCY_PER_K, MAX_PLAN_COUNT),
            minimum=1,
            maximum=MAX_PLAN_COUNT,
        )
        if concurrency < k:
            # The buffer could never fill: every slot would wait for a commit that needs more.
            raise InvalidRequest(
                f"{f.where}.max_concurrency ({concurrency}) must be >= buffer_k ({k})"
            )
        return cls(k, concurrency, StalenessPolicy.from_fields(f))

    def to_plan(self) -> dict[str, Any]:
        return {
            "buffer_k": self.buffer_k,
            "max_concurrency": self.max_concurrency,
            **self.staleness.to_plan(),
        }

    def admits(self, in_flight: int) -> bool:
        """Whether one more device may start training while ``in_flight`` assignments are open."""
        return in_flight < self.max_concurrency


@dataclass(frozen=True)
class BufferedUpdate:
    """One accepted update as the store keeps it, enough to fold it again after a crash."""

    delta: np.ndarray
    num_examples: int
    base_version: int


@dataclass(frozen=True)
class Commit:
    """A full buffer: the aggregated delta that makes version ``version`` from ``version - 1``."""

    version: int
    delta: np.ndarray  # float64, model size: hand it to the server optimizer
    num_updates: int
    num_examples: int
    mean_staleness: float
    max_staleness: int


@dataclass(frozen=True)
class Fold:
    """What folding one update did: its staleness and weight, and the commit it completed."""

    staleness: int
    weight: float  # num_examples * w(staleness)
    buffered: int  # updates in the buffer after this fold (0 right after a commit)
    commit: Commit | None


@dataclass(frozen=True)
class Staged:
    """An update checked against the buffer, not yet folded in.

    The coordinator stages an update, stores it durably, then :meth:`AsyncBuffer.apply`-s
    the staged fold: whatever fails in between leaves the buffer as it was.
    """

    staleness: int
    weight: float
    version: int  # the buffer version it was staged on
    count: int  # updates in the buffer it was staged on
    delta: np.ndarray
    examples: int


class AsyncBuffer:
    """The running FedBuff aggregate for one async task (see the module docstring)."""

    def __init__(self, num_parameters: int, config: AsyncConfig, version: int = 0) -> None:
        if num_parameters < 1:
            raise ValueError(f"num_parameters must be >= 1, got {num_parameters}")
        if version < 0:
            raise ValueError(f"version must be >= 0, got {version}")
        self.num_parameters = num_parameters
        self.config = config
        self.version = version
        self._reset()

    def _reset(self) -> None:
        # The sync mode's streaming sum, fed staleness-scaled weights; examples for metrics.
        self._sum = RunningSum(self.num_parameters)
        self._examples = 0
        self._staleness_sum = 0
        self._staleness_max = 0

    def __len__(self) -> int:
        return self._sum.count

    def staleness_of(self, base_version: int) -> int:
        return self.version - base_version

    def check(
        self, delta: np.ndarray, num_examples: int, base_version: int
    ) -> tuple[int, float]:
        """Validate an update without folding it; returns its staleness and its weight.

        Raises :class:`TooStale` past the bound or when its weight would be 0 (a steep
        staleness function can underflow), ``ValueError`` for anything malformed. The
        coordinator calls this (through :meth:`stage`) before it stores an upload so that a
        refused update leaves no trace.
        """
        if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer):
            raise ValueError(f"num_examples must be an integer, got {num_examples!r}")
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        if base_version > self.version:
            raise ValueError(
                f"update names version {base_version}, the current version is {self.version}"
            )
        staleness = self.staleness_of(base_version)
        policy = self.config.staleness
        policy.check(staleness)
        weight = num_examples * policy.weight(staleness)
        if not weight > 0:
            raise TooStale(staleness, policy.max_staleness, weightless=True)
        if delta.shape != (self.num_parameters,):
            raise ValueError(f"update has shape {delta.shape}, the model has {self.num_parameters}")
        # Finite, and within what the running sum can hold (one pass over the delta).
        self._sum.check(delta, weight)
        return staleness, weight

    def stage(self, delta: np.ndarray, num_examples: int, base_version: int) -> Staged:
        """Everything :meth:`fold` checks and computes, without changing the buffer."""
        staleness, weight = self.check(delta, num_examples, base_version)
        return Staged(staleness=staleness, weight=weight, version=self.version,
                      count=len(self), delta=delta, examples=int(num_examples))  # fmt: skip

    def apply(self, staged: Staged, *, commit: bool = True) -> Fold:
        """Take a staged fold in; on the K-th update (unless ``commit=False``), return the
        commit and start the next version's buffer."""
        if staged.version != self.version or staged.count != len(self):
            raise ValueError("the fold was staged on another state of this buffer")
        self._sum.fold(staged.delta, staged.weight)  # in place: no copy of the sum per update
        self._examples += staged.examples
        self._staleness_sum += staged.staleness
        self._staleness_max = max(self._staleness_max, staged.staleness)
        done = commit and len(self) >= self.config.buffer_k
        return Fold(staged.staleness, staged.weight, 0 if done else len(self),
                    self._commit() if done else None)  # fmt: skip

    def due(self) -> Commit | None:
        """The commit of a buffer holding K updates or more (one restored with
        :meth:`from_state` from replicas' partial buffers, which fold without committing),
        starting the next version's buffer; None while fewer are held."""
        return self._commit() if len(self) >= self.config.buffer_k else None

    def fold(self, delta: np.ndarray, num_examples: int, base_version: int) -> Fold:
        """Add one update; on the K-th, return the commit and start the next version's buffer."""
        return self.apply(self.stage(delta, num_examples, base_version))

    def _commit(self) -> Commit:
        count = len(self)
        commit = Commit(
            version=self.version + 1,
            delta=self._sum.mean(),
            num_updates=count,
            num_examples=self._examples,
            mean_staleness=self._staleness_sum / count,
            max_staleness=self._staleness_max,
        )
        self.version += 1
        self._reset()
        return commit

    @classmethod
    def replay(
        cls,
        num_parameters: int,
        config: AsyncConfig,
        version: int,
        updates: Iterable[BufferedUpdate],
    ) -> tuple[AsyncBuffer, Commit | None]:
        """The buffer after folding ``updates`` (accepted, not yet committed) onto ``version``.

        If they fill the buffer, a commit did not happen (the process died or the commit
        failed after the K-th update was stored): it is returned for the caller to finish.
        The stored updates decide what the version holds: should there be more than K (a
        buffer an older coordinator kept filling after a failed commit), the commit holds
        all of them, never a subset. An update refused now means the stored history is
        inconsistent, which is an error, not something to skip.
        """
        buf = cls(num_parameters, config, version)
        buf.restore(updates)
        pending = buf._commit() if len(buf) >= config.buffer_k else None
        return buf, pending

    def restore(self, updates: Iterable[BufferedUpdate]) -> None:
        """Fold accepted updates again, without committing (see :meth:`replay`)."""
        for u in updates:
            self.apply(self.stage(u.delta, u.num_examples, u.base_version), commit=False)

    def state(self) -> dict[str, Any]:
        """Everything :meth:`from_state` needs; ``sum`` is the float64 running sum."""
        return {
            "version": self.version,
            "count": self._sum.count,
            "weight": self._sum.weight,
            "examples": self._examples,
            "staleness_sum": self._staleness_sum,
            "staleness_max": self._staleness_max,
            "sum": self._sum.total.copy(),
        }

    @classmethod
    def from_state(cls, config: AsyncConfig, state: Mapping[str, Any]) -> AsyncBuffer:
        total = np.asarray(state["sum"], dtype=np.float64)
        buf = cls(int(total.shape[0]), config, int(state["version"]))
        buf._sum.total[:] = total
        buf._sum.count = int(state["count"])
        buf._sum.weight = float(state["weight"])
        buf._examples = int(state["examples"])
        buf._staleness_sum = int(state["staleness_sum"])
        buf._staleness_max = int(state["staleness_max"])
        return buf
