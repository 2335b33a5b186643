"""Dispatch overhead per CLI step: a `single_worker` run of a fake CLI vs a raw spawn of the same CLI.

    .venv/bin/python bench/dispatch_overhead.py

The fake CLI is a /bin/sh script speaking codex's `exec --json` events, so the measured difference
is ours: planning, the store (every state change fsynced), supervision, parsing. Target: at most
+5 ms at the median. Rounds alternate raw and dispatched runs so drift hits both alike.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FINAL_EVENTS, median, ms, private_dir, server_env, write_script

from mcp_collab.config import Settings
from mcp_collab.models import DispatchRequest, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator

ROUNDS = 60
TARGET_S = 0.005


async def bench(tmp: Path) -> tuple[list[float], list[float]]:
    fake = write_script(tmp / "codex", "#!/bin/sh\ncat >/dev/null\n" + "".join(f"echo '{e}'\n" for e in FINAL_EVENTS))
    env = server_env(tmp, MCP_COLLAB_CODEX_BIN=str(fake))
    raw, ours = [], []
    async with WorkerOrchestrator(Settings.from_env(env)) as orch, orch.running():
        await orch.register_worker(WorkerSpec(name="w", model="codex_cli"))
        for i in range(ROUNDS + 5):
            t = time.perf_counter()
            done = await anyio.run_process([str(fake), "exec", "--json", "-"], input=b"task", stderr=subprocess.PIPE)
            raw_s = time.perf_counter() - t
            assert done.returncode == 0
            t = time.perf_counter()
            run = await orch.start(DispatchRequest(task=f"task {i}"))
            run = await orch.wait(run.id, None)
            ours_s = time.perf_counter() - t
            assert run.status == "completed", run.error
            if i >= 5:  # the first rounds warm caches
                raw.append(raw_s)
                ours.append(ours_s)
    return raw, ours


def main() -> int:
    with private_dir("dispatch-overhead") as tmp:
        raw, ours = anyio.run(bench, tmp)
    r, o = median(raw), median(ours)
    print(f"raw spawn of the fake CLI:        {ms(r)} (median of {ROUNDS})")
    print(f"single_worker run through it:     {ms(o)} (median of {ROUNDS})")
    ok = o - r <= TARGET_S
    print(f"{'PASS' if ok else 'FAIL'}: dispatch overhead per CLI step is +{ms(o - r)} at the median (target <= +5 ms)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
