"""Bare Temporal, for ``temporal_scale.py``'s floor: a workflow of one activity that spawns the fake
CLI (prompt on stdin, read to the end), with none of mcp-collab around it (no store, no strategy,
no supervision). As a process, it is a worker of the shared workflow queue and of its own step queue:

    python bench/_bare_temporal.py serve ADDRESS RUNS_QUEUE STEP_QUEUE SLOTS FAKE
    python bench/_bare_temporal.py batch ADDRESS RUNS_QUEUE COUNT FAKE STEP_QUEUE...

``serve`` prints ``serving`` once polling, and serves until SIGTERM. ``batch`` starts COUNT workflows
at once, alternately on the step queues, waits for all, and prints the wall time in seconds (in a
process of its own: temporalio's client, left to the interpreter's exit, can crash it there).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

WORKFLOW = "bare-run"


@activity.defn(name="bare-step")
async def bare_step(fake: str) -> int:
    process = await asyncio.create_subprocess_exec(
        fake, "exec", "--json", "-", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    await process.communicate(b"task")
    return process.returncode or 0


@workflow.defn(name=WORKFLOW)
class BareRun:
    @workflow.run
    async def run(self, queue: str, fake: str) -> int:
        code: int = await workflow.execute_activity(
            "bare-step", fake, task_queue=queue, start_to_close_timeout=timedelta(seconds=60), result_type=int
        )
        return code


async def serve(address: str, runs: str, steps: str, slots: int) -> None:
    client = await Client.connect(address)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with (
        Worker(client, task_queue=runs, workflows=[BareRun], workflow_runner=UnsandboxedWorkflowRunner()),
        Worker(client, task_queue=steps, activities=[bare_step], max_concurrent_activities=slots),
    ):
        print("serving", flush=True)
        await stop.wait()


async def batch(address: str, runs: str, queues: list[str], count: int, fake: str) -> float:
    """``count`` workflows at once, alternately on ``queues``, each waited on; the wall time."""
    client = await Client.connect(address)
    t = time.perf_counter()

    async def one(i: int) -> None:
        code = await client.execute_workflow(
            WORKFLOW, args=[queues[i % len(queues)], fake], id=f"bare-{i}", task_queue=runs
        )
        assert code == 0

    await asyncio.gather(*(one(i) for i in range(count)))
    return time.perf_counter() - t


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        address, runs_queue, step_queue, slots = sys.argv[2:6]
        asyncio.run(serve(address, runs_queue, step_queue, int(slots)))
    else:
        address, runs_queue, count, fake_cli, *step_queues = sys.argv[2:]
        print(f"{asyncio.run(batch(address, runs_queue, step_queues, int(count), fake_cli)):.6f}", flush=True)
        os._exit(0)  # the client's threads are not to meet the interpreter's exit
