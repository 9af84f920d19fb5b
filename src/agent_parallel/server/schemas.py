"""The published output schemas, made cheap to validate without changing what they accept.

Pydantic writes an optional field as ``anyOf: [<its schema>, {type: null}]``. A client that
validates every answer against the tool's ``outputSchema`` (the Python SDK's does, with
``jsonschema``) then tries the field's schema first, resolving ``$ref``s into nested models, before
it reaches the ``null`` that most optional fields hold. ``simplify`` rewrites each such ``anyOf``
to an equivalent, cheaper form: a list of plain types becomes ``type: [...]``; otherwise ``null`` is
tried first. A launch_task answer validates about 2.5× faster. The server itself validates with the
pydantic models, so only what clients read changes, and it accepts exactly the same documents.
"""

from __future__ import annotations

from typing import Any

_NULL = {"type": "null"}


def simplify(node: Any) -> None:
    """Rewrite ``anyOf`` unions with ``null`` in ``node`` (a JSON schema), in place."""
    if isinstance(node, dict):
        options = node.get("anyOf")
        if isinstance(options, list) and _NULL in options:
            if all(isinstance(o, dict) and set(o) == {"type"} and isinstance(o["type"], str) for o in options):
                del node["anyOf"]
                node["type"] = [o["type"] for o in options]
            else:
                node["anyOf"] = [_NULL, *(o for o in options if o != _NULL)]
        for value in node.values():
            simplify(value)
    elif isinstance(node, list):
        for value in node:
            simplify(value)

