"""Admission: the queued-runs cap holds however many dispatches arrive at once, and a run whose
admission cannot be made durable is refused and stopped, whatever it had started meanwhile."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from mcp import Client

from mcp_collab.config import Settings
from mcp_collab.errors import StoreError
from mcp_collab.models import DispatchRequest, Run, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.runtimes.base import RuntimeResult, StepRequest
from mcp_collab.server import build_server
from mcp_collab.store import JsonStore
from tests.conftest import alive, fake_cli, read_pids
from tests.support.mcp_helpers import call

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]

DISPATCHES = 1000
QUEUE_CAP = 100
SLOTS = 2


class Held:
    """A cli runtime whose steps wait until released."""

    mode = "cli"

    def __init__(self) -> None:
        self.release = anyio.Event()

    async def aclose(self) -> None:  # the WorkerRuntime seam: nothing held
        return None

    async def run(self, request: StepRequest) -> RuntimeResult:
        await self.release.wait()
        return RuntimeResult(text="done", exit_code=0)


async def test_a_thousand_pipelined_dispatches_never_pass_the_queue_cap(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(MCP_COLLAB_MAX_QUEUED_RUNS=str(QUEUE_CAP), MCP_COLLAB_MAX_CONCURRENT_RUNS=str(SLOTS))
    held = Held()
    accepted: list[str] = []
    refusals: list[str] = []
    async with Client(build_server(settings, {"cli": held})) as client:  # type: ignore[dict-item]
        await call(client, "spawn_worker", name="w1", model="codex_cli")

        async def dispatch(i: int) -> None:
            result = await client.call_tool("dispatch_task", {"task": f"job {i}", "waitSeconds": 0})
            if result.is_error:
                refusals.append(" ".join(getattr(c, "text", "") for c in result.content))
            else:
                assert result.structured_content is not None
                accepted.append(result.structured_content["id"])

        async with anyio.create_task_group() as tg:
            for i in range(DISPATCHES):
                tg.start_soon(dispatch, i)

        assert QUEUE_CAP <= len(accepted) <= QUEUE_CAP + SLOTS, len(accepted)
        assert len(refusals) == DISPATCHES - len(accepted)
        assert all("MCP_COLLAB_MAX_QUEUED_RUNS" in r and f"the limit is {QUEUE_CAP}" in r for r in refusals)
        stored: list[str] = []
        cursor = None
        while True:
            page = await call(client, "list_worker_runs", limit=200, **({"cursor": cursor} if cursor else {}))
            stored += [r["id"] for r in page["runs"]]
            if not (cursor := page.get("nextCursor")):
                break
        assert sorted(stored) == sorted(accepted), "a refused dispatch left nothing in the history"

        held.release.set()
        for run_id in accepted[:3]:
            assert (await call(client, "wait_worker_run", runId=run_id, timeoutSeconds=30))["status"] == "completed"


class FailingSync(JsonStore):
    """A disk whose fsync fails (EIO) once the step's CLI and its daemon are running: a fault no real
    disk here produces on demand. Every other write works."""

    def __init__(self, directory: Path, pidfile: Path) -> None:
        super().__init__(directory)
        self.pidfile = pidfile

    def sync(self) -> None:
        deadline = time.monotonic() + 30
        while len(read_pids(self.pidfile)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # this is the store's own thread: the run goes on meanwhile
        raise StoreError(f"cannot write the run store at {self.log_path}: Input/output error (EIO)")


async def test_a_run_whose_admission_cannot_be_made_durable_is_refused_and_leaves_nothing_running(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    pidfile = tmp_path / "pids.txt"
    settings = make_settings(MCP_COLLAB_CODEX_BIN=fake_cli("daemon"), CODEX_FAKE_PIDFILE=str(pidfile))
    store = FailingSync(settings.store_dir, pidfile)
    async with WorkerOrchestrator(settings, store=store) as orch, orch.running():
        await orch.register_worker(WorkerSpec(name="w", model="codex_cli"))
        await orch.list_runs()  # start-up recovery is over: the store is free for the admission's write
        with pytest.raises(StoreError, match="Input/output error"):
            await orch.start(DispatchRequest(task="start a daemon"))
        [queued] = (await orch.list_runs()).runs
        run = await orch.wait(queued.id, 10)
    started = read_pids(pidfile)
    assert len(started) == 2, "the CLI and its daemon had started while the fsync was under way"
    with anyio.fail_after(5):
        while any(alive(p) for p in started):
            await anyio.sleep(0.02)
    assert run.status == "failed" and "Input/output error" in (run.error or "")


class Journal(JsonStore):
    """The JSON store, noting in order each run state written ("written") and each fsync that makes
    everything written so far durable ("durable")."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.events: list[str] = []

    def save_runs_now(self, runs: list[Run], *, durable: bool = False) -> bool:
        done = super().save_runs_now(runs, durable=durable)
        if done:
            self.events.append("durable" if durable else "written")
        return done

    def save_runs(self, runs: list[Run], *, durable: bool = True) -> None:
        super().save_runs(runs, durable=durable)
        self.events.append("durable" if durable else "written")

    def sync(self) -> None:
        super().sync()
        self.events.append("durable")


