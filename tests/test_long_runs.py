"""Long work that never hangs or vanishes: background runs, wait, cancel, progress, limits, recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters

from mcp_collab.config import Settings
from mcp_collab.engine import lifecycle as lifecycle_module
from mcp_collab.models import DispatchRequest, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.runtimes.base import StepRequest
from mcp_collab.server import build_server
from mcp_collab.store import JsonStore
from mcp_collab.testing import Reply, ScriptedRuntime
from tests.conftest import alive, fake_cli, read_pids
from tests.support.mcp_helpers import call, free_port, until_listening

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture
def fake_env(base_env: dict[str, str], pidfile: Path) -> Callable[..., dict[str, str]]:
    def make(behaviour: str, **extra: str) -> dict[str, str]:
        return {**base_env, "MCP_COLLAB_CODEX_BIN": fake_cli(behaviour), "CODEX_FAKE_PIDFILE": str(pidfile), **extra}

    return make


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[[dict[str, str]], Any]]:
    """In-memory clients of servers built from an environment; every one is closed after the test."""
    async with anyio.create_task_group() as tg:
        opened: list[anyio.Event] = []

        async def open_client(env: dict[str, str]) -> Client:
            ready: list[Client] = []
            got, release = anyio.Event(), anyio.Event()
            opened.append(release)

            async def hold() -> None:
                async with Client(build_server(Settings.from_env(env))) as c:
                    ready.append(c)
                    got.set()
                    await release.wait()

            tg.start_soon(hold)
            await got.wait()
            return ready[0]

        yield open_client
        for release in opened:
            release.set()


async def test_a_long_run_returns_running_and_wait_brings_its_result(
    fake_env: Callable[..., dict[str, str]], client_for: Any
) -> None:
    client = await client_for(fake_env("slow", CODEX_FAKE_SECONDS="2"))
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
    started = await call(client, "dispatch_task", task="take your time", waitSeconds=0.3)
    assert started["status"] == "running" and started["steps"][0]["status"] == "running"
    messages: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    result = await client.call_tool(
        "wait_worker_run", {"runId": started["id"], "timeoutSeconds": 30}, progress_callback=on_progress
    )
    done = result.structured_content or {}
    assert done["status"] == "completed" and done["result"] == "slow work finished after 2s"
    assert any(m.startswith("codex-writer: codex: thinking: step") for m in messages), messages
    assert any(m.startswith("step 1 completed: worker codex-writer via cli") for m in messages)


async def test_a_client_timeout_does_not_kill_the_run(fake_env: Callable[..., dict[str, str]], client_for: Any) -> None:
    client = await client_for(fake_env("slow", CODEX_FAKE_SECONDS="2"))
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
    with pytest.raises(Exception, match=r"(?i)timed out|timeout"):
        await client.call_tool("dispatch_task", {"task": "x", "waitSeconds": 30}, read_timeout_seconds=0.5)
    [run] = (await call(client, "list_worker_runs"))["runs"]
    assert run["status"] in ("queued", "running")
    done = await call(client, "wait_worker_run", runId=run["id"], timeoutSeconds=30)
    assert done["status"] == "completed"


async def test_cancel_kills_the_tree_keeps_partial_output_and_a_second_cancel_is_a_no_op(
    fake_env: Callable[..., dict[str, str]], client_for: Any, pidfile: Path
) -> None:
    client = await client_for(fake_env("hang"))
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
    started = await call(client, "dispatch_task", task="never ends", waitSeconds=0.1)
    with anyio.fail_after(10):
        while len(read_pids(pidfile)) < 3:
            await anyio.sleep(0.02)
    t0 = time.monotonic()
    cancelled = await call(client, "cancel_worker_run", runId=started["id"])
    assert time.monotonic() - t0 < 5
    assert cancelled["cancelled"] is True
    run = cancelled["run"]
    assert run["status"] == "cancelled" and run["steps"][0]["status"] == "cancelled"
    assert run["steps"][0]["output"] == "partial work: step one done"
    assert [p for p in read_pids(pidfile) if alive(p)] == []
    again = await call(client, "cancel_worker_run", runId=started["id"])
    assert again["cancelled"] is False and "already ended (cancelled)" in again["message"]
    stored = await call(client, "get_worker_run", runId=started["id"])
    assert stored["status"] == "cancelled" and stored["steps"][0]["process"] is None


async def test_a_run_past_its_wall_clock_limit_fails_naming_the_limit(
    fake_env: Callable[..., dict[str, str]], client_for: Any, pidfile: Path
) -> None:
    client = await client_for(fake_env("hang", MCP_COLLAB_RUN_TIMEOUT="1.5"))
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
    run = await call(client, "dispatch_task", task="never ends", waitSeconds=20)
    assert run["status"] == "failed"
    assert "wall-clock limit of 1.5s (MCP_COLLAB_RUN_TIMEOUT)" in run["error"]
    assert run["steps"][0]["status"] == "failed"
    assert [p for p in read_pids(pidfile) if alive(p)] == []


async def test_a_silent_cli_fails_naming_the_idle_limit(
    fake_env: Callable[..., dict[str, str]], client_for: Any
) -> None:
    client = await client_for(fake_env("silent", MCP_COLLAB_IDLE_TIMEOUT="1"))
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
    run = await call(client, "dispatch_task", task="x", waitSeconds=20)
    assert (
        run["status"] == "failed" and "printed nothing for 1s (idle watchdog, MCP_COLLAB_IDLE_TIMEOUT)" in run["error"]
    )


async def test_heartbeats_reach_a_waiting_client(
    fake_env: Callable[..., dict[str, str]], client_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lifecycle_module, "HEARTBEAT_S", 0.2)
    client = await client_for(fake_env("silent"))
    await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
    messages: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    result = await client.call_tool("dispatch_task", {"task": "x", "waitSeconds": 1.5}, progress_callback=on_progress)
    run = result.structured_content or {}
    assert run["status"] == "running"
    beats = [m for m in messages if "still running: step 1 worker codex-writer via cli" in m]
    assert len(beats) >= 3
    await call(client, "cancel_worker_run", runId=run["id"])


async def test_fifty_parallel_runs_respect_the_concurrency_limit_and_all_complete(
    make_settings: Callable[..., Settings],
) -> None:
    running = 0
    peak = 0
    gate = anyio.Event()

    class Counting(ScriptedRuntime):
        async def run(self, request: StepRequest) -> Any:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            try:
                await gate.wait()
                return await super().run(request)
            finally:
                running -= 1

    settings = make_settings(MCP_COLLAB_MAX_CONCURRENT_RUNS="5")
    cli = Counting("cli", respond=lambda r: Reply("done", delay_s=0.01))
    async with WorkerOrchestrator(settings, runtimes={"cli": cli}) as orch, orch.running():
        await orch.register_worker(WorkerSpec(name="w", model="codex_cli"))
        runs = [await orch.start(DispatchRequest(task=f"task {i}")) for i in range(50)]
        with anyio.fail_after(10):
            while running < 5:
                await anyio.sleep(0.01)
        page = await orch.list_runs(status="queued", limit=100)
        assert len(page.runs) == 45, "beyond the limit, runs wait as queued"
        gate.set()
        finished = [await orch.wait(r.id, 30) for r in runs]
    assert peak == 5
    assert [r.status for r in finished] == ["completed"] * 50


async def killed_mid_run(params: StdioServerParameters, pidfile: Path) -> tuple[str, int, list[int]]:
    """A stdio server killed with SIGKILL while a run's CLI tree (a hanging CLI) is alive: the run's
    id, the dead server's pid and the pids of the tree it left behind."""
    run_id, server_pid = "", 0
    with pytest.raises(BaseException):  # noqa: B017 - the connection dies with the server
        async with Client(params) as client:
            await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
            run = await call(client, "dispatch_task", task="never ends", waitSeconds=0.2)
            run_id, server_pid = run["id"], run["owner"]["pid"]
            with anyio.fail_after(10):
                while len(read_pids(pidfile)) < 3:
                    await anyio.sleep(0.02)
            os.kill(server_pid, signal.SIGKILL)
            await client.call_tool("list_workers", {}, read_timeout_seconds=5)
    workers = read_pids(pidfile)
    assert any(alive(p) for p in workers), "the CLI's tree outlives the killed server until recovery"
    return run_id, server_pid, workers


