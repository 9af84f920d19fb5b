"""The MCP layer: it checks arguments, calls the task registry or the queue and translates answers
and errors; it owns no process and no queue file.

``app`` builds the server (``build_server``) and translates errors; ``settings`` holds
``ServerSettings`` and the ``Workspace`` each call gets; ``tools`` registers the tools,
``resources`` the task resources and their subscriptions, ``views`` shows a task to a client;
``tasks_extension`` serves protocol-native tasks; ``auth``, ``output_filter`` (``task_output``'s
``filter``) and ``prompt`` are the rest.
"""

from typing import TYPE_CHECKING, Any

from .settings import ServerSettings as ServerSettings, Workspace as Workspace

if TYPE_CHECKING:
    from .app import build_server as build_server

__all__ = ["build_server", "ServerSettings", "Workspace"]


def __getattr__(name: str) -> Any:
    """``build_server`` is imported on first use: `agent-parallel run` needs the settings, not the MCP stack."""
    if name == "build_server":
        from .app import build_server

        return build_server
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