@pytest.mark.parametrize("ends", [True, False], ids=["a run that ends within the wait", "a run still queued"])
async def test_a_dispatch_is_answered_only_once_the_run_it_reports_is_durable(
    make_settings: Callable[..., Settings], ends: bool
) -> None:
    settings = make_settings(MCP_COLLAB_MAX_CONCURRENT_RUNS="1")
    store, held = Journal(settings.store_dir), Held()
    async with Client(build_server(settings, {"cli": held}, store)) as client:  # type: ignore[dict-item]
        await call(client, "spawn_worker", name="w1", model="codex_cli")
        if ends:
            held.release.set()
        else:
            await call(client, "dispatch_task", task="holds the only slot", waitSeconds=0)
        before = len(store.events)
        run = await call(client, "dispatch_task", task="job", waitSeconds=30 if ends else 0)
        told = store.events[before:]  # what was written and fsynced for it when the answer came
        held.release.set()
    assert run["status"] == ("completed" if ends else "queued")
    assert told and told[0] == "written" and "durable" in told, f"answered before its record was fsynced: {told}"


class TimedDisk(JsonStore):
    """The JSON store, noting which thread made each durable write; ``slow`` makes each durable write
    take 20 ms more (a disk whose fsyncs are slow, a fault no disk here produces on demand)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.durable_on: list[str] = []
        self.slow = False

    def _noted(self) -> None:
        if self.slow:
            time.sleep(0.02)
        self.durable_on.append("loop" if threading.current_thread() is threading.main_thread() else "thread")

    def save_runs_now(self, runs: list[Run], *, durable: bool = False) -> bool:
        done = super().save_runs_now(runs, durable=durable)
        if done and durable:
            self._noted()
        return done

    def save_runs(self, runs: list[Run], *, durable: bool = True) -> None:
        super().save_runs(runs, durable=durable)
        if durable:
            self._noted()


async def test_a_runs_end_is_fsynced_on_the_event_loop_only_when_nothing_else_runs_and_the_disk_is_quick(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    store = TimedDisk(settings.store_dir)
    held = Held()
    async with WorkerOrchestrator(settings, store=store, runtimes={"cli": held}) as orch, orch.running():  # type: ignore[dict-item]
        await orch.register_worker(WorkerSpec(name="w", model="codex_cli"))
        await orch.list_runs()  # start-up recovery is over
        held.release.set()

        async def ends() -> list[str]:
            before = len(store.durable_on)
            run = await orch.wait((await orch.start(DispatchRequest(task="t"), durable=False)).id, 30)
            assert run.status == "completed"
            return store.durable_on[before:]

        # The disk's speed is unknown until a durable write was timed, off the loop; then a run
        # alone ends on the loop: the trip to a thread and back would cost more than its fsync.
        assert await ends() == ["thread"]
        assert await ends() == ["loop"]
        assert await orch.get_run((await orch.list_runs()).runs[0].id)  # and it is stored

        # Two runs in flight: neither run's end holds up the loop for the other.
        held.release = anyio.Event()
        first = await orch.start(DispatchRequest(task="a"), durable=False)
        second = await orch.start(DispatchRequest(task="b"), durable=False)
        before = len(store.durable_on)
        held.release.set()
        for run in (first, second):
            assert (await orch.wait(run.id, 30)).status == "completed"
        assert store.durable_on[before:] == ["thread", "thread"]

        # A slow disk: once a durable write took long, the next ones go to a thread until one is quick.
        assert await ends() == ["loop"]
        store.slow = True
        assert await ends() == ["loop"]  # this one found out
        assert await ends() == ["thread"]
        store.slow = False
        assert await ends() == ["thread"]  # quick again, measured off the loop
        assert await ends() == ["loop"]
