"""The device funnel: how far each training assignment got on its device, and why it stopped.

An assignment a device fetched passes :data:`FUNNEL_STAGES` in order. When it fails, the edge
SDK aborts it with a phase and a code (:class:`edge_sdk.protocol.FailurePhase`,
:class:`~edge_sdk.protocol.DeviceErrorCode`), which the coordinator stores in the
assignment's abort note as ``"<reason> [<phase>/<code>]"``; older notes (``"<reason>:
<message>"``) still parse.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING, Any

from edge_sdk.protocol import FailurePhase

if TYPE_CHECKING:
    from coordinator.store import Assignment

__all__ = ["FUNNEL_STAGES", "LATE_CODES", "FunnelCounts", "parse_abort_reason"]

FUNNEL_STAGES = ("delivered", "downloaded", "runtime_loaded", "trained", "uploaded", "accepted")
# The last stage an assignment reached when its abort names this phase.
_LEAVES_AT = {
    FailurePhase.DOWNLOAD.value: "delivered",
    FailurePhase.RUNTIME_LOAD.value: "downloaded",
    FailurePhase.TRAINING.value: "runtime_loaded",
    FailurePhase.CONDITIONS_LAPSED.value: "runtime_loaded",
    FailurePhase.UPLOAD.value: "trained",
}
# Upload refusals that mean "too late" rather than "bad update": the device trained and sent.
LATE_CODES = ("round_closed", "too_stale")
_ABORT_NOTE = re.compile(r"^(?P<reason>[a-z_]+)(?: \[(?P<phase>[a-z_]+)/(?P<code>[a-z_]+)\])?")


def parse_abort_reason(note: str | None) -> tuple[str, str | None, str | None]:
    """``(reason, phase, code)`` from an assignment's stored abort note."""
    m = _ABORT_NOTE.match(note or "")
    if m is None:
        return "error", None, None
    phase = m["phase"]
    if phase is None and m["reason"] == "conditions_lapsed":
        phase = FailurePhase.CONDITIONS_LAPSED.value
    return m["reason"], phase, m["code"]


class FunnelCounts:
    """Stage counts over training assignments.

    Each assignment reaches ``delivered`` once the device fetched it; it leaves at the stage
    its abort's phase names (an upload the coordinator refused: phase ``upload``, it leaves
    after ``trained``) and reaches ``accepted`` when reported. One that expired or is still
    out leaves at ``delivered`` (``dropped`` / ``in_flight``: nothing says how far it got),
    unless its upload arrived late (:meth:`count_late`).
    ``lost`` maps each stage to how many left there and why, so that each stage's count is the
    next one's plus what it lost. Counts of several rounds :meth:`merge` into one.
    """

    def __init__(self) -> None:
        self.reached: Counter[str] = Counter()
        self.lost: dict[str, Counter[str]] = {s: Counter() for s in FUNNEL_STAGES}
        self.dropped = 0
        self.in_flight = 0

    def add(self, a: Assignment) -> None:
        if a.delivered_at is None and a.state != "reported":
            return  # selected, never fetched: not on a device yet
        if a.state == "reported":
            last = "accepted"
        elif a.state == "aborted":
            reason, phase, code = parse_abort_reason(a.abort_reason)
            last = _LEAVES_AT.get(phase or "", "delivered")
            self.lost[last][f"{phase or reason}/{code}" if code else (phase or reason)] += 1
        else:
            last = "delivered"
            if a.state == "expired":
                self.dropped += 1
                self.lost[last]["dropped"] += 1
            else:
                self.in_flight += 1
                self.lost[last]["in_flight"] += 1
        self.reached.update(FUNNEL_STAGES[: FUNNEL_STAGES.index(last) + 1])

    def count_late(self, late: int) -> FunnelCounts:
        """Move ``late`` expired assignments whose upload came after their round closed from
        ``dropped`` (at ``delivered``) to ``late`` at ``uploaded``: the device got that far."""
        late = min(late, self.dropped)
        if late:
            self.dropped -= late
            self.lost["delivered"]["dropped"] -= late
            if not self.lost["delivered"]["dropped"]:
                del self.lost["delivered"]["dropped"]
            self.reached.update(dict.fromkeys(FUNNEL_STAGES[1:5], late))
            self.lost["uploaded"]["late"] += late
        return self

    def merge(self, other: FunnelCounts) -> FunnelCounts:
        self.reached.update(other.reached)
        for stage, why in other.lost.items():
            self.lost[stage].update(why)
        self.dropped += other.dropped
        self.in_flight += other.in_flight
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "stages": [
                {"stage": s, "devices": self.reached[s], "lost": dict(sorted(self.lost[s].items()))}
                for s in FUNNEL_STAGES
            ],
            "dropped": self.dropped,
            "in_flight": self.in_flight,
        }
