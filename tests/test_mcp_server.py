"""The MCP surface through the SDK's real client, in memory: schemas, results, errors, resources."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from mcp_collab.config import Settings
from mcp_collab.errors import RuntimeUnavailable
from mcp_collab.runtimes.base import StepRequest
from mcp_collab.server import build_server
from mcp_collab.testing import Reply, ScriptedRuntime
from tests.support.mcp_helpers import call

pytestmark = pytest.mark.anyio

TOOLS = {
    "spawn_worker", "list_workers", "remove_worker", "dispatch_task",
    "list_worker_runs", "get_worker_run", "check_runtimes", "wait_worker_run", "cancel_worker_run",
    "apply_worker_run", "discard_worker_run",
}  # fmt: skip


def echo(req: StepRequest) -> Reply:
    if "You are the reviewer" in req.prompt:
        return Reply("fine\nVERDICT: APPROVE")
    return Reply(f"did: {req.prompt[-40:]}", progress=("thinking", "editing files"))


@pytest.fixture
def runtimes() -> dict[str, ScriptedRuntime]:
    return {
        "cli": ScriptedRuntime("cli", respond=echo),
        "openai_sdk": ScriptedRuntime("openai_sdk", respond=echo),
        "google_sdk": ScriptedRuntime("google_sdk", respond=echo),
    }


@pytest.fixture
async def client(make_settings: Callable[..., Settings], runtimes: dict[str, Any]) -> AsyncIterator[Client]:
    async with Client(build_server(make_settings(), runtimes)) as c:  # type: ignore[arg-type]
        yield c


WIRE_CAP = 20_480  # what one tool result may weigh on the wire, text and structured content together


def wire_size(result: Any) -> int:
    text = sum(len(getattr(c, "text", "")) for c in result.content)
    return text + len(json.dumps(result.structured_content, separators=(",", ":")))


async def error(client: Client, tool: str, **args: Any) -> str:
    result = await client.call_tool(tool, args)
    assert result.is_error, f"{tool}({args}) should have failed: {result.structured_content}"
    text = " ".join(getattr(c, "text", "") for c in result.content)
    assert "Traceback" not in text
    return text


async def test_every_tool_is_listed_with_input_and_output_schemas(client: Client) -> None:
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description and tool.output_schema and tool.input_schema["type"] == "object"
    dispatch = tools["dispatch_task"]
    for word in ("single_worker", "codex_writes_gemini_reviews", "security_redteam_pass", "openai_sdk", "fallbackFrom"):
        assert word in (dispatch.description or "")
    assert set(dispatch.input_schema["properties"]) >= {"task", "strategy", "workers", "runtimeMode", "runtimeModes"}
    assert dispatch.input_schema["required"] == ["task"]
    spawn = tools["spawn_worker"].input_schema
    assert spawn["properties"]["model"]["enum"] == ["codex_cli", "gemini_cli", "claude_cli"]
    run_schema = dispatch.output_schema or {}
    assert {"id", "strategy", "status", "steps"} <= set(run_schema["properties"])


async def test_the_seed_flow_through_the_tools(client: Client, runtimes: dict[str, ScriptedRuntime]) -> None:
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
    await call(client, "spawn_worker", name="gemini-review", model="gemini_cli", runtimeMode="google_sdk")
    assert [w["name"] for w in (await call(client, "list_workers"))["workers"]] == ["codex-writer", "gemini-review"]
    by_cli = await call(client, "dispatch_task", task="add a README", runtimeMode="cli", workers=["codex-writer"])
    by_sdk = await call(
        client, "dispatch_task", task="add a README", runtimeMode="openai_sdk", workers=["codex-writer"]
    )
    pair = await call(
        client, "dispatch_task", task="fix it", strategy="codex_writes_gemini_reviews",
        runtimeModes={"codex-writer": "openai_sdk"},
    )  # fmt: skip
    assert [s["runtimeMode"] for s in pair["steps"]] == ["openai_sdk", "google_sdk"] and pair["verdict"] == "approve"
    listed = await call(client, "list_worker_runs")
    assert [r["id"] for r in listed["runs"]] == [pair["id"], by_sdk["id"], by_cli["id"]]
    assert [[s["runtimeMode"] for s in r["steps"]] for r in listed["runs"]] == [
        ["openai_sdk", "google_sdk"], ["openai_sdk"], ["cli"],
    ]  # fmt: skip
    assert all(r["status"] == "completed" for r in listed["runs"])
    assert [len(runtimes[m].requests) for m in ("cli", "openai_sdk", "google_sdk")] == [1, 2, 1]
    one = await call(client, "get_worker_run", runId=by_sdk["id"])
    assert one["steps"][0]["workerName"] == "codex-writer" and one["steps"][0]["fallbackFrom"] is None


async def test_an_sdk_without_credentials_falls_back_and_says_so(
    client: Client, runtimes: dict[str, ScriptedRuntime]
) -> None:
    runtimes["openai_sdk"].script.append(RuntimeUnavailable("OPENAI_API_KEY is not set", code="missing_credentials"))
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli", runtimeMode="openai_sdk")
    run = await call(client, "dispatch_task", task="add a README")
    step = run["steps"][0]
    assert (run["status"], step["runtimeMode"], step["fallbackFrom"]) == ("completed", "cli", "openai_sdk")
    assert step["attempts"][0]["errorKind"] == "unavailable"


async def test_progress_notifications_name_the_worker_and_runtime(client: Client) -> None:
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
    messages: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    result = await client.call_tool("dispatch_task", {"task": "x"}, progress_callback=on_progress)
    assert not result.is_error
    assert messages[0] == "step 1 started: worker codex-writer via cli"
    assert "thinking" in messages and "editing files" in messages
    assert "step 1 completed: worker codex-writer via cli" in messages


async def test_inline_results_are_capped_and_full_outputs_are_resources(
    client: Client, runtimes: dict[str, ScriptedRuntime]
) -> None:
    big = "".join(f"line {i:06d} of a very long report\n" for i in range(10_000))  # ~330 KB
    runtimes["cli"].script.append(Reply(big))
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
    result = await client.call_tool("dispatch_task", {"task": "write a long report"})
    assert wire_size(result) < WIRE_CAP
    step = result.structured_content["steps"][0]  # type: ignore[index]
    assert step["outputTruncated"] is True
    uri = f"runs://{result.structured_content['id']}/steps/0/output"  # type: ignore[index]
    assert uri in step["output"]
    full = await client.read_resource(uri)
    assert full.contents[0].text == big  # type: ignore[union-attr]
    whole = await client.read_resource(f"runs://{result.structured_content['id']}")  # type: ignore[index]
    assert json.loads(whole.contents[0].text)["steps"][0]["output"] == big  # type: ignore[union-attr]
    for _ in range(30):
        runtimes["cli"].script.append(Reply(big))
        await client.call_tool("dispatch_task", {"task": "again"})
    seen: list[str] = []
    cursor = None
    while True:
        page = await client.call_tool("list_worker_runs", {"limit": 31, **({"cursor": cursor} if cursor else {})})
        assert not page.is_error and wire_size(page) < WIRE_CAP
        runs = page.structured_content["runs"]  # type: ignore[index]
        assert runs and all(len(r["steps"][0]["outputPreview"]) <= 160 for r in runs)
        seen += [r["id"] for r in runs]
        cursor = page.structured_content["nextCursor"]  # type: ignore[index]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 31, "a page cut short for size continues where it stopped"


@pytest.mark.parametrize(
    ("tool", "args", "fragments"),
    [
        ("spawn_worker", {"name": "x", "model": "gpt_cli"}, ["model", "codex_cli", "gemini_cli", "claude_cli"]),
        (
            "spawn_worker",
            {"name": "x", "model": "gemini_cli", "runtimeMode": "openai_sdk"},
            ["accepted for gemini_cli: 'cli', 'google_sdk'"],
        ),
        (
            "spawn_worker",
            {"name": "x", "model": "codex_cli", "runtimeMode": "ssh"},
            ["'cli', 'openai_sdk' or 'google_sdk'"],
        ),
        ("spawn_worker", {"name": "has space", "model": "codex_cli"}, ["name", "pattern"]),
        ("spawn_worker", {"name": "x", "model": "codex_cli", "workingDirectory": "relative/dir"}, ["absolute path"]),
        (
            "spawn_worker",
            {"name": "x", "model": "codex_cli", "workingDirectory": "/no/such/dir"},
            ["not an existing directory"],
        ),
        ("spawn_worker", {"name": "existing", "model": "codex_cli"}, ["already exists"]),
        ("spawn_worker", {"model": "codex_cli"}, ["name", "required"]),
        ("remove_worker", {"name": "ghost"}, ["unknown worker 'ghost'", "existing"]),
        ("dispatch_task", {"task": ""}, ["task", "at least 1 character"]),
        ("dispatch_task", {"task": "   "}, ["task must not be blank"]),
        ("dispatch_task", {"task": "a\x00b"}, ["control characters"]),
        ("dispatch_task", {"task": "x", "strategy": "pair_programming"}, ["unknown strategy", "single_worker"]),
        ("dispatch_task", {"task": "x", "workers": ["ghost"]}, ["unknown worker 'ghost'", "existing"]),
        (
            "dispatch_task",
            {"task": "x", "runtimeMode": "google_sdk"},
            ["cannot run a codex_cli worker", "'cli', 'openai_sdk'"],
        ),
        ("dispatch_task", {"task": "x", "runtimeModes": {"nobody": "cli"}}, ["runtimeModes names 'nobody'"]),
        ("dispatch_task", {"task": "x", "strategy": "codex_writes_gemini_reviews"}, ["reviewer role", "gemini_cli"]),
        ("dispatch_task", {"task": "x", "workers": "existing"}, ["workers", "list"]),
        ("dispatch_task", {"task": "x" * 200_001}, ["task", "200000"]),
        ("list_worker_runs", {"limit": 0}, ["limit", "greater than or equal to 1"]),
        ("list_worker_runs", {"limit": 10_000}, ["limit", "less than or equal to 200"]),
        ("list_worker_runs", {"status": "done"}, ["status", "'completed'"]),
        ("list_worker_runs", {"cursor": "!!"}, ["cursor", "nextCursor"]),
        ("get_worker_run", {"runId": "run-nope"}, ["unknown run 'run-nope'"]),
        ("get_worker_run", {}, ["runId", "required"]),
    ],
)
async def test_bad_arguments_are_clear_errors_and_change_nothing(
    client: Client, make_settings: Callable[..., Settings], tool: str, args: dict[str, Any], fragments: list[str]
) -> None:
    await call(client, "spawn_worker", name="existing", model="codex_cli")
    await call(client, "dispatch_task", task="a first run")
    store = make_settings().store_dir / "runs.jsonl"
    before = store.read_bytes()
    text = await error(client, tool, **args)
    for fragment in fragments:
        assert fragment in text
    assert store.read_bytes() == before, "a refused call leaves the store as it was"
    assert len((await call(client, "list_worker_runs"))["runs"]) == 1, "the server is still up"


async def test_a_bug_in_a_run_fails_that_run_without_a_trace_and_the_server_stays_up(
    client: Client, runtimes: dict[str, ScriptedRuntime], caplog: pytest.LogCaptureFixture
) -> None:
    def explode(req: StepRequest) -> Reply:
        raise KeyError("internal detail")

    runtimes["cli"].respond = explode
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
    run = await call(client, "dispatch_task", task="x")
    assert run["status"] == "failed" and run["steps"][0]["status"] == "failed"
    assert "internal error (KeyError)" in run["error"] and "internal detail" not in json.dumps(run)
    assert "internal detail" in caplog.text, "the details go to the server log"
    [listed] = (await call(client, "list_worker_runs"))["runs"]
    assert listed["status"] == "failed"
    runtimes["cli"].respond = echo
    assert (await call(client, "dispatch_task", task="y"))["status"] == "completed"


async def test_check_runtimes_reports_without_leaking_secrets(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(OPENAI_API_KEY="sk-very-secret-value", MCP_COLLAB_CODEX_BIN=str(tmp_path / "nope"))
    async with Client(build_server(settings, {})) as c:
        report = await call(c, "check_runtimes")
    text = json.dumps(report)
    assert "sk-very-secret-value" not in text
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["credential:OPENAI_API_KEY"]["ok"] is True
    assert checks["cli:codex"]["ok"] is False and "npm install -g @openai/codex" in checks["cli:codex"]["hint"]
    assert checks["store"]["ok"] is True


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("runs://run-nope", "unknown run 'run-nope'"),
        ("runs://run-nope/steps/0/output", "unknown run 'run-nope'"),
        ("runs://{run}/steps/7/output", "has steps 0 to 0; got step '7'"),
        ("runs://{run}/steps/x/output", "has steps 0 to 0; got step 'x'"),
        ("runs://{run}/steps/-1/output", "has steps 0 to 0; got step '-1'"),
    ],
)
async def test_a_resource_that_does_not_exist_is_refused_saying_what_does(
    client: Client, uri: str, expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    from mcp import MCPError

    await call(client, "spawn_worker", name="w1", model="codex_cli")
    run = await call(client, "dispatch_task", task="one step")
    with pytest.raises(MCPError) as refused:
        await client.read_resource(uri.format(run=run["id"]))
    assert expected in refused.value.message
    assert refused.value.code == -32602, "not found is the caller's mistake, not an internal error"
    assert "Traceback" not in caplog.text
