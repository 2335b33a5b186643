"""20 one-second runs dispatched at once at the default concurrency limit, chosen from the machine.

    .venv/bin/python bench/parallel_default.py

MCP_COLLAB_MAX_CONCURRENT_RUNS is left unset, so the server picks its default from this machine's
cores and memory (config.default_max_concurrent_runs). Twenty `single_worker` runs of a /bin/sh fake
codex that works for one second are started at once through WorkerOrchestrator and the real cli
runtime; the figure is the wall time until all twenty have completed. Baselines, same process: the
ideal at this limit (ceil(20 / limit) batches of one second), the ideal with no limit (one second),
and twenty raw parallel spawns of the same script. Target: within 1.5x of the ideal at the default.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FINAL_EVENTS, ms, private_dir, ratio, server_env, verdict, write_script

from mcp_collab.config import Settings, default_max_concurrent_runs
from mcp_collab.models import DispatchRequest, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator

RUNS = 20
WORKER_SECONDS = 1.0
TARGET = 1.5  # of the ideal at the chosen limit: spawn, store and supervision costs on top of the work
FAKE_CODEX = f"""#!/bin/sh
cat >/dev/null
sleep {WORKER_SECONDS:g}
printf '%s\\n' '{FINAL_EVENTS[0]}'
printf '%s\\n' '{FINAL_EVENTS[1]}'
"""


async def raw_spawns(fake: Path) -> float:
    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(RUNS):
            tg.start_soon(
                lambda: anyio.run_process([str(fake), "exec", "--json", "-"], input=b"", stderr=subprocess.PIPE)
            )
    return time.perf_counter() - t


async def batch(tmp: Path) -> tuple[int, float, float]:
    fake = write_script(tmp / "codex", FAKE_CODEX)
    env = server_env(tmp, MCP_COLLAB_CODEX_BIN=str(fake))
    settings = Settings.from_env(env)
    assert "MCP_COLLAB_MAX_CONCURRENT_RUNS" not in env
    async with WorkerOrchestrator(settings) as orch, orch.running():
        await orch.register_worker(WorkerSpec(name="w", model="codex_cli"))
        t = time.perf_counter()
        started = [await orch.start(DispatchRequest(task=f"task {i}")) for i in range(RUNS)]
        runs = []

        async def wait(run_id: str) -> None:
            runs.append(await orch.wait(run_id, None))

        async with anyio.create_task_group() as tg:
            for run in started:
                tg.start_soon(wait, run.id)
        wall = time.perf_counter() - t
    assert all(r.status == "completed" for r in runs), [r.error for r in runs if r.status != "completed"]
    return settings.max_concurrent_runs, wall, await raw_spawns(fake)


def main() -> None:
    with private_dir("parallel-default") as tmp:
        limit, wall, raw = anyio.run(batch, tmp)
    assert limit == default_max_concurrent_runs()
    ideal = math.ceil(RUNS / limit) * WORKER_SECONDS
    print(f"default MCP_COLLAB_MAX_CONCURRENT_RUNS on this machine: {limit}")
    print(f"{RUNS} one-second runs dispatched at once:   {ms(wall)}")
    print(f"ideal at this limit ({math.ceil(RUNS / limit)} batches):      {ms(ideal)}")
    print(f"ideal with no limit:                       {ms(WORKER_SECONDS)} ({ratio(wall, WORKER_SECONDS)} of it)")
    print(f"{RUNS} raw parallel spawns of the script:     {ms(raw)}")
    verdict(
        wall <= TARGET * ideal,
        f"{RUNS} runs took {ratio(wall, ideal)} of the ideal at the default limit (target <= {TARGET}x)",
    )


if __name__ == "__main__":
    main()
