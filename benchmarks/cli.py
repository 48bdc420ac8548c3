"""The command line of the benchmarks that take words rather than options (``quick``, a
section's name). ``--help`` prints the benchmark's docstring and a word it does not know is
refused, both before anything runs: otherwise either would start minutes of measuring and
then overwrite the results that ``docs/benchmarks.md`` cites.

Imports nothing of the project, so that every benchmark can use it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def words(doc: str | None, known: Sequence[str] = ("quick",),
          argv: Sequence[str] | None = None) -> set[str]:  # fmt: skip
    """The words given (each one of ``known``); exits 2 with a usage line on any other."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "words", nargs="*", metavar="WORD",
        help=f"any of: {', '.join(known)}" if known else "none: this benchmark takes no words",
    )  # fmt: skip
    given: list[str] = parser.parse_args(sys.argv[1:] if argv is None else list(argv)).words
    unknown = [w for w in given if w not in known]
    if unknown:
        listed = ", ".join(known) or "none"
        parser.error(f"unknown {', '.join(map(repr, unknown))}; known: {listed}")
    return set(given)