async def test_after_kill_9_a_new_server_marks_the_run_interrupted_and_no_orphan_survives(
    fake_env: Callable[..., dict[str, str]], pidfile: Path
) -> None:
    env = fake_env("hang")
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_collab", "serve"], env=env)
    run_id, server_pid, workers = await killed_mid_run(params, pidfile)
    store = JsonStore(Settings.from_env(env).store_dir)
    assert store.get_run(run_id).status == "running"  # type: ignore[union-attr]

    async with WorkerOrchestrator(Settings.from_env(env), runtimes={}) as orch, orch.running():
        run = await orch.get_run(run_id)
    assert run.status == "interrupted"
    assert f"pid {server_pid}" in (run.error or "")
    assert run.steps[0].status == "interrupted" and run.steps[0].process is None
    assert [p for p in workers if alive(p)] == []


async def test_a_new_stdio_server_recovers_a_dead_servers_run_at_start_though_no_tool_is_called(
    fake_env: Callable[..., dict[str, str]], pidfile: Path
) -> None:
    env = fake_env("hang")
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_collab", "serve"], env=env)
    run_id, server_pid, workers = await killed_mid_run(params, pidfile)

    async with Client(params) as client:  # the client's start-up exchange, then no call until...
        with anyio.fail_after(10):
            while any(alive(p) for p in workers):
                await anyio.sleep(0.02)
        # ...the dead server's tree is gone; the run says so once recovery has recorded it.
        run = await call(client, "get_worker_run", runId=run_id)
    assert run["status"] == "interrupted" and f"pid {server_pid}" in run["error"]


