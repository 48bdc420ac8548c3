"""fedge: the ``fedge`` console script, the device fleet emulator and the demo.

Owns the command line (``fedge.cli`` and ``fedge.commands``), which only wires arguments to
the packages that do the work. Subcommand modules import their heavy dependencies (torch,
aiohttp) inside the command, never at import time, so ``fedge --help`` stays instant and an
edge-only install can run the device-side commands.
"""
