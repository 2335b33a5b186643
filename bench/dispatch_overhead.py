"""Per-dispatch cost: `dispatch_task` of a fake CLI that answers at once, through the MCP client,
minus a raw spawn of that CLI, next to a bare MCPServer tool's round trip; all in one run.

    .venv/bin/python bench/dispatch_overhead.py

The fake CLI is a /bin/sh script speaking codex's `exec --json` events. Each round, alternating so
drift hits all alike: a raw spawn of the script (prompt on stdin, read to the end); a `dispatch_task`
through the SDK's in-memory Client to `build_server` with the real cli runtime and store (so the
figure holds the MCP edge, the orchestrator, the store's fsyncs, supervision and parsing); the same
run through `WorkerOrchestrator` directly (start + wait), which tells the edge's share from the
engine's; and one call of a bare MCPServer's one tool through the same kind of client. The server's
own cost per dispatch is the dispatch minus the raw spawn. Target: at most the bare round trip + 2 ms
at the median, durability kept.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FINAL_EVENTS, median, ms, private_dir, server_env, write_script
from mcp import Client
from mcp.server.mcpserver import MCPServer

from mcp_collab.config import Settings
from mcp_collab.models import DispatchRequest, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.server import build_server

ROUNDS = 60
WARMUP = 5  # the first rounds warm caches and the tools' registration
TARGET_OVER_BARE_S = 0.002


def bare_server() -> MCPServer:
    server: MCPServer = MCPServer("bare")

    @server.tool()
    async def ping() -> str:
        return "pong"

    return server


async def bench(tmp: Path) -> dict[str, list[float]]:
    fake = write_script(tmp / "codex", "#!/bin/sh\ncat >/dev/null\n" + "".join(f"echo '{e}'\n" for e in FINAL_EVENTS))
    times: dict[str, list[float]] = {"raw": [], "mcp": [], "orchestrator": [], "bare": []}
    (tmp / "mcp").mkdir()
    (tmp / "orch").mkdir()
    mcp_env = server_env(tmp / "mcp", MCP_COLLAB_CODEX_BIN=str(fake))
    orch_env = server_env(tmp / "orch", MCP_COLLAB_CODEX_BIN=str(fake))
    async with (
        Client(build_server(Settings.from_env(mcp_env))) as ours,
        Client(bare_server()) as bare,
        WorkerOrchestrator(Settings.from_env(orch_env)) as orch,
        orch.running(),
    ):
        spawned = await ours.call_tool("spawn_worker", {"name": "w", "model": "codex_cli"})
        assert not spawned.is_error, spawned.content
        await orch.register_worker(WorkerSpec(name="w", model="codex_cli"))
        for i in range(ROUNDS + WARMUP):
            t = time.perf_counter()
            done = await anyio.run_process([str(fake), "exec", "--json", "-"], input=b"task", stderr=subprocess.PIPE)
            raw_s = time.perf_counter() - t
            assert done.returncode == 0

            t = time.perf_counter()
            result = await ours.call_tool("dispatch_task", {"task": f"task {i}", "waitSeconds": 30})
            mcp_s = time.perf_counter() - t
            assert not result.is_error and (result.structured_content or {}).get("status") == "completed", result

            t = time.perf_counter()
            run = await orch.wait((await orch.start(DispatchRequest(task=f"task {i}"))).id, None)
            orch_s = time.perf_counter() - t
            assert run.status == "completed", run.error

            t = time.perf_counter()
            pong = await bare.call_tool("ping", {})
            bare_s = time.perf_counter() - t
            assert not pong.is_error

            if i >= WARMUP:
                for key, value in (("raw", raw_s), ("mcp", mcp_s), ("orchestrator", orch_s), ("bare", bare_s)):
                    times[key].append(value)
    return times


def main() -> int:
    with private_dir("dispatch-overhead") as tmp:
        times = anyio.run(bench, tmp)
    raw, mcp, orch, bare = (median(times[k]) for k in ("raw", "mcp", "orchestrator", "bare"))
    print(f"raw spawn of the fake CLI:                     {ms(raw)} (median of {ROUNDS})")
    print(f"dispatch_task through the MCP client:          {ms(mcp)}  -> server's cost +{ms(mcp - raw)}")
    print(f"the same run through the orchestrator alone:   {ms(orch)}  -> engine's cost +{ms(orch - raw)}")
    print(f"a bare MCPServer tool's round trip:            {ms(bare)}")
    ok = mcp - raw <= bare + TARGET_OVER_BARE_S
    print(
        f"{'PASS' if ok else 'FAIL'}: a dispatch costs the server +{ms(mcp - raw)}, the bare round trip "
        f"{ms(bare)} (target: at most +{ms(TARGET_OVER_BARE_S)} over it; now +{ms(mcp - raw - bare)})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
