"""The queued-runs cap holds however many dispatches arrive at once."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest
from mcp import Client

from mcp_collab.config import Settings
from mcp_collab.runtimes.base import RuntimeResult, StepRequest
from mcp_collab.server import build_server
from tests.support.mcp_helpers import call

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]

DISPATCHES = 1000
QUEUE_CAP = 100
SLOTS = 2


class Held:
    """A cli runtime whose steps wait until released."""

    mode = "cli"

    def __init__(self) -> None:
        self.release = anyio.Event()

    async def aclose(self) -> None:  # the WorkerRuntime seam: nothing held
        return None

    async def run(self, request: StepRequest) -> RuntimeResult:
        await self.release.wait()
        return RuntimeResult(text="done", exit_code=0)


async def test_a_thousand_pipelined_dispatches_never_pass_the_queue_cap(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(MCP_COLLAB_MAX_QUEUED_RUNS=str(QUEUE_CAP), MCP_COLLAB_MAX_CONCURRENT_RUNS=str(SLOTS))
    held = Held()
    accepted: list[str] = []
    refusals: list[str] = []
    async with Client(build_server(settings, {"cli": held})) as client:  # type: ignore[dict-item]
        await call(client, "spawn_worker", name="w1", model="codex_cli")

        async def dispatch(i: int) -> None:
            result = await client.call_tool("dispatch_task", {"task": f"job {i}", "waitSeconds": 0})
            if result.is_error:
                refusals.append(" ".join(getattr(c, "text", "") for c in result.content))
            else:
                assert result.structured_content is not None
                accepted.append(result.structured_content["id"])

        async with anyio.create_task_group() as tg:
            for i in range(DISPATCHES):
                tg.start_soon(dispatch, i)

        assert QUEUE_CAP <= len(accepted) <= QUEUE_CAP + SLOTS, len(accepted)
        assert len(refusals) == DISPATCHES - len(accepted)
        assert all("MCP_COLLAB_MAX_QUEUED_RUNS" in r and f"the limit is {QUEUE_CAP}" in r for r in refusals)
        stored: list[str] = []
        cursor = None
        while True:
            page = await call(client, "list_worker_runs", limit=200, **({"cursor": cursor} if cursor else {}))
            stored += [r["id"] for r in page["runs"]]
            if not (cursor := page.get("nextCursor")):
                break
        assert sorted(stored) == sorted(accepted), "a refused dispatch left nothing in the history"

        held.release.set()
        for run_id in accepted[:3]:
            assert (await call(client, "wait_worker_run", runId=run_id, timeoutSeconds=30))["status"] == "completed"
