"""Small helpers the MCP-level tests share: a successful tool call, a free loopback port, a server
that is up."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
from mcp import Client

START_TIMEOUT_S = 30.0


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    """Call a tool that must succeed; its structured result."""
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until 127.0.0.1:port accepts connections; fails if ``proc`` exits first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert proc is None or proc.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)


async def until_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """The async form of ``wait_listening``, for tests that start a server subprocess."""
    with anyio.fail_after(START_TIMEOUT_S):
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                assert proc.poll() is None, log.read_text(errors="replace")
                await anyio.sleep(0.1)
