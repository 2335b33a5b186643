"""parallel_consensus of three one-second answerers and a one-second synthesizer.

    .venv/bin/python bench/parallel_consensus.py

Four codex workers run a /bin/sh fake codex that reads its prompt, works for one second and prints
codex's final events, through WorkerOrchestrator, the real cli runtime and the store; the
figure is the wall time of one `parallel_consensus` dispatch (three answers at once, then the
synthesis), median of a few, alternating with the baseline. Baselines, same process: the ideal
(slowest answer plus the synthesis: two seconds), the same four spawns done raw (three at once,
then one) and the sum a one-after-another consensus would take (four seconds).
Target: within 1.3x of the ideal.

A shell script rather than tests/fake_clis/slow: that one is Python, whose start-up (a few hundred
ms on a busy machine) would be counted twice on the critical path and swamp what is measured here,
the engine's cost around the work.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FINAL_EVENTS, median, ms, private_dir, ratio, server_env, verdict, write_script

from mcp_collab.config import Settings
from mcp_collab.models import DispatchRequest, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator

ANSWERERS = 3
WORKER_SECONDS = 1.0
TRIALS = 3  # each trial is a dispatch and a raw round, about 4 s together
TARGET = 1.3  # of the ideal: spawns, store writes, prompts and supervision on top of the work
FAKE_CODEX = f"""#!/bin/sh
cat >/dev/null
sleep {WORKER_SECONDS:g}
printf '%s\\n' '{FINAL_EVENTS[0]}'
printf '%s\\n' '{FINAL_EVENTS[1]}'
"""
NAMES = [f"answerer{i + 1}" for i in range(ANSWERERS)] + ["synthesizer"]


async def raw_round(fake: Path) -> float:
    """The same spawns without the server: three at once, then one."""

    async def spawn() -> None:
        await anyio.run_process([str(fake), "exec", "--json", "-"], input=b"question", stderr=subprocess.PIPE)

    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(ANSWERERS):
            tg.start_soon(spawn)
    await spawn()
    return time.perf_counter() - t


async def trials(tmp: Path) -> tuple[list[float], list[float]]:
    fake = write_script(tmp / "codex", FAKE_CODEX)
    env = server_env(tmp, MCP_COLLAB_CODEX_BIN=str(fake))
    walls, raws = [], []
    async with WorkerOrchestrator(Settings.from_env(env)) as orch:
        for name in NAMES:
            await orch.register_worker(WorkerSpec(name=name, model="codex_cli"))
        for _ in range(TRIALS):
            t = time.perf_counter()
            run = await orch.dispatch(
                DispatchRequest(task="which queue should we use?", strategy="parallel_consensus", workers=NAMES)
            )
            walls.append(time.perf_counter() - t)
            assert run.status == "completed", run.error
            assert [(s.role, s.status) for s in run.steps] == [("answerer", "completed")] * ANSWERERS + [
                ("synthesizer", "completed")
            ], run.steps
            raws.append(await raw_round(fake))
    return walls, raws


def main() -> None:
    with private_dir("parallel-consensus") as tmp:
        walls, raws = anyio.run(trials, tmp)
    wall, raw = median(walls), median(raws)
    ideal = 2 * WORKER_SECONDS
    serial = (ANSWERERS + 1) * WORKER_SECONDS
    print(
        f"parallel_consensus, {ANSWERERS} x {WORKER_SECONDS:g} s answers + {WORKER_SECONDS:g} s synthesis, median of {TRIALS}:"
    )
    print(f"  through the server:                {ms(wall)}  (trials: {', '.join(ms(w) for w in walls)})")
    print(f"  ideal (slowest answer + synthesis): {ms(ideal)}  -> {ratio(wall, ideal)} of it")
    print(f"  raw spawns, 3 at once then 1:       {ms(raw)}  -> {ratio(wall, raw)} of it")
    print(f"  one after another would be:         {ms(serial)}")
    verdict(wall <= TARGET * ideal, f"the consensus took {ratio(wall, ideal)} of the ideal 2 s (target <= {TARGET}x)")


if __name__ == "__main__":
    main()
