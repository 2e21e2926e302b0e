"""Subcommands of the experiments: train, ablate, report."""


def register(sub) -> None:
    """Add this package's subcommands to the ``gammaguide`` parser."""
