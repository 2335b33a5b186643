"""The MCP Inspector's command-line mode (npm ``@modelcontextprotocol/inspector``, pinned in
scripts/npm/package.json) as a third-party client: each call starts ``mcp-collab serve`` over real
stdio, runs one MCP method and prints the result as one JSON object on stdout.

The inspector hands its stdio server only a few variables of its own environment (PATH, HOME, ...),
so the state dir goes through ``-e``; HOME points into tmp_path as well, so a mistake in this file
can never reach the user's store or the inspector's catalog in ~/.mcp-inspector.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli_homes import cli_bin_dir

pytestmark = pytest.mark.timeout(120)

EXPECTED_TOOLS = {
    "spawn_worker",
    "dispatch_task",
    "list_worker_runs",
    "get_worker_run",
    "check_runtimes",
    "list_workers",
    "remove_worker",
}
CALL_TIMEOUT = 60  # one inspector run takes about 2 s; the margin is for a loaded machine
TOOL_IS_ERROR_EXIT = 5  # the inspector's exit status when the tool result has isError: true


@dataclass
class Inspected:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def result(self) -> dict[str, Any]:
        """The MCP result: ``--format json`` prints ``{"result": ...}`` on stdout."""
        try:
            envelope = json.loads(self.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"stdout is not one JSON object ({exc}):\n{self}") from None
        assert isinstance(envelope, dict) and "result" in envelope, f"no result in the output:\n{self}"
        result: dict[str, Any] = envelope["result"]
        return result

    def __str__(self) -> str:
        return (
            f"argv: {self.argv}\nexit: {self.returncode}\nstdout: {self.stdout[:4000]}\nstderr: {self.stderr[-4000:]}"
        )


@pytest.fixture
def inspector() -> Path:
    """The npm-installed ``mcp-inspector``; a failure in CI (MCP_COLLAB_REQUIRE_REAL_CLIS=1), else a skip."""
    bin_dir = cli_bin_dir()
    binary = bin_dir / "mcp-inspector" if bin_dir is not None else None
    if binary is None or not binary.exists():
        message = "the MCP Inspector (mcp-inspector) is not installed: run scripts/install-clis"
        if os.environ.get("MCP_COLLAB_REQUIRE_REAL_CLIS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return binary


@pytest.fixture
def inspect(inspector: Path, tmp_path: Path) -> Any:
    """Run ``mcp-inspector --cli`` once against a fresh ``mcp-collab serve`` sharing one state dir."""
    state_dir = tmp_path / "state"
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "MCP_COLLAB_STATE_DIR": str(state_dir),
    }
    server = [sys.executable, "-m", "mcp_collab", "serve"]

    def run(*method: str) -> Inspected:
        argv = [
            str(inspector), "--cli", "--format", "json",
            "-e", f"MCP_COLLAB_STATE_DIR={state_dir}",
            *server, *method,
        ]  # fmt: skip
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=CALL_TIMEOUT,
            check=False,
        )
        return Inspected(argv, done.returncode, done.stdout, done.stderr)

    return run


def text_of(result: dict[str, Any]) -> str:
    return "\n".join(block["text"] for block in result.get("content", []) if block.get("type") == "text")


def test_inspector_lists_every_tool_with_portable_schemas(inspect: Any) -> None:
    # --strict: the inspector exits 6 if a tool schema has an error-severity portability problem.
    out = inspect("--method", "tools/list", "--strict")
    assert out.returncode == 0, str(out)
    tools = {tool["name"]: tool for tool in out.result["tools"]}
    assert EXPECTED_TOOLS <= set(tools), f"missing {EXPECTED_TOOLS - set(tools)}\n{out}"
    for name in EXPECTED_TOOLS:
        assert tools[name]["description"], name
        assert tools[name]["inputSchema"]["type"] == "object", name
    assert set(tools["spawn_worker"]["inputSchema"]["required"]) == {"name", "model"}


def test_inspector_spawns_a_worker_that_a_second_server_lists(inspect: Any) -> None:
    spawned = inspect(
        "--method", "tools/call", "--tool-name", "spawn_worker",
        "--tool-arg", "name=inspector-worker", "model=codex_cli",
    )  # fmt: skip
    assert spawned.returncode == 0, str(spawned)
    result = spawned.result
    assert result.get("isError") is False, str(spawned)
    worker = result["structuredContent"]
    assert worker["name"] == "inspector-worker" and worker["model"] == "codex_cli", str(spawned)
    assert json.loads(text_of(result)) == worker  # the text block carries the same object

    # A new inspector run starts a new server process; the worker must come back from the store.
    listed = inspect("--method", "tools/call", "--tool-name", "list_workers")
    assert listed.returncode == 0, str(listed)
    assert listed.result.get("isError") is False, str(listed)
    workers = listed.result["structuredContent"]["workers"]
    assert [(w["name"], w["model"]) for w in workers] == [("inspector-worker", "codex_cli")], str(listed)


def test_inspector_shows_a_bad_model_as_a_tool_error_naming_the_accepted_models(inspect: Any) -> None:
    out = inspect(
        "--method", "tools/call", "--tool-name", "spawn_worker",
        "--tool-arg", "name=bad-worker", "model=gpt_cli",
    )  # fmt: skip
    # A tool error is a result with isError: true (not a JSON-RPC error); the inspector exits 5.
    assert out.returncode == TOOL_IS_ERROR_EXIT, str(out)
    result = out.result
    assert result.get("isError") is True, str(out)
    message = text_of(result)
    assert "model" in message and "gpt_cli" in message, message
    for accepted in ("codex_cli", "gemini_cli", "claude_cli"):
        assert accepted in message, message
    assert "tool_is_error" in out.stderr, str(out)
