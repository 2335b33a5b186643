"""Streamable HTTP: loopback by default; a wider bind needs a bearer token; the DNS-rebinding guard
stays on for every spelling of every bind; open sessions are bounded in number and idle time."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_collab.config import Settings
from mcp_collab.errors import ConfigError
from mcp_collab.http import HTTPApp, build_http_app
from mcp_collab.server import build_server
from tests.support.mcp_helpers import START_TIMEOUT_S, free_port, wait_listening

TOKEN = "t0ken-for-tests-only-" + "x" * 24
PROTOCOL = "2025-06-18"
INITIALIZE = json.dumps(
    {"jsonrpc": "2.0", "id": 1, "method": "initialize",
     "params": {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
)  # fmt: skip
PING = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "ping"})
MCP_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
# A port the ASGI-level cases build for; nothing listens on it.
BUILT_PORT = 8765


def post(port: int, *, host: str | None = None, token: str | None = None, connect: str = "127.0.0.1") -> int:
    """A raw initialize POST to connect:port with the given Host and Authorization; the status."""
    return exchange(port, host=host, token=token, connect=connect)[0]


def exchange(
    port: int,
    *,
    method: str = "POST",
    body: str | None = INITIALIZE,
    host: str | None = None,
    token: str | None = None,
    session: str | None = None,
    connect: str = "127.0.0.1",
) -> tuple[int, str | None, str]:
    """One raw request to connect:port/mcp; (status, Mcp-Session-Id answered, body)."""
    conn = http.client.HTTPConnection(connect, port, timeout=10)
    headers = dict(MCP_HEADERS)
    if host is not None:
        headers["Host"] = host
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if session is not None:
        headers["Mcp-Session-Id"] = session
        headers["Mcp-Protocol-Version"] = PROTOCOL
    try:
        conn.request(method, "/mcp", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("mcp-session-id"), response.read().decode("utf-8")
    finally:
        conn.close()


def serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcp_collab", "serve", "--transport", "http", *args],
        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def http_app(settings: Settings, host: str, port: int, token: str | None = None) -> HTTPApp:
    """The app ``serve`` builds for ``--host host --port port`` with these settings."""
    return build_http_app(
        build_server(settings), host=host, port=port, token=token,
        max_sessions=settings.http_max_sessions, session_idle_s=settings.http_session_idle_s,
    )  # fmt: skip


def test_an_exposed_bind_without_a_token_is_refused_before_it_listens(base_env: dict[str, str]) -> None:
    port = free_port()
    done = serve({**base_env, "PATH": os.environ["PATH"]}, "--host", "0.0.0.0", "--port", str(port))
    assert done.returncode != 0
    assert "exposes the server to other machines" in done.stderr and "MCP_COLLAB_HTTP_TOKEN" in done.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()


def test_a_short_token_is_refused(base_env: dict[str, str]) -> None:
    done = serve({**base_env, "PATH": os.environ["PATH"], "MCP_COLLAB_HTTP_TOKEN": "short"}, "--port", str(free_port()))
    assert done.returncode != 0 and "at least 32 random characters" in done.stderr


@pytest.mark.anyio
async def test_with_a_token_every_request_must_carry_it(base_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    env = {**base_env, "PATH": os.environ["PATH"], "MCP_COLLAB_HTTP_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcp_collab", "serve", "--transport", "http", "--port", str(port)],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_listening(port, proc)
        assert post(port) == 401
        assert post(port, token=TOKEN[:-1] + "y") == 401
        assert post(port, token=TOKEN) == 200
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            async with Client(streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http)) as client:
                tools = {t.name for t in (await client.list_tools()).tools}
        assert "dispatch_task" in tools
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
    assert TOKEN not in (tmp_path / "server.log").read_text(errors="replace"), "the token is never logged"


def until_started(server: uvicorn.Server, thread: threading.Thread) -> None:
    """Until uvicorn has bound its socket; fails if its thread ends first (the bind failed)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        assert time.monotonic() < deadline, "the server did not start in time"
        time.sleep(0.02)


