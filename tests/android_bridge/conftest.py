"""Running the Kotlin library's JVM tools (``android_bridge/src/test/kotlin/.../tools``) from
Python: the ``kotlin_tools`` fixture builds the Maven project once per session and returns a
:class:`KotlinTools` that runs ``device``, ``parity`` and ``bench`` on a JVM."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.android_bridge.jvm import KotlinTools, build_tools
from tests.fixtures.requirements import unavailable


@pytest.fixture(scope="session")
def kotlin_tools() -> Iterator[KotlinTools]:
    try:
        yield build_tools()
    except FileNotFoundError as e:  # no Maven on this machine
        unavailable(str(e))
