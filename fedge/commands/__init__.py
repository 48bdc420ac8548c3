"""The ``fedge`` subcommands: one module each, registered by ``fedge.cli``."""
