"""What the Temporal benchmarks share: the dev server and worker processes (the tests' helpers),
a PATH on which the Python fakes start the interpreter itself, and CPU accounting from /proc.

On a small machine every process of a run on Temporal (the MCP server, Temporal's server, the
workers, the fakes they start) competes for the same cores, so the benchmarks print who used how
much CPU beside the wall time: that, not a hidden wait, is usually where the time goes.
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import ms, server_env
from tests.support.temporal import TemporalDev, WorkerProcess

from mcp_collab.models import Run

__all__ = [
    "Cpu",
    "TemporalDev",
    "WorkerProcess",
    "breakdown",
    "busy_between",
    "cpu_of",
    "machine_ticks",
    "p90",
    "python_first_path",
    "slot_use",
    "temporal",
    "temporal_env",
]

TICK = os.sysconf("SC_CLK_TCK")


def python_first_path() -> str:
    """This Python's directory first on PATH: a fake's ``#!/usr/bin/env python3`` then starts the
    interpreter itself, not a version manager's shim (pyenv's costs about 70 ms of CPU per start,
    three times the fake's own)."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")])


@contextmanager
def temporal(directory: Path, *, on_disk: bool) -> Iterator[TemporalDev]:
    """Temporal's dev server on loopback, stopped at the end; its database in memory unless
    ``on_disk`` (a SQLite file, as the tests run it: every change of every workflow is an fsync)."""
    server = TemporalDev(directory, in_memory=not on_disk).start()
    try:
        yield server
    finally:
        server.stop()


def temporal_env(tmp: Path, dev: TemporalDev, **extra: str) -> dict[str, str]:
    """The environment of a server on the Temporal engine at ``dev`` (runs on the queue "runs"),
    which its workers share: ``server_env`` with the engine's variables."""
    return server_env(
        tmp,
        **extra,
        MCP_COLLAB_ENGINE="temporal",
        MCP_COLLAB_TEMPORAL_ADDRESS=dev.address,
        MCP_COLLAB_TEMPORAL_QUEUE="runs",
    )


@dataclass
class Cpu:
    """CPU seconds a process used itself, and its reaped children (the steps' CLIs)."""

    own: float = 0.0
    children: float = 0.0

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.own - other.own, self.children - other.children)

    def __add__(self, other: Cpu) -> Cpu:
        return Cpu(self.own + other.own, self.children + other.children)


def cpu_of(pid: int | str = "self") -> Cpu:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return Cpu((utime + stime) / TICK, (cutime + cstime) / TICK)


def machine_ticks() -> tuple[int, int]:
    """(all, idle) jiffies of the whole machine so far: two readings give how busy it was between."""
    with open("/proc/stat", encoding="utf-8") as fh:
        fields = [int(f) for f in fh.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]


def busy_between(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[0] - before[0]
    return 1.0 - (after[1] - before[1]) / total if total > 0 else 0.0


def p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]


def breakdown(done: Sequence[tuple[Run, datetime]]) -> list[str]:
    """Where single-step runs' time went, from their stored times and the moment each caller had
    the run back. A step is begun by its run (the workflow, on Temporal) before it waits for a slot;
    its duration is measured on the worker, from the step's start there to its end."""
    parts: dict[str, list[float]] = {k: [] for k in ("begun", "slot", "worker", "ended", "seen")}
    for run, seen in done:
        step = run.steps[0]
        assert step.started_at and step.ended_at and step.duration_ms is not None and run.ended_at
        on_worker = step.duration_ms / 1000
        parts["begun"].append((step.started_at - run.created_at).total_seconds())
        parts["slot"].append(max(0.0, (step.ended_at - step.started_at).total_seconds() - on_worker))
        parts["worker"].append(on_worker)
        parts["ended"].append((run.ended_at - step.ended_at).total_seconds())
        parts["seen"].append((seen - run.ended_at).total_seconds())
    labels = {
        "begun": "dispatch -> step begun",
        "slot": "step begun -> on the worker",
        "worker": "step on the worker",
        "ended": "step ended -> run ended",
        "seen": "run ended -> caller has it",
    }
    return [f"    {labels[k]:28}median {ms(statistics.median(v)):>10}, p90 {ms(p90(v)):>10}" for k, v in parts.items()]


def slot_use(done: Sequence[tuple[Run, datetime]], slots: int) -> str:
    """How the batch used its slots: when the first and the ``slots``-th step were on a worker (the
    ramp before every slot has work), and how many slots were busy on average until the last caller
    had its run. A step is on its worker from its end less its measured duration."""
    t0 = min(run.created_at for run, _ in done)
    starts: list[float] = []
    busy = 0.0
    for run, _ in done:
        step = run.steps[0]
        assert step.ended_at and step.duration_ms is not None
        starts.append((step.ended_at - t0).total_seconds() - step.duration_ms / 1000)
        busy += step.duration_ms / 1000
    starts.sort()
    wall = max((seen - t0).total_seconds() for _, seen in done)
    nth = starts[min(slots, len(starts)) - 1]
    return (
        f"    first step on a worker at {ms(starts[0])}, the {slots}th at {ms(nth)}; "
        f"{busy / wall:.1f} of {slots} slots busy on average"
    )