Start = Callable[..., int]


@pytest.fixture
def in_process_server() -> Iterator[Start]:
    """Run a built app with uvicorn in a thread on a loopback address (127.0.0.1 unless told) and a
    free port (unless told); stop it after the test."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(app: Any, *, host: str = "127.0.0.1", port: int | None = None) -> int:
        port = free_port() if port is None else port
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        until_started(server, thread)
        return port

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def test_an_exposed_configuration_needs_the_token_and_keeps_the_dns_rebinding_guard(
    make_settings: Callable[..., Settings], in_process_server: Start
) -> None:
    # Built as for a server bound to 203.0.113.7 (documentation range); the test listens on loopback
    # only and presents that address in the Host header.
    port = free_port()
    app = http_app(make_settings(), "203.0.113.7", port, token=TOKEN)
    in_process_server(app, port=port)
    exposed = f"203.0.113.7:{port}"
    assert post(port, host=exposed) == 401, "no token, no entry"
    assert post(port, host="evil.example", token=TOKEN) == 421, "a foreign Host is refused even with the token"
    assert post(port, host=f"evil.example:{port}", token=TOKEN) == 421
    assert post(port, host=exposed, token=TOKEN) == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_an_all_interfaces_bind_needs_the_token_and_accepts_only_its_own_names(
    make_settings: Callable[..., Settings], in_process_server: Start, host: str
) -> None:
    port = free_port()
    in_process_server(http_app(make_settings(), host, port, token=TOKEN), port=port)
    assert post(port, host=f"127.0.0.1:{port}") == 401
    assert post(port, host=f"evil.example:{port}", token=TOKEN) == 421
    assert post(port, host=f"127.0.0.1:{port}", token=TOKEN) == 200, "local clients reach it through loopback"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "0", "192.0.2.1", "::ffff:192.0.2.1", "example.com",
                                  "localhost.example", "127.0.0.1.example"])  # fmt: skip
def test_build_refuses_an_exposed_bind_without_a_token(make_settings: Callable[..., Settings], host: str) -> None:
    with pytest.raises(ConfigError, match=r"exposes the server to other machines.*MCP_COLLAB_HTTP_TOKEN"):
        http_app(make_settings(), host, 1)


@pytest.mark.parametrize("host", ["", " ", "[]"])
def test_an_empty_host_is_refused_not_read_as_every_interface(
    make_settings: Callable[..., Settings], host: str
) -> None:
    with pytest.raises(ConfigError, match="--host is empty; give an address to bind"):
        http_app(make_settings(), host, 1, token=TOKEN)


# Every spelling of a loopback bind, and a Host a legitimate local client sends for it.
LOOPBACK_SPELLINGS = [
    ("127.0.0.1", "127.0.0.1"),
    ("127.0.0.2", "127.0.0.2"),
    ("127.255.255.254", "127.255.255.254"),
    ("127.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("localhost", "localhost"),
    ("LOCALHOST", "localhost"),
    ("localhost.", "localhost"),
    ("::1", "[::1]"),
    ("[::1]", "[::1]"),
    ("0:0:0:0:0:0:0:1", "[::1]"),
    ("0:0:0:0:0:0:0:1", "[0:0:0:0:0:0:0:1]"),
    ("::ffff:127.0.0.1", "[::ffff:7f00:1]"),
    ("::ffff:127.0.0.1", "127.0.0.1"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("spelling", "legitimate"), LOOPBACK_SPELLINGS)
async def test_every_loopback_spelling_refuses_a_rebinding_page_and_serves_local_clients(
    make_settings: Callable[..., Settings], spelling: str, legitimate: str
) -> None:
    app = http_app(make_settings(), spelling, BUILT_PORT)
    transport = httpx2.ASGITransport(app=app)
    async with app.session_manager.run(), httpx2.AsyncClient(transport=transport) as http:

        async def status(host: str, origin: str | None = None, version: str | None = None) -> int:
            headers = {**MCP_HEADERS, "Host": host}
            if origin is not None:
                headers["Origin"] = origin
            if version is not None:
                headers["Mcp-Protocol-Version"] = version
            url = f"http://127.0.0.1:{BUILT_PORT}/mcp"
            return (await http.post(url, content=INITIALIZE, headers=headers)).status_code

        mine = f"{legitimate}:{BUILT_PORT}"
        assert await status(f"evil.example:{BUILT_PORT}") == 421, "a rebinding page sends its own name"
        assert await status("evil.example") == 421
        assert await status(f"{legitimate}:{BUILT_PORT + 1}") == 421, "only the bound port is accepted"
        assert await status(f"evil.example:{BUILT_PORT}", version="2026-07-28") == 421, "the stateless path too"
        assert await status(mine, origin=f"http://evil.example:{BUILT_PORT}") == 403, "a foreign page's Origin"
        assert await status(mine, origin="http://127.0.0.1:3000") == 403, "another local port is another origin"
        assert await status(mine) == 200
        assert await status(mine, origin=f"http://{mine}") == 200


@pytest.mark.anyio
async def test_the_operator_can_allow_a_reverse_proxy_name_on_a_loopback_bind(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    app = build_http_app(
        build_server(settings), host="127.0.0.1", port=BUILT_PORT, token=None, allowed_hosts=["mcp.example:443"],
        max_sessions=settings.http_max_sessions, session_idle_s=settings.http_session_idle_s,
    )  # fmt: skip
    async with app.session_manager.run(), httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app)) as http:
        url = f"http://127.0.0.1:{BUILT_PORT}/mcp"
        proxied = await http.post(url, content=INITIALIZE, headers={**MCP_HEADERS, "Host": "mcp.example:443"})
        foreign = await http.post(url, content=INITIALIZE, headers={**MCP_HEADERS, "Host": "evil.example:443"})
    assert (proxied.status_code, foreign.status_code) == (200, 421)


def test_a_loopback_alias_bound_for_real_refuses_a_foreign_host(
    make_settings: Callable[..., Settings], in_process_server: Start
) -> None:
    # 127.0.0.2 is loopback on Linux (all of 127/8 is); the SDK's own guard would leave it open.
    port = free_port()
    in_process_server(http_app(make_settings(), "127.0.0.2", port), host="127.0.0.2", port=port)
    assert post(port, host=f"evil.example:{port}", connect="127.0.0.2") == 421
    assert post(port, host=f"127.0.0.2:{port}", connect="127.0.0.2") == 200


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.anyio
@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1) to bind")
async def test_serve_binds_a_bracketed_ipv6_loopback_with_the_guard_on(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcp_collab", "serve", "--transport", "http", "--host", "[::1]", "--port", str(port)],
        env={**base_env, "PATH": os.environ["PATH"]}, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        with anyio.fail_after(START_TIMEOUT_S):
            while True:
                try:
                    socket.create_connection(("::1", port), timeout=0.2).close()
                    break
                except OSError:
                    assert proc.poll() is None, (tmp_path / "server.log").read_text(errors="replace")
                    await anyio.sleep(0.05)
        assert post(port, host=f"evil.example:{port}", connect="::1") == 421
        async with Client(f"http://[::1]:{port}/mcp") as client:
            assert "dispatch_task" in {t.name for t in (await client.list_tools()).tools}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


async def until(condition: Callable[[], bool]) -> None:
    """Until ``condition`` holds: for state the server changes after its response has gone out."""
    with anyio.fail_after(30):
        while not condition():
            await anyio.sleep(0.02)


@pytest.mark.anyio
async def test_one_session_too_many_is_refused_with_the_limit_and_nothing_is_held_for_it(
    make_settings: Callable[..., Settings], in_process_server: Start
) -> None:
    port = free_port()
    app = http_app(make_settings(MCP_COLLAB_HTTP_MAX_SESSIONS="3"), "127.0.0.1", port)
    in_process_server(app, port=port)
    sessions = []
    for _ in range(3):
        status, session, _body = exchange(port)
        assert status == 200 and session
        sessions.append(session)
    assert app.open_sessions() == 3
    for _ in range(5):
        status, session, body = exchange(port)
        assert (status, session) == (503, None)
        error = json.loads(body)["error"]
        assert "the limit is 3 (MCP_COLLAB_HTTP_MAX_SESSIONS)" in error["message"]
        assert "DELETE /mcp" in error["message"]
    assert app.open_sessions() == 3, "a refused initialize holds nothing"
    assert all(exchange(port, body=PING, session=s)[0] == 200 for s in sessions), "the open sessions still serve"

    assert exchange(port, method="DELETE", body=None, session=sessions[0])[0] == 200
    await until(lambda: app.open_sessions() == 2)
    assert exchange(port, body=PING, session=sessions[0])[0] == 404
    status, session, _body = exchange(port)
    assert status == 200 and session, "an ended session makes room"
    assert app.open_sessions() == 3


@pytest.mark.anyio
async def test_an_idle_session_is_closed_but_one_with_a_request_in_flight_is_kept(
    make_settings: Callable[..., Settings], in_process_server: Start
) -> None:
    port = free_port()
    app = http_app(make_settings(MCP_COLLAB_HTTP_SESSION_IDLE_S="1"), "127.0.0.1", port)
    in_process_server(app, port=port)
    url = f"http://127.0.0.1:{port}/mcp"
    async with httpx2.AsyncClient(timeout=30) as http:
        busy = (await http.post(url, content=INITIALIZE, headers=MCP_HEADERS)).headers["mcp-session-id"]
        stream_headers = {"Accept": "text/event-stream", "Mcp-Session-Id": busy, "Mcp-Protocol-Version": PROTOCOL}
        async with http.stream("GET", url, headers=stream_headers) as listening:
            assert listening.status_code == 200, "the busy session holds an open GET stream"
            idle = (await http.post(url, content=INITIALIZE, headers=MCP_HEADERS)).headers["mcp-session-id"]
            assert app.open_sessions() == 2
            # The idle session was opened after the busy one, so its expiry proves the busy one has
            # been without a new request for longer than the idle limit.
            await until(lambda: app.open_sessions() == 1)
            ping = {**MCP_HEADERS, "Mcp-Protocol-Version": PROTOCOL}
            assert (await http.post(url, content=PING, headers={**ping, "Mcp-Session-Id": idle})).status_code == 404
            kept = await http.post(url, content=PING, headers={**ping, "Mcp-Session-Id": busy})
            assert kept.status_code == 200, "a session with a request in flight is never idle"
        await until(lambda: app.open_sessions() == 0)
        assert (await http.post(url, content=PING, headers={**ping, "Mcp-Session-Id": busy})).status_code == 404


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MCP_COLLAB_HTTP_MAX_SESSIONS": "0"}, "MCP_COLLAB_HTTP_MAX_SESSIONS='0' must be greater than zero"),
        (
            {"MCP_COLLAB_HTTP_MAX_SESSIONS": "0.5"},
            "MCP_COLLAB_HTTP_MAX_SESSIONS='0.5' must be a whole number",
        ),
        ({"MCP_COLLAB_HTTP_SESSION_IDLE_S": "soon"}, "MCP_COLLAB_HTTP_SESSION_IDLE_S='soon' is not a number"),
        ({"MCP_COLLAB_HTTP_SESSION_IDLE_S": "inf"}, "MCP_COLLAB_HTTP_SESSION_IDLE_S='inf' is not a finite number"),
    ],
)
def test_malformed_session_limits_name_the_variable(
    make_settings: Callable[..., Settings], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        http_app(make_settings(**env), "127.0.0.1", 1)
