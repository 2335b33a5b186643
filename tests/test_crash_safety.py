"""Crash safety: a writer is killed with SIGKILL at random moments, 200 times, on one store.

After each kill the store must load; every run the writer had been told was saved (an "ack") must be
there, in that state or a later one, and intact; a torn tail must be ignored; stray temp files must
be gone. The writer forks from this process (no interpreter start-up per round) and compacts often,
so kills land in appends, output writes and compactions alike.

And the processes: a real `mcp-collab serve` running a CLI that double-forks a `setsid` daemon is
killed with SIGKILL mid-step, round after round on one store; the next server must leave nothing
of the dead one's steps alive. MCP_COLLAB_KILL9_SERVER_ROUNDS sets the rounds (200 is the
acceptance figure; the suite runs fewer, since each round starts a server).
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters

import mcp_collab.store.json_store as js
from mcp_collab.config import Settings
from mcp_collab.models import ProcessRef, Run, RunOwner, Step
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.runtimes.cli.supervisor import MARKER_VAR, process_start_ticks
from mcp_collab.store import JsonStore
from tests.conftest import alive, fake_cli, read_pids
from tests.support.mcp_helpers import call

ROUNDS = 200
SERVER_ROUNDS = int(os.environ.get("MCP_COLLAB_KILL9_SERVER_ROUNDS", "20"))
# The kill lands this long (at random) after the run was handed back: from before the CLI starts
# to well after its daemon is running.
KILL_WITHIN_S = 0.6
# A recovered tree is gone well within this; anything alive after it is counted as a survivor.
GONE_WITHIN_S = 5.0
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


@functools.cache
def digest_of_state(round_: int, i: int, state: int) -> str:
    """The digest of a run's deterministic state (each is checked after every later round)."""
    return digest(run_state(round_, i, state))


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
        runs = {run.id: run for run in store.all_runs()}  # every run, read back whole, in one pass
        for (r, i), state in acked.items():
            stored = runs.get(f"run-{r:03d}-{i:04d}")
            assert stored is not None, f"round {round_}: acknowledged run {r}-{i} is missing"
            later = {digest_of_state(r, i, s) for s in range(state, len(STATES))}
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


def marked_by(tags: set[str]) -> list[int]:
    """Live processes whose environment carries a step marker handed out by one of the servers ``tags``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and alive(int(entry)):
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    environ = fh.read().split(b"\0")
            except OSError:
                continue
            values = [e.split(b"=", 1)[1].decode() for e in environ if e.startswith(f"{MARKER_VAR}=".encode())]
            if any(v.rsplit("-", 1)[0] in tags for v in values):
                found.append(int(entry))
    return found


async def survivors_of(pids: list[int]) -> list[int]:
    with anyio.move_on_after(GONE_WITHIN_S):
        while any(alive(p) for p in pids):
            await anyio.sleep(0.02)
    return [p for p in pids if alive(p)]


@pytest.mark.anyio
@pytest.mark.timeout(60 + 10 * SERVER_ROUNDS)
async def test_kill_9_of_the_server_mid_step_leaves_no_process_of_the_step_alive(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    rng = random.Random(20261130)
    env = {**base_env, "MCP_COLLAB_CODEX_BIN": fake_cli("daemon")}
    pidfiles: list[Path] = []
    killed: set[str] = set()  # the dead servers, as the marker tags they handed out
    survivors: list[int] = []

    def server(pidfile: Path) -> StdioServerParameters:
        pidfiles.append(pidfile)
        env["CODEX_FAKE_PIDFILE"] = str(pidfile)
        return StdioServerParameters(command=sys.executable, args=["-m", "mcp_collab", "serve"], env=dict(env))

    for round_ in range(SERVER_ROUNDS):
        with pytest.raises(BaseException):  # noqa: B017 - the connection dies with the server
            async with Client(server(tmp_path / f"pids-{round_}.txt")) as client:
                # This server recovered the store as it started: the last one's steps are dead.
                if round_ > 0:
                    survivors += await survivors_of(read_pids(pidfiles[-2]) + marked_by(killed))
                if round_ == 0:
                    await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
                run = await call(client, "dispatch_task", task="start a daemon", waitSeconds=0)
                killed.add(f"{run['owner']['pid']}-{run['owner']['startTicks']}")
                await anyio.sleep(rng.uniform(0, KILL_WITHIN_S))  # a random moment of the step, not a wait
                os.kill(run["owner"]["pid"], signal.SIGKILL)
                await client.call_tool("list_workers", {}, read_timeout_seconds=5)
    async with Client(server(tmp_path / "pids-last.txt")):
        survivors += await survivors_of(read_pids(pidfiles[-2]) + marked_by(killed))
    started = [p for f in pidfiles for p in read_pids(f)]
    survivors += [p for p in started if alive(p)] + marked_by(killed)
    assert len(started) > SERVER_ROUNDS, "most kills landed after the CLI had started its daemon"
    assert sorted(set(survivors)) == [], f"{len(set(survivors))} processes survived {SERVER_ROUNDS} kill -9 rounds"


# A server whose fsync never returns: it writes a run's admission and starts the run, but never gets
# to answer the dispatch (start() answers once the admission is durable). Its intermediate states
# are never written either: the admission is all the store gets of the run.
UNSYNCED_SERVER = """
import os, time
import anyio
import mcp_collab.engine.recorder
from mcp_collab.config import Settings
from mcp_collab.models import DispatchRequest, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.store import JsonStore

