"""Device conditions and the eligibility policy: may this device train right now?

Owns :class:`DeviceConditions` (the check-in ``conditions`` of docs/protocol.md), the
providers that read them (Linux, Raspberry Pi, Android via dumpsys/Termux:API, and a scripted
one for tests and the fleet emulator) and :class:`EligibilityPolicy`. Providers take their root
directory and command runner as parameters, so tests feed recorded outputs. Imports the
standard library only: no numpy, no runtime, nothing from the client or the coordinator.

>>> provider = default_provider()                                     # doctest: +SKIP
>>> EligibilityPolicy().check(provider.read())                        # doctest: +SKIP
(False, ['not charging'])
"""

from __future__ import annotations

import os
from pathlib import Path

from edge_sdk.conditions.android import AndroidConditions
from edge_sdk.conditions.base import (
    CachedRunner,
    CommandRunner,
    ConditionsProvider,
    DeviceConditions,
    run_command,
)
from edge_sdk.conditions.linux import LinuxConditions
from edge_sdk.conditions.policy import EligibilityPolicy
from edge_sdk.conditions.raspberry_pi import RaspberryPiConditions
from edge_sdk.conditions.scripted import FakeClock, ScriptedConditions

__all__ = [
    "AndroidConditions",
    "CachedRunner",
    "CommandRunner",
    "ConditionsProvider",
    "DeviceConditions",
    "EligibilityPolicy",
    "FakeClock",
    "LinuxConditions",
    "RaspberryPiConditions",
    "ScriptedConditions",
    "default_provider",
    "run_command",
]


def default_provider(root: str | os.PathLike[str] = "/") -> ConditionsProvider:
    """The provider for the machine this runs on: Android, Raspberry Pi or plain Linux."""
    base = Path(root)
    if "ANDROID_ROOT" in os.environ or (base / "system/build.prop").exists():
        return AndroidConditions(base)
    model = base / "proc/device-tree/model"
    try:
        if model.read_bytes().startswith(b"Raspberry Pi"):
            return RaspberryPiConditions(base)
    except OSError:
        pass
    return LinuxConditions(base)
