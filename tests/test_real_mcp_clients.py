"""The real ``codex``, ``gemini`` and ``claude`` binaries as MCP clients of ``mcp-collab serve``, each
configured as the README tells a user to, its model scripted by the loopback stub (``stub.converse``):
the model calls ``spawn_worker``, ``dispatch_task`` (a real CLI worker of another vendor, against the
same stub) and ``list_worker_runs``, then answers with text quoting the run id it read. Plus the
official TypeScript SDK client (npm ``@modelcontextprotocol/sdk``) on a 70 s run.

``MCP_COLLAB_RECORD_CLIENT_FIXTURES=1`` writes the trimmed requests each client's model received into
``fixtures/cli_outputs/<cli>-as-mcp-client/requests.json``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp_collab.config import Settings
from mcp_collab.orchestrator import WorkerOrchestrator
from tests.support.cli_homes import cli_bin_dir
from tests.support.vendor_stub import StubRequest, ToolCall, VendorStub, declared_tools, tool_results

pytestmark = [pytest.mark.anyio, pytest.mark.real_cli, pytest.mark.timeout(240)]

FIXTURES = Path(__file__).parent.parent / "fixtures" / "cli_outputs"
SERVER = [sys.executable, "-m", "mcp_collab", "serve"]
CLIENT_TIMEOUT_S = 180  # one client session with a worker run takes 5-15 s; the margin is for a loaded machine
RUN_ID = re.compile(r"run-\d{8}-\d{6}-[0-9a-f]{8}")
TASK = "Say hello from the worker"


@dataclass(frozen=True)
class McpClient:
    cli: str  # the binary
    api: str  # the stub api its model speaks
    worker_model: str  # the worker it registers: another vendor's CLI, so the two never share a home
    worker_cli_model: str | None
    worker_api: str
    tool_prefix: str  # how the client names our tools to its model


CLIENTS = [
    McpClient("codex", "openai", "claude_cli", None, "anthropic", "mcp__mcp_collab/"),
    McpClient("gemini", "gemini", "codex_cli", None, "openai", "mcp_mcp-collab_"),
    McpClient("claude", "anthropic", "gemini_cli", "gemini-2.5-flash", "gemini", "mcp__mcp-collab__"),
]


def codex_config(base: str, server_env: dict[str, str]) -> str:
    """The README's codex recipe under the stub's provider settings (``cli_homes``)."""
    env = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in server_env.items())
    return f"""{base}
[mcp_servers.mcp-collab]
command = {json.dumps(SERVER[0])}
args = {json.dumps(SERVER[1:])}
required = true
default_tools_approval_mode = "approve"
env = {{ {env} }}
"""


def client_argv(
    client: McpClient, home: Path, server_env: dict[str, str], prompt: str
) -> tuple[list[str], dict[str, str]]:
    """The client's command line and the variables it needs besides ``cli_env``'s, its MCP config written."""
    home.mkdir(parents=True)
    server = {"command": SERVER[0], "args": SERVER[1:], "env": server_env}
    if client.cli == "codex":
        base = (Path(server_env["CODEX_HOME"]) / "config.toml").read_text(encoding="utf-8")
        (home / "config.toml").write_text(codex_config(base, server_env), encoding="utf-8")
        argv = ["codex", "exec", "--json", "--skip-git-repo-check", "-m", "gpt-5.5", prompt]
        return argv, {"CODEX_HOME": str(home)}
    if client.cli == "gemini":
        settings_file = Path(server_env["GEMINI_CLI_HOME"]) / ".gemini" / "settings.json"
        settings = json.loads(settings_file.read_text(encoding="utf-8"))
        settings["mcpServers"] = {"mcp-collab": {**server, "trust": True}}
        (home / ".gemini").mkdir()
        (home / ".gemini" / "settings.json").write_text(json.dumps(settings), encoding="utf-8")
        argv = ["gemini", "-p", prompt, "-m", "gemini-2.5-flash", "-o", "json"]
        return argv, {"GEMINI_CLI_HOME": str(home)}
    config = home / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"mcp-collab": server}}), encoding="utf-8")
    argv = [
        "claude", "-p", prompt, "--mcp-config", str(config), "--strict-mcp-config",
        "--allowedTools", "mcp__mcp-collab", "--output-format", "json", "--model", "claude-sonnet-4-5",
    ]  # fmt: skip
    return argv, {}


def final_answer(results: list[str]) -> str:
    """The scripted model's last turn: it quotes the run id and status it read in list_worker_runs."""
    listed = results[-1]
    found = RUN_ID.search(listed)
    status = re.search(r'"status":\s*"(\w+)"', listed)
    return f"The run {found.group(0) if found else 'NOT FOUND'} is {status.group(1) if status else 'UNKNOWN'}."


