"""Bearer-token authentication for ``serve --allow-remote``."""

from __future__ import annotations

import hmac

from mcp.server.auth.provider import AccessToken


class StaticTokenVerifier:
    """Accepts exactly one bearer token (compared in constant time): for ``serve --allow-remote``."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def verify_token(self, token: str) -> AccessToken | None:
        if hmac.compare_digest(token.encode(), self._token):
            return AccessToken(token=token, client_id="agent-parallel-client", scopes=[])
        return None