async def test_over_http_a_run_started_in_one_session_is_awaited_and_cancelled_from_others(
    fake_env: Callable[..., dict[str, str]], tmp_path: Path, pidfile: Path
) -> None:
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mcp_collab", "serve", "--transport", "http", "--port", str(port)],
        env=fake_env("hang"), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        await until_listening(port, server, tmp_path / "server.log")
        async with Client(url) as first:
            await call(first, "spawn_worker", name="codex-writer", model="codex_cli")
            run = await call(first, "dispatch_task", task="never ends", waitSeconds=0.2)
        async with Client(url) as second:
            waited = await call(second, "wait_worker_run", runId=run["id"], timeoutSeconds=0.5)
            assert waited["status"] == "running"
        async with Client(url) as third:
            cancelled = await call(third, "cancel_worker_run", runId=run["id"])
            assert cancelled["cancelled"] is True and cancelled["run"]["status"] == "cancelled"
        assert [p for p in read_pids(pidfile) if alive(p)] == []
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()
    assert json.loads(json.dumps(cancelled))["run"]["steps"][0]["status"] == "cancelled"


async def test_a_run_whose_server_died_is_recovered_by_a_live_server_on_wait(
    fake_env: Callable[..., dict[str, str]], pidfile: Path
) -> None:
    env = fake_env("hang")
    async with WorkerOrchestrator(Settings.from_env(env), runtimes={}) as survivor, survivor.running():
        params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_collab", "serve"], env=env)
        with pytest.raises(BaseException):  # noqa: B017 - the connection dies with the server
            async with Client(params) as client:
                await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
                run = await call(client, "dispatch_task", task="never ends", waitSeconds=0.2)
                with anyio.fail_after(10):
                    while len(read_pids(pidfile)) < 3:
                        await anyio.sleep(0.02)
                os.kill(run["owner"]["pid"], signal.SIGKILL)
                await client.call_tool("list_workers", {}, read_timeout_seconds=5)
        seen = await survivor.wait(run["id"], 5)
    assert seen.status == "interrupted", "the live server noticed the dead owner without a restart"
    assert [p for p in read_pids(pidfile) if alive(p)] == []
