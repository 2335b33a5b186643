"""Streamable HTTP exposure: loopback by default; anything wider needs a bearer token.

A server bound to 127.0.0.1 is reachable only from this machine; the SDK's DNS-rebinding guard
(Host and Origin checks) keeps web pages in the user's browser out. Binding any other address
reaches other machines, so ``serve`` refuses it unless ``MCP_COLLAB_HTTP_TOKEN`` is set; then every
request must carry ``Authorization: Bearer <token>`` (compared in constant time), and the
DNS-rebinding guard stays on with the bound address and ``MCP_COLLAB_HTTP_ALLOWED_HOSTS`` allowed.
A token set for a loopback server is required just the same.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from .errors import ConfigError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Long enough that guessing it over the network is hopeless.
MIN_TOKEN_CHARS = 32


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BearerAuth:
    """ASGI middleware: every HTTP request must present the bearer token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan events pass through
            return
        presented = dict(scope.get("headers") or []).get(b"authorization", b"")
        if hmac.compare_digest(presented, self.expected):
            await self.app(scope, receive, send)
            return
        reason = "missing bearer token" if not presented else "wrong bearer token"
        body = json.dumps({"error": f"unauthorized: {reason}; send Authorization: Bearer <MCP_COLLAB_HTTP_TOKEN>"})
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b'Bearer realm="mcp-collab"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})


def build_http_app(
    server: MCPServer[Any],
    *,
    host: str,
    port: int,
    token: str | None,
    allowed_hosts: Sequence[str] = (),
) -> ASGIApp:
    """The ASGI app ``serve --transport http`` runs; refuses an exposed bind without a token."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"MCP_COLLAB_HTTP_TOKEN is {len(token)} characters; use at least {MIN_TOKEN_CHARS} random characters "
            "(for example: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    security = None
    if not is_loopback(host):
        if token is None:
            raise ConfigError(
                f"binding {host} exposes the server to other machines; set MCP_COLLAB_HTTP_TOKEN to a long random "
                "secret (clients send it as 'Authorization: Bearer <token>'), or bind 127.0.0.1"
            )
        hosts = [f"{host}:{port}", *allowed_hosts]
        security = TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=hosts,
            allowed_origins=[f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")],
        )
    app: ASGIApp = server.streamable_http_app(host=host, transport_security=security)
    return BearerAuth(app, token) if token is not None else app
