"""Crash safety: a writer is killed with SIGKILL at random moments, 200 times, on one store.

After each kill the store must load; every run the writer had been told was saved (an "ack") must be
there, in that state or a later one, and intact; a torn tail must be ignored; stray temp files must
be gone. The writer forks from this process (no interpreter start-up per round) and compacts often,
so kills land in appends, output writes and compactions alike.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import mcp_collab.store.json_store as js
from mcp_collab.models import Run, Step
from mcp_collab.store import JsonStore

ROUNDS = 200
STATES = ("queued", "running", "completed")


def run_state(round_: int, i: int, state: int) -> Run:
    """The deterministic state ``state`` of run ``i`` of round ``round_``."""
    status = STATES[state]
    output = ""
    if status == "completed":
        output = f"output of run {round_}-{i} " * (1 + (i % 4) * 60)  # some go to outputs/ files
    return Run(
        id=f"run-{round_:03d}-{i:04d}",
        task=f"task {round_}-{i}",
        strategy="single_worker",
        status=status,  # type: ignore[arg-type]
        created_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=round_ * 10_000 + i),
        workers=["w"],
        steps=[
            Step(
                index=0, role="worker", worker_name="w", worker_model="codex_cli", runtime_mode="cli",
                status={"queued": "pending", "running": "running", "completed": "completed"}[status],  # type: ignore[arg-type]
                output=output,
            )
        ],
    )  # fmt: skip


def digest(run: Run) -> str:
    return hashlib.sha256(run.model_dump_json(by_alias=True).encode()).hexdigest()


def writer(directory: str, round_: int, acks: int) -> None:
    js.COMPACT_FLOOR = 20  # compact often, so kills also land inside compactions
    store = JsonStore(Path(directory))
    for i in range(10_000):
        for state in range(len(STATES)):
            store.save_run(run_state(round_, i, state))
            os.write(acks, f"{round_} {i} {state}\n".encode())


def test_kill_9_at_random_moments_never_loses_an_acknowledged_run(tmp_path: Path) -> None:
    rng = random.Random(20261123)
    ctx = multiprocessing.get_context("fork")
    acked: dict[tuple[int, int], int] = {}
    for round_ in range(ROUNDS):
        read_fd, write_fd = os.pipe()
        child = ctx.Process(target=writer, args=(str(tmp_path), round_, write_fd), daemon=True)
        child.start()
        os.close(write_fd)
        time.sleep(rng.uniform(0.0, 0.06))
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(10)
        data = b""
        while chunk := os.read(read_fd, 1 << 16):
            data += chunk
        os.close(read_fd)
        for line in data.decode().splitlines():
            r, i, state = map(int, line.split())
            acked[(r, i)] = state

        store = JsonStore(tmp_path)  # loads, cuts nothing yet, cleans temps
        assert list(tmp_path.rglob("*.tmp-*")) == [], f"round {round_}: stray temp files"
        for (r, i), state in acked.items():
            stored = store.get_run(f"run-{r:03d}-{i:04d}")
            assert stored is not None, f"round {round_}: acknowledged run {r}-{i} is missing"
            later = {digest(run_state(r, i, s)) for s in range(state, len(STATES))}
            assert digest(stored) in later, f"round {round_}: run {r}-{i} is not intact"
    assert len(acked) > ROUNDS, "the writer got work done between kills"
    assert not list(tmp_path.glob("runs.jsonl.damaged-*")), "no kill ever damaged the log"
    lines = (tmp_path / "runs.jsonl").read_bytes().count(b"\n")
    assert lines < 6 * len(acked) + 100, "compaction kept the log bounded"
    json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("garbage", [b'{"op":"run","run":{"id":"x"', b"\x00\x00\x00", b'{"op":'])
def test_a_torn_tail_of_any_shape_is_ignored(tmp_path: Path, garbage: bytes) -> None:
    store = JsonStore(tmp_path)
    store.save_run(run_state(0, 0, 2))
    with open(tmp_path / "runs.jsonl", "ab") as fh:
        fh.write(garbage)
    assert [r.id for r in JsonStore(tmp_path).all_runs()] == ["run-000-0000"]
