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
from mcp_collab.models import RUNTIME_MODES
from mcp_collab.runtimes.base import StepRequest
from mcp_collab.server import build_server
from mcp_collab.testing import Reply, ScriptedRuntime
from tests.conftest import quick_vendor_clis
from tests.support.mcp_helpers import call

pytestmark = pytest.mark.anyio

TOOLS = {
    "spawn_worker", "list_workers", "remove_worker", "dispatch_task",
    "list_worker_runs", "get_worker_run", "check_runtimes", "wait_worker_run", "cancel_worker_run",
    "apply_worker_run", "discard_worker_run", "read_run_output", "continue_worker_run",
}  # fmt: skip
READ_ONLY = {
    "list_workers",
    "list_worker_runs",
    "get_worker_run",
    "read_run_output",
    "wait_worker_run",
    "check_runtimes",
}
TOOLS_LIST_CAP = 16 * 1024  # what tools/list may weigh on the wire: every session's schemas cost a client's model this


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
    for word in ("single_worker", "codex_writes_gemini_reviews", "security_redteam_pass", "_sdk", "fallbackFrom"):
        assert word in (dispatch.description or "")
    offered = json.dumps(dispatch.input_schema["properties"]["runtimeMode"])
    assert all(f'"{mode}"' in offered for mode in RUNTIME_MODES), "every registered runtime can be chosen"
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


async def test_a_client_lists_the_runs_resource_templates_before_reading_any(client: Client) -> None:
    listed = await client.list_resource_templates()
    assert {(t.uri_template, t.mime_type) for t in listed.resource_templates} == {
        ("runs://{run_id}", "application/json"),
        ("runs://{run_id}/steps/{index}/output", "text/plain"),
        ("runs://{run_id}/steps/{index}/diff", "text/x-diff"),
        ("runs://{run_id}/worktrees/{index}/diff", "text/x-diff"),
    }
    assert all(t.description for t in listed.resource_templates)


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
            # every runtime in the registry is named among the accepted ones
            [", ".join(repr(m) for m in RUNTIME_MODES[:-1]) + f" or {RUNTIME_MODES[-1]!r}"],
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
    settings = make_settings(
        **{
            **quick_vendor_clis(),
            "OPENAI_API_KEY": "sk-very-secret-value",
            "MCP_COLLAB_CODEX_BIN": str(tmp_path / "nope"),
        }
    )
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


async def test_tools_list_is_small_and_every_tool_keeps_an_output_schema_a_title_and_annotations(
    client: Client,
) -> None:
    listed = await client.list_tools()
    wire = json.dumps(listed.model_dump(mode="json", by_alias=True, exclude_none=True), separators=(",", ":"))
    assert len(wire) <= TOOLS_LIST_CAP, f"tools/list is {len(wire)} bytes"
    for tool in listed.tools:
        assert tool.output_schema and tool.output_schema["type"] == "object" and tool.output_schema["properties"]
        assert tool.title and tool.annotations is not None, tool.name
        hints = tool.annotations
        assert None not in (hints.read_only_hint, hints.destructive_hint, hints.idempotent_hint, hints.open_world_hint)
        assert hints.read_only_hint is (tool.name in READ_ONLY), tool.name
    by_name = {t.name: t for t in listed.tools}
    dispatch = by_name["dispatch_task"].annotations
    assert dispatch is not None and dispatch.destructive_hint and dispatch.open_world_hint
    assert not dispatch.idempotent_hint, "a second dispatch is a second run"


async def test_compact_output_schemas_still_validate_every_result(client: Client) -> None:
    """The SDK client checks each structured result against the published schema: a compact schema
    that no longer matches what the tools return would fail these calls."""
    from jsonschema import Draft202012Validator

    schemas = {t.name: t.output_schema for t in (await client.list_tools()).tools}
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli", runtimeMode="openai_sdk")
    run = await call(client, "dispatch_task", task="write it")
    results = {
        "list_workers": await call(client, "list_workers"),
        "dispatch_task": run,
        "get_worker_run": await call(client, "get_worker_run", runId=run["id"]),
        "wait_worker_run": await call(client, "wait_worker_run", runId=run["id"]),
        "list_worker_runs": await call(client, "list_worker_runs"),
        "read_run_output": await call(client, "read_run_output", runId=run["id"], step=0),
        "cancel_worker_run": await call(client, "cancel_worker_run", runId=run["id"]),
        "check_runtimes": await call(client, "check_runtimes"),
        "remove_worker": await call(client, "remove_worker", name="codex-writer"),
    }
    for tool, result in results.items():
        Draft202012Validator(schemas[tool] or {}).validate(result)
    wrong = {**run, "status": "finished"}
    assert not Draft202012Validator(schemas["get_worker_run"] or {}).is_valid(wrong), "enums are still checked"


