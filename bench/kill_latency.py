"""How fast a stubborn worker process tree is gone: (a) at a step deadline, (b) on ``orch.cancel``.

The worker is tests/fake_clis/hang: a parent that ignores SIGTERM with two children, one of which
ignores SIGTERM too; it records every pid in CODEX_FAKE_PIDFILE. A watcher thread polls /proc for
those pids (a zombie counts as dead) and notes the moment the last one is gone.

Figure: latency from the deadline / the cancel call to the whole tree gone; 5 trials each, median and max.
Baseline (same process): the same tree started directly, killed by one ``os.killpg(pgid, SIGKILL)``.
Target: the whole tree gone within 0.5 s, every trial.

The deadline moment is bracketed around the spawn of the step's process (the supervisor starts the
step's clock just before it): t_lo before ``spawn.open_process`` is called, t_hi once it returned.
The latency is counted from t_lo + timeoutSeconds, never later than the real deadline, so the
figure errs on the slow side; the bracket width is printed too.

Run: .venv/bin/python bench/kill_latency.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import anyio
from _common import FAKE_CLIS, alive, median, ms, private_dir, ratio, read_pids, server_env, verdict

from mcp_collab.config import Settings
from mcp_collab.models import DispatchRequest, Run, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.runtimes.cli import spawn

TRIALS = 5
TARGET_S = 0.5
# The step deadline of trial (a): long enough for the fake to start its two children first.
DEADLINE_S = 1.0
TREE_SIZE = 3  # the hang fake: parent + two children
WATCH_POLL_S = 0.001
# Trials give up (and fail) rather than hang the benchmark.
TRIAL_LIMIT_S = 15.0
HANG = str(FAKE_CLIS / "hang")


class DeathWatch:
    """A thread that notes when the last of ``pids`` stops being a live process."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.gone_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            if not any(alive(pid) for pid in self.pids):
                self.gone_at = time.perf_counter()
                return
            time.sleep(WATCH_POLL_S)

    def wait(self, timeout: float) -> float | None:
        self._thread.join(timeout)
        self._stop.set()
        return self.gone_at


def wait_for_tree(pidfile: Path, limit: float = TRIAL_LIMIT_S) -> list[int]:
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        pids = read_pids(pidfile)
        if len(pids) >= TREE_SIZE and all(alive(p) for p in pids):
            return pids
        time.sleep(0.005)
    raise RuntimeError(f"the hang fake did not start its tree within {limit:g}s (pids so far: {read_pids(pidfile)})")


