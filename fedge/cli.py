"""The ``fedge`` console script: one subcommand per module in ``fedge.commands``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence

# Each module defines ``register(subparsers)``; the parser it adds sets ``func(args) -> int``.
COMMANDS = ("export", "serve", "task", "status", "watch", "fleet", "demo", "device", "db")


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"fedge.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"fedge.commands.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CommandError as e:
        print(f"fedge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader left (fedge status | head -1): nothing more to say, and no traceback.
        # Python flushes stdout again at exit, which would raise once more: send it nowhere.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    # Under `python -m fedge.cli` this file is `__main__`; commands import `fedge.cli`, whose
    # CommandError is a different class. Run the imported module so that it is the one caught.
    from fedge.cli import main as _main

    sys.exit(_main())
