"""Pace steering: when a device that cannot take part now should check in again.

The aim (Bonawitz et al. 2019) is that check-ins reach the coordinator at the rate the next
rounds need, evenly spread, rather than all devices coming back at once. With

* ``N``: devices of the population seen within ``horizon_s`` (the population currently
  checking in),
* ``R``: devices a round needs (its target, goal x over-selection),
* ``P``: the round period in seconds (mean duration of the task's recent rounds, or
  ``selection_window_s + round_deadline_s`` before any round closed),
* ``h``: ``headroom`` (>= 1, covers ineligible devices and chance),

the wanted check-in rate is ``λ = h R / P``, so each device should come back after a mean
interval ``I = N / λ = N P / (h R)``, clamped to ``[min_retry_s, max_retry_s]``. The answer is
``retry_after_s = I · U(1 - j, 1 + j)`` with ``j = jitter``: each device's return time is
drawn uniformly around ``I``, so N devices arrive spread over a window ``2 j I`` wide at about
``λ`` per second in total, never as a herd. Candidates waiting for a selection window to close
come back at ``window end + U(0, selection_return_spread_s)``; with nothing to do a device
waits ``no_task_retry_s · U(1 - j, 1 + j)``.
"""

from __future__ import annotations

import random
from collections import OrderedDict

from coordinator.config import PacingConfig

__all__ = ["PaceSteering"]


class PaceSteering:
    def __init__(self, config: PacingConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        # device_id -> last check-in, oldest first; kept in memory only: a pacing estimate
        # that a restart resets is harmless, a write per check-in is not free.
        self._seen: OrderedDict[str, float] = OrderedDict()

    def saw(self, device_id: str, now: float) -> None:
        self._seen[device_id] = now
        self._seen.move_to_end(device_id)

    def population(self, now: float) -> int:
        horizon = now - self.config.horizon_s
        while self._seen:
            oldest = next(iter(self._seen.values()))
            if oldest >= horizon:
                break
            self._seen.popitem(last=False)
        return max(1, len(self._seen))

    def interval(self, now: float, needed_per_round: int, round_period_s: float) -> float:
        c = self.config
        rate = c.headroom * max(1, needed_per_round) / max(round_period_s, 1e-3)
        return min(c.max_retry_s, max(c.min_retry_s, self.population(now) / rate))

    def _jittered(self, interval: float) -> float:
        j = self.config.jitter
        return interval * self.rng.uniform(1 - j, 1 + j)

    def retry_after(self, now: float, needed_per_round: int, round_period_s: float) -> float:
        return self._jittered(self.interval(now, needed_per_round, round_period_s))

    def after_window(self, now: float, window_ends_at: float) -> float:
        return max(0.0, window_ends_at - now) + self.rng.uniform(
            0.05, max(0.05, self.config.selection_return_spread_s)
        )

    def idle(self) -> float:
        return self._jittered(self.config.no_task_retry_s)