async def test_arguments_a_client_injects_are_ignored_and_a_typo_is_refused_with_a_suggestion(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="mcp_collab.server")
    worker = await call(client, "spawn_worker", name="codex-writer", model="codex_cli", wait_for_previous=True)
    assert worker["name"] == "codex-writer"
    run = await call(client, "dispatch_task", task="x", wait_for_previous=False, _meta_hint="x")
    assert run["status"] == "completed"
    assert "wait_for_previous" in caplog.text, "what was ignored is logged at debug"
    typo = await error(client, "spawn_worker", name="w2", model="codex_cli", workingDirectry="/tmp")
    assert "does not take 'workingDirectry' (did you mean 'workingDirectory'?)" in typo
    assert "its arguments are: name, model, runtimeMode" in typo
    snake = await error(client, "dispatch_task", task="x", working_directory="/tmp")
    assert "did you mean 'workingDirectory'" in snake
    assert "did you mean 'runId'" in await error(client, "get_worker_run", runId=run["id"], _runId="x")
    unrelated = await error(client, "dispatch_task", task="x", colour="blue")
    assert "does not take 'colour'; its arguments are: task, strategy" in unrelated
    assert len((await call(client, "list_worker_runs"))["runs"]) == 1, "refused calls started nothing"


async def test_a_steps_full_output_reads_in_pages_that_join_exactly(
    client: Client, runtimes: dict[str, ScriptedRuntime]
) -> None:
    big = "".join(f'line {i:05d} — naïve 🙂 "quoted"\n' for i in range(3_000))
    runtimes["cli"].script.append(Reply(big))
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
    run = await call(client, "dispatch_task", task="a long report")
    shortened = run["steps"][0]["output"]
    assert run["steps"][0]["outputTruncated"] is True
    assert f"runs://{run['id']}/steps/0/output" in shortened and "read_run_output" in shortened
    pages, offset = [], 0
    while offset is not None:
        page = await client.call_tool("read_run_output", {"runId": run["id"], "step": 0, "offset": offset})
        assert not page.is_error and wire_size(page) < WIRE_CAP
        content = page.structured_content or {}
        assert content["offset"] == offset and content["totalChars"] == len(big)
        pages.append(content["text"])
        offset = content["nextOffset"]
    assert "".join(pages) == big and len(pages) > 2
    small = await call(client, "read_run_output", runId=run["id"], step=0, offset=len(big) - 10, limit=4)
    assert small["text"] == big[-10:-6] and small["nextOffset"] == len(big) - 6
    end = await call(client, "read_run_output", runId=run["id"], step=0, offset=len(big))
    assert end["text"] == "" and end["nextOffset"] is None


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        ({"step": 0, "offset": 10**6}, ["offset 1000000 is past the end of step 0's output", "accepted: 0 to"]),
        ({"step": 0, "offset": -1}, ["offset", "greater than or equal to 0"]),
        ({"step": 3}, ["has steps 0 to 0; got step 3"]),
        ({"step": 0, "limit": 0}, ["limit", "greater than or equal to 1"]),
        ({"step": 0, "runId": "run-nope"}, ["unknown run 'run-nope'", "list_worker_runs"]),
    ],
)
async def test_a_bad_page_of_output_is_refused_saying_what_is_accepted(
    client: Client, args: dict[str, Any], fragments: list[str]
) -> None:
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
    run = await call(client, "dispatch_task", task="short")
    text = await error(client, "read_run_output", **{"runId": run["id"], **args})
    for fragment in fragments:
        assert fragment in text


async def test_a_quiet_wait_sends_heartbeats_often_enough(
    make_settings: Callable[..., Settings], runtimes: dict[str, Any]
) -> None:
    """The run says nothing until the client has received three heartbeats, so only the server's own
    heartbeat can end it: a server that is silent while a run is quiet fails on the time limit."""
    import anyio

    heard = anyio.Event()
    messages: list[str] = []

    class Quiet:
        mode = "cli"

        async def aclose(self) -> None:  # the WorkerRuntime seam: nothing held
            return None

        async def run(self, request: StepRequest) -> Any:
            await heard.wait()
            return await ScriptedRuntime("cli", [Reply("done")]).run(request)

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")
        if sum("still waiting" in m for m in messages) >= 3:
            heard.set()

    server = build_server(make_settings(), {**runtimes, "cli": Quiet()}, heartbeat_s=0.05)
    async with Client(server) as c:  # type: ignore[arg-type]
        await call(c, "spawn_worker", name="codex-writer", model="codex_cli")
        with anyio.fail_after(10):  # the orchestrator's own heartbeat comes every 15 s
            result = await c.call_tool("dispatch_task", {"task": "x", "waitSeconds": 30}, progress_callback=on_progress)
    assert not result.is_error and (result.structured_content or {})["status"] == "completed"
    started = next(i for i, m in enumerate(messages) if "started" in m and "codex-writer" in m)
    assert sum("still waiting" in m for m in messages[started:]) >= 3