def reap_leftovers(pids: list[int]) -> list[int]:
    """Processes of a trial still alive after it: killed here (they are ours) and reported."""
    left = [p for p in pids if alive(p)]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def baseline_trial(tmp: Path, n: int) -> float:
    pidfile = tmp / f"base-{n}.pids"
    env = server_env(tmp, CODEX_FAKE_PIDFILE=str(pidfile))
    proc = subprocess.Popen(
        [HANG], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=env, start_new_session=True,
    )  # fmt: skip
    try:
        pids = wait_for_tree(pidfile)
        watch = DeathWatch(pids)
        t0 = time.perf_counter()
        os.killpg(proc.pid, signal.SIGKILL)
        gone = watch.wait(TRIAL_LIMIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if gone is None:
        raise RuntimeError(f"baseline tree still alive: {reap_leftovers(pids)}")
    return gone - t0


class StepClock:
    """Brackets the spawn of the step's process, where the supervisor starts the step's clock: just
    before ``spawn.open_process`` is called (t_lo) and once it returned (t_hi)."""

    def __init__(self) -> None:
        self.running_at: float | None = None
        self.spawned_at: float | None = None
        self._open = spawn.open_process

    def __enter__(self) -> StepClock:
        async def timed_open(*args: Any, **kwargs: Any) -> Any:
            if self.running_at is None:
                self.running_at = time.perf_counter()
            try:
                return await self._open(*args, **kwargs)
            finally:
                if self.spawned_at is None:
                    self.spawned_at = time.perf_counter()

        spawn.open_process = timed_open  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        spawn.open_process = self._open  # type: ignore[assignment]


async def orchestrator_trial(tmp: Path, kind: str, n: int) -> tuple[float, float, Run]:
    """(latency, then the deadline's bracket width or how long cancel() took, the run as recorded)."""
    pidfile = tmp / f"{kind}-{n}.pids"
    env = server_env(tmp, MCP_COLLAB_CODEX_BIN=HANG, CODEX_FAKE_PIDFILE=str(pidfile))
    settings = Settings.from_env(env)
    async with WorkerOrchestrator(settings) as orch, orch.running():
        name = f"{kind}-{n}"
        timeout = DEADLINE_S if kind == "deadline" else None
        await orch.register_worker(WorkerSpec(name=name, model="codex_cli", timeout_seconds=timeout))
        with StepClock() as clock:
            run = await orch.start(DispatchRequest(task="hang", workers=[name]))
            pids = await anyio.to_thread.run_sync(wait_for_tree, pidfile)
        watch = DeathWatch(pids)
        if kind == "deadline":
            assert clock.running_at is not None and clock.spawned_at is not None
            t0 = clock.running_at + DEADLINE_S
            extra = clock.spawned_at - clock.running_at
            with anyio.fail_after(TRIAL_LIMIT_S):
                final = await orch.wait(run.id, None)
        else:
            t0 = time.perf_counter()
            final, _ = await orch.cancel(run.id)
            extra = time.perf_counter() - t0
        gone = await anyio.to_thread.run_sync(watch.wait, TRIAL_LIMIT_S)
    left = reap_leftovers(pids)
    if gone is None or left:
        raise RuntimeError(f"{kind} trial {n}: processes {left} outlived the run")
    return gone - t0, extra, final


def summary(values: list[float]) -> str:
    return f"median {ms(median(values))}, max {ms(max(values))}"


def main() -> None:
    results: dict[str, list[float]] = {"deadline": [], "cancel": [], "baseline": []}
    extras: dict[str, list[float]] = {"deadline": [], "cancel": []}
    records: dict[str, Run] = {}
    with private_dir("kill") as tmp:
        for n in range(TRIALS):
            results["baseline"].append(baseline_trial(tmp, n))
        for kind in ("deadline", "cancel"):
            for n in range(TRIALS):
                latency, extra, run = anyio.run(orchestrator_trial, tmp, kind, n)
                results[kind].append(latency)
                extras[kind].append(extra)
                records[kind] = run
        for n in range(TRIALS, 2 * TRIALS):  # a second baseline batch, after: the machine may have drifted
            results["baseline"].append(baseline_trial(tmp, n))

    base = median(results["baseline"])
    print(f"kill_latency: the hang fake's tree ({TREE_SIZE} processes, 2 ignore SIGTERM), {TRIALS} trials each")
    print(f"  {'baseline os.killpg(SIGKILL)':<34}: {summary(results['baseline'])} ({len(results['baseline'])} trials)")
    for kind, label in (("deadline", f"(a) step deadline ({DEADLINE_S:g}s)"), ("cancel", "(b) orch.cancel(run_id)")):
        values = results[kind]
        print(
            f"  {label:<34}: {summary(values)}; ratio of medians to baseline {ratio(median(values), base)}; "
            f"trials: {', '.join(f'{v * 1000:.0f}' for v in values)} ms"
        )
    print(
        f"    (a) deadline bracket (spawn happened within this after t_lo): {summary(extras['deadline'])}; "
        f"(b) cancel() returned after {summary(extras['cancel'])}"
    )
    for kind, run in records.items():
        step = run.steps[0]
        print(f"    {kind} run recorded as {run.status}, step {step.status}: {step.error}")
        print(f"      step output kept: {step.output!r}")
    worst = max(results["deadline"] + results["cancel"])
    ok = worst <= TARGET_S
    verdict(ok, f"slowest tree kill {ms(worst)} over {2 * TRIALS} trials; target every tree gone within {ms(TARGET_S)}")


if __name__ == "__main__":
    main()
