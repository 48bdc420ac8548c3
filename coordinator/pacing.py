"""Pace steering: when a device that cannot take part now should check in again.

The aim (Bonawitz et al. 2019) is that check-ins reach the coordinator at the rate the next
rounds need, evenly spread, rather than all devices coming back at once. With

* ``N``: the population currently checking in: devices that checked in within ``horizon_s``,
  or that were told to come back and are not more than ``horizon_s`` overdue (a device that
  does not return drops out of ``N`` by itself). Among ``K = replicas`` coordinators that
  share the devices, each sees 1/K of the check-ins: a device told to wait counts for ``K``
  waits (its next visit to this one is expected after a geometric number of them, mean
  ``K``), and the count is divided by the chance ``1 - (1 - 1/K)^(K + horizon_s/I)`` that
  the device is back by then, so that every coordinator's ``N`` is the whole population,
* ``R``: devices a round needs (its target, goal x over-selection),
* ``P``: the round period in seconds (mean duration of the task's recent rounds, or
  ``selection_window_s + round_deadline_s`` before any round closed),
* ``h``: ``headroom`` (>= 1, covers ineligible devices and chance),

the wanted check-in rate is ``λ = h R / P``, so each device should come back after a mean
interval ``I = N / λ = N P / (h R)``, clamped to ``[min_retry_s, max_retry_s]``. The answer is
``retry_after_s = I · U(1 - j, 1 + j)`` with ``j = jitter``: each device's return time is
drawn uniformly around ``I``, so N devices arrive spread over a window ``2 j I`` wide at about
``λ`` per second in total, never as a herd. Candidates waiting for a selection window to close
come back at ``window end + U(0, selection_return_spread_s)``. Once the window is over but
short of its goal (it selects when the goal-th candidate arrives), a candidate comes back when
the missing ones should have arrived at the pace the window has seen so far (``missing x
elapsed / candidates``, never past the selection timeout), plus the same spread: waiting
candidates then check in about once more per window instead of polling it, whether a round
needs ten devices or thousands. With nothing to do a device waits ``no_task_retry_s · U(1 -
j, 1 + j)``.
"""

from __future__ import annotations

import heapq
import random

from coordinator.config import PacingConfig

__all__ = ["PaceSteering"]


class PaceSteering:
    def __init__(self, config: PacingConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        # device_id -> time after which it no longer counts, plus a lazy min-heap over it.
        # In memory only: a pacing estimate that a restart resets is harmless, a database
        # write per check-in is not free.
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._interval = max(config.min_retry_s, 1e-3)  # the last one given

    def _keep(self, device_id: str, until: float) -> None:
        self._expiry[device_id] = until
        heapq.heappush(self._heap, (until, device_id))
        if len(self._heap) > 4 * len(self._expiry) + 1024:
            self._heap = [(t, d) for d, t in self._expiry.items()]
            heapq.heapify(self._heap)

    def saw(self, device_id: str, now: float) -> None:
        """A device checked in."""
        self._keep(device_id, now + self.config.horizon_s)

    def expect(self, device_id: str, now: float, wait_s: float) -> None:
        """A device was told to come back after ``wait_s``. Among K replicas it comes back
        to this one after about K such waits: it counts until then (plus the horizon), so
        that each replica's population is the whole one, not the share it saw lately."""
        self._keep(device_id, now + self.config.replicas * wait_s + self.config.horizon_s)

    def population(self, now: float) -> int:
        """:meth:`estimate`, at least one (the interval divides by the wanted rate only)."""
        return max(1, self.estimate(now))

    def estimate(self, now: float) -> int:
        """The devices checking in now (across replicas: the whole population)."""
        while self._heap and self._heap[0][0] < now:
            until, device_id = heapq.heappop(self._heap)
            if self._expiry.get(device_id) == until:
                del self._expiry[device_id]
        seen = len(self._expiry)
        k = self.config.replicas
        if k > 1:
            # A device comes back here after a geometric number of visits (mean k): it still
            # counts at its next visit unless that takes more than k waits plus the horizon.
            visits = k + self.config.horizon_s / self._interval
            seen = round(seen / (1 - (1 - 1 / k) ** visits))
        return seen

    def interval(self, now: float, needed_per_round: int, round_period_s: float) -> float:
        c = self.config
        rate = c.headroom * max(1, needed_per_round) / max(round_period_s, 1e-3)
        self._interval = min(c.max_retry_s, max(c.min_retry_s, self.population(now) / rate))
        return self._interval

    def _jittered(self, interval: float) -> float:
        j = self.config.jitter
        return interval * self.rng.uniform(1 - j, 1 + j)

    def retry_after(self, now: float, needed_per_round: int, round_period_s: float) -> float:
        return self._jittered(self.interval(now, needed_per_round, round_period_s))

    def after_window(self, now: float, window_ends_at: float) -> float:
        return max(0.0, window_ends_at - now) + self.rng.uniform(
            0.05, max(0.05, self.config.selection_return_spread_s)
        )

    def until_goal(
        self, now: float, opened_at: float, candidates: int, goal: int, timeout_at: float
    ) -> float:
        """For a candidate of a window that is over but has fewer than ``goal`` candidates."""
        pace = (now - opened_at) / max(1, candidates)  # mean seconds between arrivals so far
        eta = min(max(0, goal - candidates) * pace, max(0.0, timeout_at - now))
        return self.after_window(now, now + eta)

    def idle(self) -> float:
        return self._jittered(self.config.no_task_retry_s)
