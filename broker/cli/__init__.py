"""The ``credbroker`` command line: ``run``, ``check``, ``fleet`` and the rest."""

from broker.cli.main import main

__all__ = ["main"]
