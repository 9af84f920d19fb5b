"""agent-parallel: background tasks and a dependency-aware parallel work queue over MCP."""

__version__ = "0.1.0"
