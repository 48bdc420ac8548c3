"""Hostile devices for the poisoning benchmark: honest training, tampered upload.

An attacker is an emulated device like any other (the SDK client trains on its partition as
usual); only its transport differs: :class:`AttackTransport` rewrites the update frame and the
declared example count of each upload before it leaves, the way a modified app would. The
coordinator sees a well-formed, authenticated upload. Four attacks (:data:`ATTACKS`):

* ``scale``: the honest delta times ``scale`` (boosting, as in model-replacement attacks);
* ``sign_flip``: the delta negated (times ``scale`` if above 1), pulling the model back;
* ``inflate``: the negated delta declaring ``max_examples`` examples, the most the server
  accepts, so that plain FedAvg gives it nearly all the weight;
* ``outlier``: a random direction scaled to just under the server's norm bound
  (``margin x max_norm``), declaring just under ``max_examples``: finite, accepted, extreme.

The attacker knows the server's bounds (they are in the plan an operator publishes; assume
the worst). Tampering is deterministic per assignment, so a retried upload is the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from edge_sdk.codecs import decode_update, encode_update
from edge_sdk.protocol import HEADER_REPORT, Route
from edge_sdk.transport import Response
from fedge.fleet.device import LinkTransport

__all__ = ["ATTACKS", "Attack", "AttackTransport", "choose_attackers"]

ATTACKS: Final = ("scale", "sign_flip", "inflate", "outlier")


@dataclass(frozen=True)
class Attack:
    name: str
    scale: float = 1.0  # scale: the boost; sign_flip: magnitude of the flipped delta
    max_norm: float = 1e4  # the server's update-norm bound (plan max_update_norm)
    max_examples: int = 1_000_000  # the server's declared-examples bound (plan max_examples)
    margin: float = 0.99  # outlier: how close under the bounds

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ValueError(f"unknown attack {self.name!r}: one of {', '.join(ATTACKS)}")
        if not (self.scale > 0 and self.max_norm > 0 and self.max_examples >= 1):
            raise ValueError("scale, max_norm and max_examples must be positive")
        if not 0 < self.margin <= 1:
            raise ValueError(f"margin must be in (0, 1], got {self.margin}")

    def tamper(
        self, delta: np.ndarray, num_examples: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, int]:
        """The delta and example count to send instead of the honest ones."""
        d = np.asarray(delta, dtype=np.float64)
        if self.name == "scale":
            return d * self.scale, num_examples
        if self.name == "sign_flip":
            return -d * self.scale, num_examples
        if self.name == "inflate":
            return -d, self.max_examples
        direction = rng.standard_normal(d.size)
        direction *= self.margin * self.max_norm / np.sqrt(np.square(direction).sum())
        return direction, max(1, int(self.margin * self.max_examples))


def choose_attackers(num_devices: int, fraction: float, seed: int) -> list[int]:
    """``round(fraction x num_devices)`` device indices, drawn with ``seed``."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    count = round(fraction * num_devices)
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(num_devices, size=count, replace=False))


class AttackTransport(LinkTransport):
    """A device's link whose update uploads are tampered with by ``attack``."""

    def __init__(self, base_url: str, *, attack: Attack, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self.attack = attack
        self.tampered = 0
        # Each assignment's codec, from the check-in that gave it: the coordinator refuses
        # an update in any other (an attacker goes through the same door as every device).
        self._codecs: dict[str, Any] = {}

    def request(self, method: str, path: str, *, body: bytes = b"",
                headers: Any = None) -> Response:  # fmt: skip
        if method == "POST" and path.endswith("/update") and headers is not None:
            body, headers = self._tamper(path, body, headers)
        response = super().request(method, path, body=body, headers=headers)
        if method == "POST" and path == Route.CHECKIN and response.status == 200:
            given = (response.json() or {}).get("assignment")
            if given is not None:
                self._codecs[given["assignment_id"]] = given["plan"].get("codec", "fp32")
        return response

    def _tamper(
        self, path: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[bytes, dict[str, str]]:
        report = json.loads(headers[HEADER_REPORT])
        seed = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "little")
        delta, examples = self.attack.tamper(
            decode_update(body), int(report["num_examples"]), np.random.default_rng(seed)
        )
        codec = self._codecs.get(path.split("/")[-2], "fp32")
        frame, _ = encode_update(delta.astype(np.float32), codec, rng=np.random.default_rng(seed))
        self.tampered += 1
        return frame, {**headers, HEADER_REPORT: json.dumps({**report, "num_examples": examples})}
