"""The ``agent-parallel`` command line: ``main`` parses arguments and runs a command; ``render``
draws plans, runs and tasks for a terminal."""

from .main import main as main

__all__ = ["main"]