class NeverSynced(JsonStore):
    def sync(self) -> None:
        time.sleep(3600)

mcp_collab.engine.recorder.WRITE_BEHIND_DELAY_S = 3600

async def main() -> None:
    settings = Settings.from_env(dict(os.environ))
    async with WorkerOrchestrator(settings, store=NeverSynced(settings.store_dir)) as orch, orch.running():
        await orch.register_worker(WorkerSpec(name="w", model="codex_cli"))
        await orch.list_runs()  # start-up recovery is over: the store is free for the admission's write
        await orch.start(DispatchRequest(task="start a daemon"))

anyio.run(main)
"""


@pytest.mark.anyio
async def test_a_server_killed_before_a_runs_admission_was_synced_leaves_nothing_of_the_run_alive(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    pidfile = tmp_path / "pids.txt"
    env = {**base_env, "MCP_COLLAB_CODEX_BIN": fake_cli("daemon"), "CODEX_FAKE_PIDFILE": str(pidfile)}
    server = await anyio.open_process([sys.executable, "-c", UNSYNCED_SERVER], env=env)
    try:
        with anyio.fail_after(30):
            while len(read_pids(pidfile)) < 2:  # the CLI, then its setsid daemon, are on record
                await anyio.sleep(0.02)
        assert server.returncode is None, "the dispatch was not answered: its admission never reached the disk"
    finally:
        if server.returncode is None:
            server.kill()
        await server.wait()

    async with WorkerOrchestrator(Settings.from_env(base_env)) as orch, orch.running():
        [run] = (await orch.list_runs()).runs  # read once recovery at start is done
    assert run.status == "interrupted" and "stopped before it finished" in (run.error or "")
    assert await survivors_of(read_pids(pidfile)) == []


@pytest.mark.anyio
async def test_recovery_kills_what_carries_the_steps_marker_and_spares_a_process_that_reused_its_pid(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    marker = f"{os.getpid()}-1-{secrets.token_hex(16)}"
    sleep = [sys.executable, "-c", "import time; time.sleep(3600)"]
    ours = subprocess.Popen(sleep, env={**os.environ, MARKER_VAR: marker}, start_new_session=True)
    stranger = subprocess.Popen(sleep, start_new_session=True)  # holds the pid the step recorded
    try:
        settings = make_settings()
        run = run_state(0, 0, 1).model_copy(update={"created_at": datetime.now(UTC)})  # within retention
        run.owner = RunOwner(host=socket.gethostname(), pid=os.getpid(), start_ticks=1)  # a server long gone
        ticks = process_start_ticks(stranger.pid)
        assert ticks is not None
        run.steps[0].process = ProcessRef(pid=stranger.pid, pgid=stranger.pid, start_ticks=ticks - 1, marker=marker)
        JsonStore(settings.store_dir).save_run(run)
        async with WorkerOrchestrator(settings, runtimes={}) as orch, orch.running():
            recovered = await orch.get_run(run.id)
        assert recovered.status == "interrupted"
        with anyio.fail_after(GONE_WITHIN_S):
            while alive(ours.pid):
                await anyio.sleep(0.02)
        assert alive(stranger.pid), "a process that merely reuses a recorded pid is not ours"
    finally:
        for process in (ours, stranger):
            process.kill()
            process.wait()


@pytest.mark.anyio
async def test_a_killed_server_its_parent_has_not_reaped_yet_counts_as_gone(tmp_path: Path, make_settings: Any) -> None:
    from mcp_collab.models import RunOwner
    from mcp_collab.orchestrator import WorkerOrchestrator
    from mcp_collab.runtimes.cli.supervisor import process_start_ticks

    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        owner = RunOwner(host=socket.gethostname(), pid=server.pid, start_ticks=process_start_ticks(server.pid))
        store = JsonStore(tmp_path / "store")
        store.save_run(run_state(0, 0, 1).model_copy(update={"owner": owner}))
        os.kill(server.pid, signal.SIGKILL)
        with anyio.fail_after(10):  # the kernel makes it a zombie; nobody reaps it yet
            while (state := Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z":
                await anyio.sleep(0.01)
        assert state == "Z"
        orchestrator = WorkerOrchestrator(make_settings(MCP_COLLAB_STATE_DIR=str(tmp_path / "store")), runtimes={})
        [recovered] = await orchestrator.recover()
        assert recovered.status == "interrupted"
    finally:
        server.kill()
        server.wait()