def script(stub: VendorStub, client: McpClient, workdir: Path) -> None:
    worker: dict[str, Any] = {"name": "helper", "model": client.worker_model}
    if client.worker_cli_model:
        worker["cliModel"] = client.worker_cli_model
    turns: list[Any] = [
        ToolCall("spawn_worker", worker),
        ToolCall(
            "dispatch_task", {"task": TASK, "workers": ["helper"], "workingDirectory": str(workdir), "waitSeconds": 50}
        ),
        ToolCall("list_worker_runs", {}),
        final_answer,
    ]
    if client.cli == "codex":
        # codex 0.169 defers MCP tools behind its client-side tool_search for OpenAI models: the model
        # searches first, and the search's output offers it the tools.
        turns.insert(0, ToolCall("tool_search", {"query": "mcp-collab workers dispatch runs", "limit": 20}))
    stub.converse(client.api, *turns)


def client_requests(stub: VendorStub, client: McpClient) -> list[StubRequest]:
    """The requests of the client's own model: those that offer it our tools."""
    return [
        r for r in stub.requests_for(client.api)
        if any(n.startswith(client.tool_prefix) for n in declared_tools(r))
    ]  # fmt: skip


@pytest.mark.parametrize("client", CLIENTS, ids=[c.cli for c in CLIENTS])
async def test_a_real_cli_as_mcp_client_registers_dispatches_and_lists(
    client: McpClient, real_env: dict[str, str], stub: VendorStub, tmp_path: Path
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    script(stub, client, workdir)
    argv, extra = client_argv(client, tmp_path / "client", real_env, "Use mcp-collab: have a helper say hello.")
    with anyio.fail_after(CLIENT_TIMEOUT_S):
        done = await anyio.run_process(argv, env={**real_env, **extra}, cwd=workdir, check=False)
    out, err = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
    assert done.returncode == 0, f"{client.cli} exited {done.returncode}\n{out[-3000:]}\n{err[-3000:]}"

    # The store holds the run the worker completed.
    orchestrator = WorkerOrchestrator(Settings.from_env(real_env))
    try:
        runs = (await orchestrator.list_runs()).runs
    finally:
        await orchestrator.aclose()
    assert len(runs) == 1, f"the store holds {len(runs)} runs; the client said:\n{out[-3000:]}"
    [run] = runs
    assert (run.task, run.status, run.workers) == (TASK, "completed", ["helper"]), run.error
    [step] = run.steps
    assert (step.worker_name, step.runtime_mode, step.status) == ("helper", "cli", "completed")
    worker_said = f"stub reply from {client.worker_api} model"
    assert step.output.startswith(worker_said) and step.output.endswith(TASK)
    assert any(r.last_user_text.endswith(TASK) for r in stub.requests_for(client.worker_api)), "the real worker ran"

    # Each result reached the client's model: the dispatch result carries the worker's answer, the
    # list the run; and the model's answer, quoting them, reached the user.
    seen = client_requests(stub, client)
    last = tool_results(seen[-1])
    offset = 1 if client.cli == "codex" else 0  # the tool search's result comes first
    assert len(last) == 3 + offset, [r[:200] for r in last]
    spawned, dispatched, listed = last[offset:]
    assert '"helper"' in spawned and '"' + client.worker_model + '"' in spawned
    assert run.id in dispatched and worker_said in dispatched and "completed" in dispatched
    assert run.id in listed
    assert f"The run {run.id} is completed." in out

    if os.environ.get("MCP_COLLAB_RECORD_CLIENT_FIXTURES") == "1":
        record(client, seen, tmp_path, stub.url)


# ---------------------------------------------------------------------------
# fixtures: what each client's model was sent, trimmed


def _trim(value: Any, clean: Callable[[str], str], limit: int = 400) -> Any:
    if isinstance(value, str):
        value = clean(value)
        return value if len(value) <= limit else value[:limit] + f"... [{len(value)} chars]"
    if isinstance(value, list):
        return [_trim(v, clean, limit) for v in value]
    if isinstance(value, dict):
        return {k: _trim(v, clean, limit) for k, v in value.items()}
    return value


def _trimmed_request(req: StubRequest, client: McpClient, clean: Callable[[str], str]) -> dict[str, Any]:
    """The request with our tools (dispatch_task's declaration only) and its last turns, shortened."""
    body = dict(req.body) if isinstance(req.body, dict) else {}
    tools = []
    for tool in body.get("tools") or []:
        if client.api == "gemini":
            tools.append(
                {
                    "functionDeclarations": [
                        d for d in tool.get("functionDeclarations", []) if d["name"].endswith("dispatch_task")
                    ]
                }
            )
        elif tool.get("type") in ("tool_search", "namespace") or str(tool.get("name", "")).endswith("dispatch_task"):
            tools.append(tool)
    body["tools"] = tools
    for key in ("input", "contents", "messages"):
        if isinstance(body.get(key), list):
            body[key] = body[key][-8:]  # the turns with the tool calls and results, not the preamble
    for key in ("system", "systemInstruction", "instructions", "client_metadata", "metadata"):
        body.pop(key, None)
    return {
        "path": req.path,
        "user_agent": req.user_agent.split(" ")[0],
        "declared_tools": [n for n in declared_tools(req) if client.tool_prefix in n or n == "tool_search"],
        "tool_results": _trim(tool_results(req), clean, 300),
        "body": _trim(body, clean),
    }


def record(client: McpClient, seen: list[StubRequest], tmp_path: Path, stub_url: str) -> None:
    """The first request (the tools as offered) and the last (every result), trimmed, machine-free."""
    pytest_tmp = re.compile(r"/[^\s\"']*/pytest-\d+/[^/\s\"']+")

    def clean(text: str) -> str:
        return pytest_tmp.sub(
            "<TMP>", text.replace(str(tmp_path), "<TMP>").replace(stub_url, "http://127.0.0.1:<PORT>")
        )

    target = FIXTURES / f"{client.cli}-as-mcp-client"
    target.mkdir(parents=True, exist_ok=True)
    text = json.dumps([_trimmed_request(r, client, clean) for r in (seen[0], seen[-1])], indent=1, ensure_ascii=False)
    (target / "requests.json").write_text(text + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------
# the official TypeScript SDK client

TS_CLIENT = Path(__file__).parent / "support" / "ts_client.mjs"
LONG_RUN_S = 70  # longer than the SDK's default 60 s request timeout
TS_TIMEOUT_S = 200  # the two 70 s scenarios run at once; the margin is for a loaded machine
# A worker that says nothing for LONG_RUN_S, then answers: only the server's heartbeats are progress.
QUIET_CLI = """\
import json, os, sys, time
sys.stdin.read()
print(json.dumps({"type": "thread.started", "thread_id": "quiet"}), flush=True)
time.sleep(float(os.environ["CODEX_QUIET_SECONDS"]))
print(json.dumps({"type": "item.completed", "item": {"id": "m", "type": "agent_message", "text": "quiet work done"}}))
print(json.dumps({"type": "turn.completed", "usage": {"input_tokens": 1, "output_tokens": 1}}), flush=True)
"""


def sdk_dir() -> Path:
    bin_dir = cli_bin_dir()
    found = bin_dir.parent / "@modelcontextprotocol" / "sdk" if bin_dir is not None else None
    if found is None or not (found / "package.json").exists():
        message = "the TypeScript MCP SDK (@modelcontextprotocol/sdk) is not installed: run scripts/install-clis"
        if os.environ.get("MCP_COLLAB_REQUIRE_REAL_CLIS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


async def ts_session(mode: str, base_env: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    """One run of ts_client.mjs in ``mode`` against its own server and store; its report."""
    quiet = tmp_path / f"quiet-{mode}"
    quiet.write_text(f"#!{sys.executable}\n{QUIET_CLI}", encoding="utf-8")
    quiet.chmod(0o755)
    env = {
        **base_env,
        "MCP_COLLAB_STATE_DIR": str(tmp_path / f"state-{mode}"),
        "MCP_COLLAB_CODEX_BIN": str(quiet),
        "CODEX_QUIET_SECONDS": str(LONG_RUN_S),
    }
    server = json.dumps({"command": SERVER[0], "args": SERVER[1:], "env": env}).encode()
    argv = ["node", str(TS_CLIENT), str(sdk_dir()), mode]
    done = await anyio.run_process(argv, input=server, env=base_env, check=False)
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 0, f"ts_client {mode} exited {done.returncode}\n{err[-3000:]}"
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.mark.timeout(TS_TIMEOUT_S + 30)
async def test_the_typescript_sdk_client_follows_a_70s_run_with_and_without_progress_resets(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    reports: dict[str, dict[str, Any]] = {}

    async def session(mode: str) -> None:
        reports[mode] = await ts_session(mode, base_env, tmp_path)

    with anyio.fail_after(TS_TIMEOUT_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(session, "default")
            tg.start_soon(session, "reset")

    # The SDK's defaults: the bounded wait returns before the 60 s timeout, wait_worker_run follows.
    default = reports["default"]
    assert default["defaultTimeoutMs"] == 60_000 and default["serverVersion"]["name"]
    spawn, dispatch, *waits = default["calls"]
    assert not spawn.get("error") and not spawn["isError"]
    assert dispatch["result"]["status"] == "running", dispatch
    assert waits and all("error" not in w for w in waits), waits
    assert [w["result"]["status"] for w in waits][-1] == "completed"
    assert waits[-1]["result"]["steps"][0]["output"] == "quiet work done"

    # 10 s timeouts with resetTimeoutOnProgress: heartbeats keep a 55 s call alive, and without
    # the reset the same timeout gives up.
    reset = reports["reset"]
    _, dispatch, control, *waits = reset["calls"]
    assert dispatch["result"]["status"] == "running", dispatch
    assert dispatch["progress"] >= 2, "the server sent heartbeats while the call waited"
    assert control["error"]["code"] == -32001, control  # the SDK's RequestTimeout
    assert waits and all("error" not in w for w in waits), waits
    assert waits[-1]["result"]["status"] == "completed" and waits[-1]["progress"] >= 1
    assert waits[-1]["result"]["steps"][0]["output"] == "quiet work done"
