"""Streamable HTTP exposure: loopback by default; anything wider needs a bearer token.

A loopback bind is reachable only from this machine. What keeps web pages in the user's browser
out is the DNS-rebinding guard (the SDK's Host and Origin checks): a page on ``evil.example`` that
re-resolves its name to 127.0.0.1 still sends ``Host: evil.example``. The guard is configured here,
explicitly, for every bind: never left to the SDK, which turns it on only for three spellings of
loopback. For a loopback bind it accepts the loopback names at the bound port (the spelling given,
its canonical form, ``localhost``, ``127.0.0.1``, ``[::1]``): no page can make a browser send those
for another origin. Binding any other address reaches other machines, so ``serve`` refuses it
unless ``MCP_COLLAB_HTTP_TOKEN`` is set; then every request must carry ``Authorization: Bearer
<token>`` (compared in constant time) and the guard accepts the bound address (plus the loopback
names on an all-interfaces bind) and ``MCP_COLLAB_HTTP_ALLOWED_HOSTS``. A token set for a loopback
server is required just the same.

Sessions are bounded: at most ``MCP_COLLAB_HTTP_MAX_SESSIONS`` are open at once, and one with no
request in flight for ``MCP_COLLAB_HTTP_SESSION_IDLE_S`` is closed (both enforced by the SDK's
session manager). One session too many is refused with a 503 naming the limit rather than evicting
another: eviction would let any local client end other clients' sessions at will, while a refusal
leaves every established session intact and the idle expiry frees what abandoned clients hold.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import socket
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings

from .errors import ConfigError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Long enough that guessing it over the network is hopeless.
MIN_TOKEN_CHARS = 32
# Names a local client may put in Host for a loopback server; a rebinding page cannot send these.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# The port a browser leaves out of Host and Origin.
DEFAULT_HTTP_PORT = 80
# JSON-RPC "internal error", the code the SDK gives its own session-limit refusal.
SESSION_LIMIT_CODE = -32603

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class BindAddress:
    """An address for ``--host`` as the socket layer will see it."""

    given: str  # as the operator spelled it, brackets removed
    host: str  # what uvicorn binds: canonical numeric form, or the name
    address: IPAddress | None  # None for a host name
    loopback: bool


def parse_bind(host: str) -> BindAddress:
    """Read ``host`` the way the bind will: every numeric spelling the resolver accepts (``127.1``,
    ``0:0:0:0:0:0:0:1``, ``[::1]``, ``::ffff:127.0.0.1``) is the address it denotes, and
    ``localhost`` in any case, with or without the root dot, is loopback. Any other name is not."""
    given = host.strip()
    if given.startswith("[") and given.endswith("]"):
        given = given[1:-1]
    if not given:
        # The socket layer reads an empty host as every interface; nobody means that by accident.
        raise ConfigError("--host is empty; give an address to bind, such as 127.0.0.1 (or 0.0.0.0 with a token)")
    address = _numeric(given)
    if address is None:
        name = given.lower().removesuffix(".")
        if name == "localhost":
            return BindAddress(given, "localhost", None, True)
        return BindAddress(given, given, None, False)
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    if mapped is not None:
        # An IPv4-mapped address is the IPv4 address; asyncio's IPv6-only listening sockets could
        # not bind the mapped form anyway.
        return BindAddress(given, str(mapped), mapped, mapped.is_loopback)
    return BindAddress(given, str(address), address, address.is_loopback)


def _numeric(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        # The C resolver also takes the short and numeric IPv4 forms (127.1, 2130706433).
        infos = socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError):
        return None
    return ipaddress.ip_address(str(infos[0][4][0]))


def is_loopback(host: str) -> bool:
    return parse_bind(host).loopback


def _authorities(names: Sequence[str], port: int) -> list[str]:
    """The Host header values for ``names`` at ``port``; port 0 (chosen at bind) matches any port."""
    out: list[str] = []
    for name in names:
        bracketed = f"[{name}]" if ":" in name else name
        if port == 0:
            out.append(f"{bracketed}:*")
            continue
        out.append(f"{bracketed}:{port}")
        if port == DEFAULT_HTTP_PORT:
            out.append(bracketed)
    return list(dict.fromkeys(out))


def rebinding_guard(bind: BindAddress, port: int, allowed_hosts: Sequence[str] = ()) -> TransportSecuritySettings:
    """The Host and Origin allow-lists for a server bound to ``bind``:``port``."""
    names = [bind.given, bind.host]
    spelled = _numeric(bind.given)
    if spelled is not None:
        names.append(spelled.compressed)  # what a browser sends for any spelling of the address
    if bind.loopback or (bind.address is not None and bind.address.is_unspecified):
        names += LOOPBACK_NAMES  # an all-interfaces bind is reached through loopback too
    hosts = [*_authorities(list(dict.fromkeys(names)), port), *allowed_hosts]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=hosts,
        allowed_origins=[f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")],
    )


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


class SessionLimitMessage:
    """ASGI middleware: the SDK's refusal of one session too many says which limit and what to do.

    The SDK answers 503 only when a request without a session id would open a session beyond
    ``max_sessions``; that response is replaced, everything else passes untouched.
    """

    def __init__(self, app: ASGIApp, max_sessions: int, idle_s: float) -> None:
        self.app = app
        message = (
            f"too many open MCP sessions: the limit is {max_sessions} (MCP_COLLAB_HTTP_MAX_SESSIONS); "
            f"end unused sessions (DELETE /mcp with their Mcp-Session-Id) or retry once idle ones close "
            f"(after {idle_s:g} s without a request, MCP_COLLAB_HTTP_SESSION_IDLE_S)"
        )
        error = {"jsonrpc": "2.0", "id": None, "error": {"code": SESSION_LIMIT_CODE, "message": message}}
        self.body = json.dumps(error).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        has_session = any(k == b"mcp-session-id" for k, _ in scope.get("headers") or [])
        if scope["type"] != "http" or has_session:
            await self.app(scope, receive, send)
            return
        replaced = False

        async def send_named(message: Message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 503:
                replaced = True
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self.body)).encode())]
                await send({"type": "http.response.start", "status": 503, "headers": headers})
                await send({"type": "http.response.body", "body": self.body})
            elif not replaced:  # the SDK's own body of a replaced response is dropped
                await send(message)

        await self.app(scope, receive, send_named)


class HTTPApp:
    """The ASGI app ``serve --transport http`` runs, and what it was built for."""

    def __init__(self, app: ASGIApp, bind: BindAddress, session_manager: StreamableHTTPSessionManager) -> None:
        self.app = app
        self.bind = bind
        self.session_manager = session_manager

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    def open_sessions(self) -> int:
        """Sessions holding a transport and a server task right now."""
        # The SDK keeps no public count; this is the one place that reads its session table.
        return len(self.session_manager._server_instances)


def build_http_app(
    server: MCPServer[Any],
    *,
    host: str,
    port: int,
    token: str | None,
    allowed_hosts: Sequence[str] = (),
    max_sessions: int,
    session_idle_s: float,
) -> HTTPApp:
    """The ASGI app ``serve --transport http`` runs; refuses an exposed bind without a token."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"MCP_COLLAB_HTTP_TOKEN is {len(token)} characters; use at least {MIN_TOKEN_CHARS} random characters "
            "(for example: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if max_sessions < 1:
        raise ConfigError(
            f"MCP_COLLAB_HTTP_MAX_SESSIONS must be a whole number of sessions, 1 or more (read as {max_sessions})"
        )
    if not (math.isfinite(session_idle_s) and session_idle_s > 0):
        raise ConfigError(f"MCP_COLLAB_HTTP_SESSION_IDLE_S={session_idle_s} must be a finite number of seconds above 0")
    bind = parse_bind(host)
    if not bind.loopback and token is None:
        raise ConfigError(
            f"binding {host} exposes the server to other machines; set MCP_COLLAB_HTTP_TOKEN to a long random "
            "secret (clients send it as 'Authorization: Bearer <token>'), or bind 127.0.0.1"
        )
    starlette = server.streamable_http_app(
        host=bind.host,
        transport_security=rebinding_guard(bind, port, allowed_hosts),
        max_sessions=max_sessions,
        session_idle_timeout=session_idle_s,
    )
    app: ASGIApp = SessionLimitMessage(starlette, max_sessions, session_idle_s)
    if token is not None:
        app = BearerAuth(app, token)
    return HTTPApp(app, bind, server.session_manager)
