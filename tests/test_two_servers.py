"""Two server processes on one store (Claude Desktop and Claude Code both start one)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters

from mcp_collab.config import Settings
from mcp_collab.errors import CollabError
from mcp_collab.models import DispatchRequest, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from tests.conftest import fake_cli
from tests.support.mcp_helpers import call

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]


async def test_two_servers_share_workers_and_runs_without_losing_an_update(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**base_env, "MCP_COLLAB_CODEX_BIN": fake_cli("ok")}
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_collab", "serve"], env=env)
    async with Client(params) as desktop, Client(params) as code:
        await call(desktop, "spawn_worker", name="codex-writer", model="codex_cli")
        assert [w["name"] for w in (await call(code, "list_workers"))["workers"]] == ["codex-writer"]
        refused = await code.call_tool("spawn_worker", {"name": "codex-writer", "model": "codex_cli"})
        assert refused.is_error, "the second server knows the name is taken"

        ids: list[str] = []

        async def dispatch_many(client: Client, label: str) -> None:
            for i in range(8):
                run = await call(client, "dispatch_task", task=f"{label} task {i}", waitSeconds=30)
                assert run["status"] == "completed"
                ids.append(run["id"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(dispatch_many, desktop, "desktop")
            tg.start_soon(dispatch_many, code, "code")

        for client in (desktop, code):
            listed: list[str] = []
            cursor = None
            while True:  # a page stops early rather than outgrow a tool result's budget
                page = await call(client, "list_worker_runs", limit=50, **({"cursor": cursor} if cursor else {}))
                listed += [r["id"] for r in page["runs"]]
                if not (cursor := page.get("nextCursor")):
                    break
            assert sorted(listed) == sorted(ids)
        run_by_code = ids[-1]
        seen = await call(desktop, "get_worker_run", runId=run_by_code)
        assert seen["status"] == "completed" and seen["result"] == "fake codex did the task"
        waited = await call(desktop, "wait_worker_run", runId=run_by_code, timeoutSeconds=1)
        assert waited["status"] == "completed", "a run of the other server can be awaited"


async def test_a_worker_one_server_adds_or_removes_is_seen_by_the_other_at_once(
    make_settings: Callable[..., Settings],
) -> None:
    # Each server answers its own dispatches' worker list from memory while the store is unchanged:
    # a change by the other server must end that at once, in both directions.
    settings = make_settings()
    async with WorkerOrchestrator(settings, runtimes={}) as desktop, WorkerOrchestrator(settings, runtimes={}) as code:
        await desktop.register_worker(WorkerSpec(name="codex-writer", model="codex_cli"))
        assert [w.name for w in await code.list_workers()] == ["codex-writer"]
        assert [w.name for w in await code.list_workers()] == ["codex-writer"]  # now from memory
        await desktop.remove_worker("codex-writer")
        assert await code.list_workers() == []
        with pytest.raises(CollabError, match="codex-writer"):
            await code.dispatch(DispatchRequest(task="t", workers=["codex-writer"]))
