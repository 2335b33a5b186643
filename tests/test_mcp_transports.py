"""The server as a user runs it: `mcp-collab serve` over real stdio and over streamable HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters

from tests.conftest import fake_cli
from tests.support.mcp_helpers import call, free_port, until_listening
from tests.support.vendor_stub import StubReply, StubRequest, VendorStub

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]


def server_params(env: dict[str, str]) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "mcp_collab", "serve"], env=env)


def verdicts(req: StubRequest) -> StubReply:
    if "You are the reviewer" in req.prompt:
        return StubReply(text="VERDICT: APPROVE")
    return StubReply(text=f"{req.api} wrote it")


@pytest.mark.real_cli
async def test_the_seed_acceptance_over_real_stdio(real_env: dict[str, str], stub: VendorStub) -> None:
    stub.responder = verdicts
    env = {**real_env, "OPENAI_API_KEY": "sk-stub"}
    async with Client(server_params(env)) as client:
        await call(
            client, "spawn_worker", name="codex-writer", model="codex_cli", cliModel="gpt-5.5", sdkModel="gpt-5.5"
        )
        await call(client, "spawn_worker", name="gemini-review", model="gemini_cli", cliModel="gemini-2.5-flash")
        by_cli = await call(client, "dispatch_task", task="add a README", workers=["codex-writer"], runtimeMode="cli")
        by_sdk = await call(
            client, "dispatch_task", task="add a README", workers=["codex-writer"], runtimeMode="openai_sdk"
        )
        pair = await call(
            client, "dispatch_task", task="fix the parser", strategy="codex_writes_gemini_reviews",
            runtimeModes={"codex-writer": "openai_sdk", "gemini-review": "google_sdk"},
        )  # fmt: skip
        listed = await call(client, "list_worker_runs")
    assert [r["id"] for r in listed["runs"]] == [pair["id"], by_sdk["id"], by_cli["id"]]
    assert all(r["status"] == "completed" for r in listed["runs"])
    assert [[(s["workerName"], s["runtimeMode"], s["fallbackFrom"]) for s in r["steps"]] for r in listed["runs"]] == [
        [("codex-writer", "openai_sdk", None), ("gemini-review", "google_sdk", None)],
        [("codex-writer", "openai_sdk", None)],
        [("codex-writer", "cli", None)],
    ]
    assert pair["verdict"] == "approve"
    user_agents = [
        r.user_agent.lower()
        for r in stub.requests
        if r.kind in ("responses", "generateContent", "streamGenerateContent")
    ]
    assert "codex" in user_agents[0] and user_agents[1].startswith("asyncopenai/python")
    assert user_agents[2].startswith("asyncopenai/python") and len(user_agents) == 4

    # The same store, a new server without the OpenAI key: the SDK step falls back to the CLI.
    async with Client(server_params(real_env)) as client:
        fell = await call(
            client, "dispatch_task", task="add a README", workers=["codex-writer"], runtimeMode="openai_sdk"
        )
        listed = await call(client, "list_worker_runs", limit=2)
    step = fell["steps"][0]
    assert (fell["status"], step["runtimeMode"], step["fallbackFrom"]) == ("completed", "cli", "openai_sdk")
    assert listed["runs"][0]["steps"][0]["fallbackFrom"] == "openai_sdk"


async def test_a_client_that_asks_for_progress_over_stdio_hears_the_run_from_its_first_step(
    base_env: dict[str, str],
) -> None:
    env = {**base_env, "PATH": os.environ["PATH"], "MCP_COLLAB_CODEX_BIN": fake_cli("ok")}
    heard: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        heard.append(message or "")

    async with Client(server_params(env)) as client:
        await call(client, "spawn_worker", name="w", model="codex_cli")
        asked = await client.call_tool("dispatch_task", {"task": "x", "waitSeconds": 30}, progress_callback=on_progress)
        unasked = await call(client, "dispatch_task", task="y", waitSeconds=30)
    assert not asked.is_error and (asked.structured_content or {})["status"] == "completed"
    assert unasked["status"] == "completed"
    assert heard[0] == "step 1 started: worker w via cli", heard
    assert "step 1 completed: worker w via cli" in heard and heard[-1].endswith("completed")


async def test_nothing_but_json_rpc_reaches_stdout(base_env: dict[str, str]) -> None:
    env = {**base_env, "PATH": os.environ["PATH"]}
    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "spawn_worker", "arguments": {"name": "x", "model": "nope"}}},
        {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "check_runtimes", "arguments": {}}},
    ]  # fmt: skip
    stdin = "".join(json.dumps(m) + "\n" for m in messages).encode()
    process = await anyio.open_process([sys.executable, "-m", "mcp_collab", "serve", "--log-level", "DEBUG"], env=env)
    assert process.stdin and process.stdout and process.stderr
    await process.stdin.send(stdin)
    out = b""
    by_id: dict[int, Any] = {}
    with anyio.fail_after(60):
        while set(by_id) != {1, 2, 3, 4}:
            out += await process.stdout.receive()
            *complete, _ = out.split(b"\n")
            parsed = [json.loads(line) for line in complete]  # every line on stdout is JSON
            assert all(p.get("jsonrpc") == "2.0" for p in parsed)
            by_id = {p["id"]: p for p in parsed if "id" in p}
        await process.stdin.aclose()
        await process.wait()
        stderr = b"".join([chunk async for chunk in process.stderr])
    assert by_id[3]["result"]["isError"] is True
    assert "model" in by_id[3]["result"]["content"][0]["text"]
    assert by_id[4]["result"]["structuredContent"]["checks"]
    assert stderr, "logs go to stderr"


async def test_a_stdio_server_that_cannot_start_its_engine_says_why_on_every_call_and_exits_with_it(
    base_env: dict[str, str],
) -> None:
    state = Path(base_env["MCP_COLLAB_STATE_DIR"])
    state.mkdir()
    (state / "leases.json").write_text('{"kind": "mcp-collab-le', encoding="utf-8")  # torn: the lease cannot be taken
    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "list_workers", "arguments": {}}},
        {"jsonrpc": "2.0", "id": 3, "method": "resources/read", "params": {"uri": "runs://some-run"}},
    ]  # fmt: skip
    process = await anyio.open_process([sys.executable, "-m", "mcp_collab", "serve"], env=base_env)
    assert process.stdin and process.stdout and process.stderr
    await process.stdin.send("".join(json.dumps(m) + "\n" for m in messages).encode())
    out = b""
    by_id: dict[int, Any] = {}
    with anyio.fail_after(60):
        while set(by_id) != {1, 2, 3}:
            out += await process.stdout.receive()
            *complete, _ = out.split(b"\n")
            by_id = {p["id"]: p for p in map(json.loads, complete) if "id" in p}
        await process.stdin.aclose()  # the client leaves
        await process.wait()
        stderr = b"".join([chunk async for chunk in process.stderr]).decode()
    cause = f"the lease file {state / 'leases.json'} cannot be read"
    assert "serverInfo" in by_id[1]["result"], "the client's start-up probe was answered"
    assert by_id[2]["result"]["isError"] is True and cause in by_id[2]["result"]["content"][0]["text"]
    assert cause in by_id[3]["error"]["message"]
    assert process.returncode == 2
    assert stderr.splitlines()[-1].startswith(f"mcp-collab: {cause}") and "Traceback" not in stderr


async def test_streamable_http_serves_the_same_tools_on_loopback(base_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mcp_collab", "serve", "--transport", "http", "--port", str(port)],
        env={**base_env, "PATH": os.environ["PATH"]},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        await until_listening(port, server, tmp_path / "server.log")
        async with Client(f"http://127.0.0.1:{port}/mcp") as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert {"spawn_worker", "dispatch_task", "list_worker_runs"} <= tools
            worker = await call(client, "spawn_worker", name="http-worker", model="gemini_cli")
            assert worker["name"] == "http-worker"
        async with Client(f"http://127.0.0.1:{port}/mcp") as other_session:
            listed = await call(other_session, "list_workers")
            assert [w["name"] for w in listed["workers"]] == ["http-worker"]
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()
