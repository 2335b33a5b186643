"""Long runs as MCP tasks (SEP-2663, io.modelcontextprotocol/tasks), at the wire, with the Python SDK.

A client that declares the extension gets a task for a run that outlives the call, polls it with
tasks/get, cancels it with tasks/cancel; the task is the run, so it survives a server restart. A
client that does not declare it keeps the bounded wait it always had."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS, MISSING_REQUIRED_CLIENT_CAPABILITY, CallToolResult, Request, RequestParams, Result
from pydantic import ConfigDict, TypeAdapter

from mcp_collab.config import Settings
from mcp_collab.server import build_server
from mcp_collab.store import JsonStore, RunFilter
from mcp_collab.tasks import TASK_POLL_INTERVAL_MS, TASKS_EXTENSION
from tests.conftest import alive, fake_cli, read_pids, require_real_clis
from tests.support.cli_homes import cli_env
from tests.support.mcp_helpers import call
from tests.support.vendor_stub import ToolCall, VendorStub, tool_results

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

TERMINAL = ("completed", "failed", "cancelled")
# Tests poll faster than the server asks (pollIntervalMs) so they end as soon as the run does.
TEST_POLL_S = 0.05


class CreatedTask(Result):
    """The CreateTaskResult a tools/call answers with when the server makes it a task."""

    model_config = ConfigDict(extra="allow")
    result_type: Literal["task"]
    task_id: str
    status: str
    created_at: str
    last_updated_at: str
    ttl_ms: int | None
    poll_interval_ms: int | None = None
    status_message: str | None = None


class TaskParams(RequestParams):
    task_id: str


class UpdateParams(TaskParams):
    input_responses: dict[str, Any]


class TaskRequest(Request[TaskParams | UpdateParams, str]):
    name_param = "taskId"  # the SEP routes tasks/* by task id (Mcp-Name) over HTTP


ANSWER = TypeAdapter(dict[str, Any])


async def task_request(client: Client, method: str, task_id: str) -> dict[str, Any]:
    return await client.session.send_request(TaskRequest(method=method, params=TaskParams(task_id=task_id)), ANSWER)


async def poll_until_over(client: Client, task_id: str, timeout_s: float = 60) -> dict[str, Any]:
    with anyio.fail_after(timeout_s):
        while (task := await task_request(client, "tasks/get", task_id))["status"] not in TERMINAL:
            await anyio.sleep(TEST_POLL_S)
    return task


def acknowledged(answer: dict[str, Any]) -> bool:
    """An empty result: the SEP's ack (the SDK stamps serverInfo into every result's _meta)."""
    return answer.get("resultType") == "complete" and set(answer) <= {"resultType", "_meta"}


class Tasks(ClientExtension):
    """The extension as a client that drives tasks for its caller implements it: the created task is
    polled to its end and its result handed back, as if the call had waited."""

    identifier = TASKS_EXTENSION

    def claims(self) -> tuple[ResultClaim[Any], ...]:
        return (ResultClaim(result_type="task", model=CreatedTask, resolve=self._resolve),)

    async def _resolve(self, created: CreatedTask, ctx: ClaimContext) -> CallToolResult:
        self.created.append(created)
        task_id = created.task_id
        with anyio.fail_after(60):
            while True:
                request = TaskRequest(method="tasks/get", params=TaskParams(task_id=task_id))
                task = await ctx.session.send_request(request, ANSWER)
                if task["status"] == "completed":
                    return CallToolResult.model_validate(task["result"])
                assert task["status"] == "working", task
                await anyio.sleep(TEST_POLL_S)

    def __init__(self) -> None:
        self.created: list[CreatedTask] = []


@pytest.fixture
def fake_env(base_env: dict[str, str], pidfile: Path) -> Callable[..., dict[str, str]]:
    def make(behaviour: str, **extra: str) -> dict[str, str]:
        return {**base_env, "MCP_COLLAB_CODEX_BIN": fake_cli(behaviour), "CODEX_FAKE_PIDFILE": str(pidfile), **extra}

    return make


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[..., Any]]:
    """In-memory clients (protocol 2026-07-28) of servers built from an environment, closed after the test."""
    async with anyio.create_task_group() as tg:
        releases: list[anyio.Event] = []

        async def open_client(env: dict[str, str], *extensions: ClientExtension) -> Client:
            ready: list[Client] = []
            got, release = anyio.Event(), anyio.Event()
            releases.append(release)

            async def hold() -> None:
                server = build_server(Settings.from_env(env))
                async with Client(server, mode="2026-07-28", extensions=list(extensions)) as c:
                    ready.append(c)
                    got.set()
                    await release.wait()

            tg.start_soon(hold)
            await got.wait()
            return ready[0]

        yield open_client
        for release in releases:
            release.set()


async def test_a_client_with_the_extension_gets_a_task_and_polls_it_to_the_run(
    fake_env: Callable[..., dict[str, str]], client_for: Any
) -> None:
    client = await client_for(fake_env("slow", CODEX_FAKE_SECONDS="2"), Tasks())
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli")

    created = await client.session.call_tool("dispatch_task", {"task": "take your time"}, allow_claimed=True)

    assert isinstance(created, CreatedTask), created
    assert created.status == "working" and created.poll_interval_ms == TASK_POLL_INTERVAL_MS
    assert created.ttl_ms == 90 * 86_400_000, "the task lives as long as the store keeps the run"
    [run] = (await call(client, "list_worker_runs"))["runs"]
    assert created.task_id == run["id"], "the task is the run"
    working = await task_request(client, "tasks/get", created.task_id)
    assert working["status"] == "working" and "codex-writer" in working["statusMessage"], working
    done = await poll_until_over(client, created.task_id)
    assert done["status"] == "completed" and done["resultType"] == "complete"
    result = CallToolResult.model_validate(done["result"])
    assert not result.is_error
    stored = await call(client, "get_worker_run", runId=created.task_id)
    assert result.structured_content == stored, "the task's result is the run as dispatch_task answers it"
    assert stored["status"] == "completed" and stored["result"] == "slow work finished after 2s"


async def test_call_tool_resolves_the_task_into_the_run_it_became(
    fake_env: Callable[..., dict[str, str]], client_for: Any
) -> None:
    tasks = Tasks()
    client = await client_for(fake_env("slow", CODEX_FAKE_SECONDS="2"), tasks)
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
    run = await call(client, "dispatch_task", task="take your time", waitSeconds=30)
    assert [t.task_id for t in tasks.created] == [run["id"]], "a task even though the caller offered to wait"
    assert run["status"] == "completed" and run["result"] == "slow work finished after 2s"


async def test_a_run_that_fails_is_a_completed_task_carrying_the_failed_run(
    fake_env: Callable[..., dict[str, str]], client_for: Any
) -> None:
    tasks = Tasks()
    client = await client_for(fake_env("hang"), tasks)
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli", timeoutSeconds=2)
    run = await call(client, "dispatch_task", task="this will time out")
    assert tasks.created, "the run outlived the inline wait"
    assert run["status"] == "failed" and "wall-clock limit" in run["steps"][0]["error"], run


async def test_a_short_run_is_answered_at_once_and_a_refusal_is_not_a_task(
    fake_env: Callable[..., dict[str, str]], client_for: Any
) -> None:
    tasks = Tasks()
    client = await client_for(fake_env("ok"), tasks)
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
    run = await call(client, "dispatch_task", task="quick")
    assert run["status"] == "completed" and tasks.created == []
    refused = await client.call_tool("dispatch_task", {"task": "x", "workers": ["nobody"]})
    assert refused.is_error and "nobody" in str(refused.content) and tasks.created == []


async def test_tasks_cancel_cancels_the_run_and_kills_its_processes(
    fake_env: Callable[..., dict[str, str]], client_for: Any, pidfile: Path
) -> None:
    client = await client_for(fake_env("hang"), Tasks())
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
    created = await client.session.call_tool("dispatch_task", {"task": "never ends"}, allow_claimed=True)
    assert isinstance(created, CreatedTask)
    with anyio.fail_after(10):
        while len(read_pids(pidfile)) < 3:
            await anyio.sleep(0.02)

    update = TaskRequest(method="tasks/update", params=UpdateParams(task_id=created.task_id, input_responses={"x": {}}))
    assert acknowledged(await client.session.send_request(update, ANSWER)), "no input is asked, so any is ignored"
    assert (await task_request(client, "tasks/get", created.task_id))["status"] == "working"

    ack = await task_request(client, "tasks/cancel", created.task_id)

    assert acknowledged(ack)
    assert [p for p in read_pids(pidfile) if alive(p)] == [], "the run's process tree is gone"
    task = await task_request(client, "tasks/get", created.task_id)
    assert task["status"] == "cancelled" and "tasks/cancel" in task["statusMessage"] and "result" not in task
    run = await call(client, "get_worker_run", runId=created.task_id)
    assert run["status"] == "cancelled" and run["steps"][0]["output"] == "partial work: step one done"
    again = await task_request(client, "tasks/cancel", created.task_id)
    assert acknowledged(again), "cancelling a task that has ended is acknowledged"


@pytest.mark.parametrize("method", ["tasks/get", "tasks/cancel", "tasks/update"])
async def test_an_unknown_task_is_invalid_params_naming_it(
    fake_env: Callable[..., dict[str, str]], client_for: Any, method: str
) -> None:
    client = await client_for(fake_env("ok"), Tasks())
    with pytest.raises(MCPError) as refused:
        await task_request(client, method, "run-nope")
    assert refused.value.code == INVALID_PARAMS
    assert "'run-nope'" in refused.value.message and "list_worker_runs" in refused.value.message
    assert (await call(client, "list_workers"))["workers"] == [], "the server is still up"


async def test_tasks_methods_need_the_extension_declared(
    fake_env: Callable[..., dict[str, str]], client_for: Any
) -> None:
    client = await client_for(fake_env("ok"))
    with pytest.raises(MCPError) as refused:
        await task_request(client, "tasks/get", "run-any")
    assert refused.value.code == MISSING_REQUIRED_CLIENT_CAPABILITY
    assert TASKS_EXTENSION in str(refused.value.error.data)


async def test_a_client_without_the_extension_keeps_the_bounded_wait(
    fake_env: Callable[..., dict[str, str]], client_for: Any
) -> None:
    client = await client_for(fake_env("slow", CODEX_FAKE_SECONDS="2"))
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
    started = await call(client, "dispatch_task", task="take your time", waitSeconds=0.3)
    assert started["status"] == "running" and "resultType" not in started
    done = await call(client, "wait_worker_run", runId=started["id"], timeoutSeconds=30)
    assert done["status"] == "completed" and done["result"] == "slow work finished after 2s"


async def test_a_task_outlives_the_server_tasks_get_answers_from_the_store(
    fake_env: Callable[..., dict[str, str]], pidfile: Path
) -> None:
    env = fake_env("hang")
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_collab", "serve"], env=env)
    finished_env = {**env, "MCP_COLLAB_CODEX_BIN": fake_cli("ok")}
    finished_params = StdioServerParameters(
        command=sys.executable, args=["-m", "mcp_collab", "serve"], env=finished_env
    )
    # A task that ended, then a task still working when its server is killed.
    async with Client(finished_params, extensions=[Tasks()]) as first:
        assert first.protocol_version == "2026-07-28"
        await call(first, "spawn_worker", name="codex-writer", model="codex_cli")
        done = await call(first, "dispatch_task", task="quick")
        assert done["status"] == "completed"
    working_id, server_pid = "", 0
    with pytest.raises(BaseException):  # noqa: B017 - the connection dies with the server
        async with Client(params, extensions=[Tasks()]) as second:
            created = await second.session.call_tool("dispatch_task", {"task": "never ends"}, allow_claimed=True)
            assert isinstance(created, CreatedTask)
            working_id = created.task_id
            server_pid = (await call(second, "get_worker_run", runId=working_id))["owner"]["pid"]
            with anyio.fail_after(10):
                while len(read_pids(pidfile)) < 3:
                    await anyio.sleep(0.02)
            os.kill(server_pid, signal.SIGKILL)
            await second.call_tool("list_workers", {}, read_timeout_seconds=5)
    assert working_id and not alive(server_pid)

    async with Client(params, extensions=[Tasks()]) as third:
        ended = await task_request(third, "tasks/get", done["id"])
        assert ended["status"] == "completed"
        assert CallToolResult.model_validate(ended["result"]).structured_content == done
        interrupted = await task_request(third, "tasks/get", working_id)
    assert interrupted["status"] == "completed", "an interrupted run is a tool-level outcome, not a JSON-RPC error"
    run = CallToolResult.model_validate(interrupted["result"]).structured_content or {}
    assert run["status"] == "interrupted" and "stopped before it finished" in interrupted["statusMessage"]
    assert [p for p in read_pids(pidfile) if alive(p)] == [], "the dead server's processes were killed"


# -- the real Claude Code as the client ------------------------------------------------------------

# Claude Code's tool timeout in this test, and a run well beyond it.
CLAUDE_TOOL_TIMEOUT_MS = 5_000
LONG_RUN_S = 8
CLAUDE_WAIT_SLICE_S = 3  # what the scripted model passes as waitSeconds / timeoutSeconds: under the timeout
# The scripted model follows the run at most this many times (8 s in 3 s slices needs about three).
MAX_FOLLOW_UPS = 10


def follow(results: list[str]) -> ToolCall | str:
    """Claude Code's model after a dispatch: follow the run with wait_worker_run in slices under the
    tool timeout (as dispatch_task's description says), then report how it ended."""
    run = json.loads(results[-1]) if results[-1].startswith("{") else {}
    if run.get("status") in ("queued", "running"):
        return ToolCall("wait_worker_run", {"runId": run["id"], "timeoutSeconds": CLAUDE_WAIT_SLICE_S})
    return f"FINAL {run.get('status')}: {run.get('result') or results[-1][:300]}"


def test_claude_code_headless_follows_a_run_longer_than_its_tool_timeout(
    tmp_path: Path, stub: VendorStub, base_env: dict[str, str]
) -> None:
    """Claude Code 2.1.330 declares the tasks extension only in its interactive sessions
    (fixtures/cli_outputs/README.md, "Claude Code as an MCP client: tasks"): headless (-p) it gets the
    bounded wait, and a run longer than its tool timeout still reaches its model through wait_worker_run."""
    bin_dir = require_real_clis()
    stub.converse(
        "anthropic",
        ToolCall("spawn_worker", {"name": "codex-writer", "model": "codex_cli"}),
        ToolCall("dispatch_task", {"task": "a long job", "waitSeconds": CLAUDE_WAIT_SLICE_S}),
        *[follow] * MAX_FOLLOW_UPS,
    )
    server_env = {**base_env, "MCP_COLLAB_CODEX_BIN": fake_cli("slow"), "CODEX_FAKE_SECONDS": str(LONG_RUN_S)}
    server = {"command": sys.executable, "args": ["-m", "mcp_collab", "serve"], "env": server_env}
    (tmp_path / "mcp.json").write_text(json.dumps({"mcpServers": {"collab": server}}), encoding="utf-8")
    env = {
        "PATH": base_env["PATH"],
        "LANG": "C.UTF-8",
        **cli_env(tmp_path / "cli", stub.url),
        "MCP_TOOL_TIMEOUT": str(CLAUDE_TOOL_TIMEOUT_MS),
    }
    argv = [str(bin_dir / "claude"), "-p", "run a long job with the collab tools"]
    argv += ["--mcp-config", str(tmp_path / "mcp.json"), "--strict-mcp-config", "--allowedTools", "mcp__collab"]
    done = subprocess.run(
        [*argv, "--output-format", "json"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )

    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout)
    assert answer["result"] == f"FINAL completed: slow work finished after {LONG_RUN_S}s", answer["result"]
    results = max((tool_results(r) for r in stub.requests_for("anthropic")), key=len)
    runs = [json.loads(r) for r in results[1:]]  # a call that timed out would be an error text, not a run
    assert runs[0]["status"] == "running", "headless Claude Code gets the run, not a task"
    assert len(runs) >= 3 and runs[-1]["status"] == "completed", "the model followed it with wait_worker_run"
    [stored] = JsonStore(Path(base_env["MCP_COLLAB_STATE_DIR"])).list_runs(RunFilter(), 10, None).runs
    assert stored.id == runs[0]["id"] and stored.status == "completed"
