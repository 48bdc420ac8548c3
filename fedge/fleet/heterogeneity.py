"""How emulated devices differ: compute speed, bandwidth, availability over a day, failures.

Every device gets a :class:`DeviceProfile` drawn from the distributions of a
:class:`Heterogeneity` value object. Draws use ``numpy.random.default_rng([seed, index])``,
so device ``index`` gets the same profile for a seed whatever the fleet size, and the per-job
fates (dropout, lapse) use ``[seed, index, job]``: a run is reproducible from its seed.

Distributions (all parameters are fields of :class:`Heterogeneity`):

* **Compute speed** — a step-time multiplier ``m``, heavy-tailed: ``lognormal`` draws
  ``m = median * LogNormal(0, sigma)`` (sigma 1: the slowest 1 % are 10x the median), ``pareto``
  draws ``m = median * 2^(-1/a) * Pareto(a)`` with ``Pareto(a) >= 1`` (shape ``a`` <= 2: infinite
  variance). A job of ``s`` steps takes ``s * step_time_s * m`` emulated seconds
  (see :mod:`fedge.fleet.clock` for how emulated time maps onto real time).
* **Bandwidth** — download and upload rates ``median * LogNormal(0, sigma)`` in Mbit/s; a
  transfer of ``b`` bytes takes ``8 b / rate`` emulated seconds.
* **Availability** — a :class:`DaySchedule` repeating every simulated day. ``always``: charging,
  idle and unmetered all the time. ``diurnal``: plugged in at night (plug-in hour
  ``N(22.5, 1)``, session ``N(8.5, 1)`` hours clipped to [5, 11]), in use for the first
  ``N(0.5, 0.25)`` hours of it, on home Wi-Fi (unmetered, from 2 h before plug-in to 0.5 h after
  unplugging) with probability ``home_wifi_prob``; with probability ``day_charge_prob`` also a
  daytime charge (start U(9, 17) h, 0.5–3 h long), idle outside user sessions that arrive at
  ``active_per_hour`` and last Exp(10 min), on Wi-Fi with probability ``work_wifi_prob``.
  A fraction ``never_charging_fraction`` of devices never charges at all.
* **Failures per training job** — with ``dropout_prob`` the device vanishes at a uniform point
  of the job (process killed, network gone: no upload, no abort message); with ``lapse_prob``
  the user picks the device up at a uniform point of the job (not idle for Exp(10 min)), so the
  client sees its conditions lapse and aborts cleanly.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "DAY_S",
    "Conditions",
    "DaySchedule",
    "DeviceProfile",
    "Heterogeneity",
    "JobFate",
]

DAY_S = 86_400.0
_HOUR = 3_600.0
# Mean length of a user session (and of a lapse during training), emulated seconds.
_SESSION_MEAN_S = 600.0
_EPS_S = 1e-3


@dataclass(frozen=True)
class Conditions:
    """What a device reports at one instant (the fields of the check-in ``conditions``)."""

    charging: bool
    idle: bool
    unmetered: bool
    battery: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DaySchedule:
    """Piecewise-constant conditions over one day, repeating: ``starts[i]`` (seconds after
    midnight, ascending, ``starts[0] == 0``) begins segment ``states[i]``."""

    starts: tuple[float, ...]
    states: tuple[tuple[bool, bool, bool], ...]  # (charging, idle, unmetered)

    @staticmethod
    def constant(charging: bool, idle: bool, unmetered: bool) -> DaySchedule:
        return DaySchedule((0.0,), ((charging, idle, unmetered),))

    @staticmethod
    def from_intervals(
        charging: list[tuple[float, float]],
        busy: list[tuple[float, float]],
        unmetered: list[tuple[float, float]],
    ) -> DaySchedule:
        """Intervals in seconds since midnight; an end beyond the day wraps to the next."""

        def norm(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
            out = []
            for a, b in iv:
                a %= DAY_S
                length = min(max(b - a if b >= a else b + DAY_S - a, 0.0), DAY_S)
                if a + length <= DAY_S:
                    out.append((a, a + length))
                else:
                    out += [(a, DAY_S), (0.0, a + length - DAY_S)]
            return out

        sets = [norm(charging), norm(busy), norm(unmetered)]
        cuts = sorted({0.0} | {t for iv in sets for a, b in iv for t in (a, b) if t < DAY_S})
        states = []
        for i, start in enumerate(cuts):
            end = cuts[i + 1] if i + 1 < len(cuts) else DAY_S
            mid = 0.5 * (start + end)
            inside = [any(a <= mid < b for a, b in iv) for iv in sets]
            states.append((inside[0], not inside[1], inside[2]))
        # Merge neighbours with equal state so that next_change() finds real changes.
        starts_m, states_m = [cuts[0]], [states[0]]
        for start, state in zip(cuts[1:], states[1:], strict=True):
            if state != states_m[-1]:
                starts_m.append(start)
                states_m.append(state)
        return DaySchedule(tuple(starts_m), tuple(states_m))

    def state_at(self, t: float) -> tuple[bool, bool, bool]:
        return self.states[bisect.bisect_right(self.starts, t % DAY_S) - 1]

    def next_change(self, t: float) -> float:
        """A time just (1 ms) after the next change of state after ``t`` (``inf`` if constant);
        the margin keeps ``state_at`` of the result on the new side despite rounding."""
        if len(self.states) == 1:
            return math.inf
        day0 = t - t % DAY_S
        i = bisect.bisect_right(self.starts, t % DAY_S)
        if i < len(self.starts):
            return day0 + self.starts[i] + _EPS_S
        # Past the last cut: the next day's first change (its start 0 is the same segment
        # only if the last and first states are equal).
        wrap = 1 if self.states[-1] == self.states[0] else 0
        return day0 + DAY_S + self.starts[wrap] + _EPS_S

    def eligible_fraction(self) -> float:
        """Share of the day that is charging, idle and unmetered (Google's default policy)."""
        ends = (*self.starts[1:], DAY_S)
        spans = zip(self.starts, ends, self.states, strict=True)
        return sum(e - s for s, e, st in spans if all(st)) / DAY_S


@dataclass(frozen=True)
class JobFate:
    """What happens to one training job, as fractions of its emulated compute time."""

    dropout_at: float | None  # the device vanishes (no upload, no abort)
    lapse_at: float | None  # the user picks it up: conditions lapse, the client aborts
    lapse_s: float  # how long the lapse lasts, emulated seconds


@dataclass(frozen=True)
class DeviceProfile:
    index: int
    compute_multiplier: float
    download_mbps: float
    upload_mbps: float
    schedule: DaySchedule
    never_charging: bool
    dropout_prob: float
    lapse_prob: float
    seed: int
    day_offset_s: float  # emulated time 0 is this many seconds after the device's midnight

    def conditions_at(self, t: float) -> Conditions:
        """Conditions at emulated time ``t`` (seconds since the emulation started)."""
        local = t + self.day_offset_s
        charging, idle, unmetered = self.schedule.state_at(local)
        # A plausible level for the report; eligibility policies use charging, not the level.
        return Conditions(charging, idle, unmetered, 0.9 if charging else 0.55)

    def next_change(self, t: float) -> float:
        return self.schedule.next_change(t + self.day_offset_s) - self.day_offset_s

    def script(self, t0: float = 0.0) -> list[tuple[float, Conditions]]:
        """The schedule as ``(seconds after emulated time t0, conditions)`` steps over one day,
        starting at 0: the form of a repeating scripted conditions provider (period DAY_S)."""
        local0 = t0 + self.day_offset_s
        steps = [(0.0, self.conditions_at(t0))]
        for start in self.schedule.starts:
            at = (start - local0) % DAY_S
            if at > 0:
                steps.append((at, self.conditions_at(t0 + at)))
        return sorted(steps, key=lambda step: step[0])

    def compute_time_s(self, steps: int, step_time_s: float) -> float:
        return steps * step_time_s * self.compute_multiplier

    def transfer_time_s(self, bytes_down: int = 0, bytes_up: int = 0) -> float:
        return 8.0 * (bytes_down / (self.download_mbps * 1e6) + bytes_up / (self.upload_mbps * 1e6))

    def job_fate(self, job: int) -> JobFate:
        rng = np.random.default_rng([self.seed, self.index, job])
        u = rng.random(5)
        return JobFate(
            dropout_at=float(u[1]) if u[0] < self.dropout_prob else None,
            lapse_at=float(u[3]) if u[2] < self.lapse_prob else None,
            lapse_s=float(-_SESSION_MEAN_S * math.log1p(-u[4])),
        )


@dataclass(frozen=True)
class Heterogeneity:
    """The distributions device profiles are drawn from (see the module docstring)."""

    compute: Literal["lognormal", "pareto"] = "lognormal"
    compute_median: float = 1.0
    compute_sigma: float = 1.0  # lognormal
    compute_shape: float = 1.5  # pareto
    download_mbps: float = 20.0
    download_sigma: float = 0.8
    upload_mbps: float = 5.0
    upload_sigma: float = 0.9
    availability: Literal["always", "diurnal"] = "always"
    start_hour: float = 0.0  # local time of day when the emulation starts
    home_wifi_prob: float = 0.85
    day_charge_prob: float = 0.3
    work_wifi_prob: float = 0.5
    active_per_hour: float = 2.0
    never_charging_fraction: float = 0.0
    dropout_prob: float = 0.0
    lapse_prob: float = 0.0

    def __post_init__(self) -> None:
        for name in ("never_charging_fraction", "dropout_prob", "lapse_prob", "home_wifi_prob",
                     "day_charge_prob", "work_wifi_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a probability, got {v}")
        for name in ("compute_median", "download_mbps", "upload_mbps", "compute_shape"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        # Written so that NaN fails too: a NaN here reaches every device's draws or schedule.
        if not 0.0 <= self.start_hour <= 24.0:
            raise ValueError(f"start_hour must be an hour of the day (0-24), got {self.start_hour}")
        for name in ("compute_sigma", "download_sigma", "upload_sigma", "active_per_hour"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.compute not in ("lognormal", "pareto"):
            raise ValueError(f"compute must be lognormal or pareto, got {self.compute!r}")
        if self.availability not in ("always", "diurnal"):
            raise ValueError(f"availability must be always or diurnal, got {self.availability!r}")

    @staticmethod
    def uniform() -> Heterogeneity:
        """Identical, always-available, reliable devices with fast links (a control)."""
        return Heterogeneity(compute_sigma=0.0, download_sigma=0.0, upload_sigma=0.0,
                             download_mbps=1e4, upload_mbps=1e4)

    @staticmethod
    def realistic(start_hour: float = 23.0) -> Heterogeneity:
        """Phones over a day: diurnal charging, heavy-tailed speed, 6 % dropouts (Bonawitz et
        al. report 6-10 %), 3 % lapses, 5 % never charge."""
        return Heterogeneity(availability="diurnal", start_hour=start_hour,
                             never_charging_fraction=0.05, dropout_prob=0.06, lapse_prob=0.03)

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    def sample(self, num_devices: int, seed: int) -> list[DeviceProfile]:
        return [self.sample_one(i, seed) for i in range(num_devices)]

    def sample_one(self, index: int, seed: int) -> DeviceProfile:
        rng = np.random.default_rng([seed, index])
        if self.compute == "lognormal":
            mult = self.compute_median * math.exp(self.compute_sigma * rng.standard_normal())
        else:
            # numpy's pareto is Lomax; +1 gives classical Pareto(a) with minimum 1, whose median
            # is 2^(1/a): rescaled so that compute_median is the median.
            a = self.compute_shape
            mult = self.compute_median * (1.0 + rng.pareto(a)) / 2.0 ** (1.0 / a)
        down = self.download_mbps * math.exp(self.download_sigma * rng.standard_normal())
        up = self.upload_mbps * math.exp(self.upload_sigma * rng.standard_normal())
        never = bool(rng.random() < self.never_charging_fraction)
        if self.availability == "always":
            schedule = DaySchedule.constant(not never, True, True)
        else:
            schedule = self._diurnal(rng, never)
        return DeviceProfile(
            index=index,
            compute_multiplier=float(mult),
            download_mbps=float(down),
            upload_mbps=float(up),
            schedule=schedule,
            never_charging=never,
            dropout_prob=self.dropout_prob,
            lapse_prob=self.lapse_prob,
            seed=seed,
            day_offset_s=self.start_hour * _HOUR,
        )

    def _diurnal(self, rng: np.random.Generator, never_charging: bool) -> DaySchedule:
        h = _HOUR
        plug_in = rng.normal(22.5, 1.0) * h
        night = float(np.clip(rng.normal(8.5, 1.0), 5.0, 11.0)) * h
        in_bed = float(np.clip(rng.normal(0.5, 0.25), 0.0, 1.5)) * h
        charging = [(plug_in, plug_in + night)]
        busy = [(plug_in, plug_in + in_bed)]
        wifi = []
        if rng.random() < self.home_wifi_prob:
            wifi.append((plug_in - 2 * h, plug_in + night + 0.5 * h))
        if rng.random() < self.day_charge_prob:
            start = rng.uniform(9.0, 17.0) * h
            end = start + rng.uniform(0.5, 3.0) * h
            charging.append((start, end))
            if rng.random() < self.work_wifi_prob:
                wifi.append((start, end))
            # User sessions during the daytime charge.
            t = start
            while True:
                t += rng.exponential(h / self.active_per_hour) if self.active_per_hour else end
                if t >= end:
                    break
                busy.append((t, t + rng.exponential(_SESSION_MEAN_S)))
        return DaySchedule.from_intervals([] if never_charging else charging, busy, wifi)
