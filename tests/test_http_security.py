"""Streamable HTTP: loopback by default; a wider bind needs a bearer token; the DNS-rebinding guard stays on."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_collab.config import Settings
from mcp_collab.errors import ConfigError
from mcp_collab.http import build_http_app
from mcp_collab.server import build_server
from tests.support.mcp_helpers import free_port, wait_listening

TOKEN = "t0ken-for-tests-only-" + "x" * 24
INITIALIZE = json.dumps(
    {"jsonrpc": "2.0", "id": 1, "method": "initialize",
     "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
)  # fmt: skip


def post(port: int, *, host: str | None = None, token: str | None = None) -> int:
    """A raw initialize POST to 127.0.0.1:port with the given Host and Authorization; the status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if host is not None:
        headers["Host"] = host
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request("POST", "/mcp", body=INITIALIZE, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcp_collab", "serve", "--transport", "http", *args],
        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
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


@pytest.fixture
def in_process_server() -> Iterator[Callable[[Any], int]]:
    """Run a built app with uvicorn on 127.0.0.1 in a thread; stop it after the test."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(app: Any) -> int:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_listening(port)
        servers.append((server, thread))
        return port

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def test_an_exposed_configuration_needs_the_token_and_keeps_the_dns_rebinding_guard(
    make_settings: Callable[..., Settings], in_process_server: Callable[[Any], int]
) -> None:
    # Built as for a server bound to 203.0.113.7 (documentation range); the test listens on loopback
    # only and presents that address in the Host header.
    port = free_port()
    app = build_http_app(build_server(make_settings()), host="203.0.113.7", port=port, token=TOKEN)
    listening = in_process_server(app)
    exposed = f"203.0.113.7:{port}"
    assert post(listening, host=exposed) == 401, "no token, no entry"
    assert post(listening, host="evil.example", token=TOKEN) == 421, "a foreign Host is refused even with the token"
    assert post(listening, host=exposed, token=TOKEN) == 200


def test_the_loopback_default_refuses_a_foreign_host_header(
    make_settings: Callable[..., Settings], in_process_server: Callable[[Any], int]
) -> None:
    app = build_http_app(build_server(make_settings()), host="127.0.0.1", port=0, token=None)
    port = in_process_server(app)
    assert post(port, host="evil.example") == 421, "a page on another origin cannot rebind to us"
    assert post(port, host=f"127.0.0.1:{port}") == 200


def test_build_refuses_an_exposed_bind_without_a_token(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigError, match="exposes the server"):
        build_http_app(build_server(make_settings()), host="0.0.0.0", port=1, token=None)
