"""Runs on Temporal (MCP_COLLAB_ENGINE=temporal): Temporal's real dev server on loopback, the MCP
server in this process, and `mcp-collab worker` processes standing in for other machines (each with
its own queue, workspace roots and CLI install) sharing the run store."""

from __future__ import annotations

import dataclasses
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult

from mcp_collab import readiness
from mcp_collab.config import Settings
from mcp_collab.engine.executor import StepExecutor
from mcp_collab.engine.recorder import RunRecorder
from mcp_collab.engine.temporal import client as temporal_client
from mcp_collab.engine.temporal.activities import Activities, fit
from mcp_collab.engine.temporal.jobs import STEP_OUTPUT_BYTES, SaveRun
from mcp_collab.errors import InvalidRequestError
from mcp_collab.models import DispatchRequest, Run, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.server import build_server
from mcp_collab.store import StepTexts, open_store
from mcp_collab.strategies import STRATEGIES
from tests.conftest import alive, fake_cli, quick_vendor_clis, read_pids
from tests.fake_clis.fakecli import answer_text
from tests.support.git_repo import init_repo
from tests.support.mcp_helpers import call, until_listening
from tests.support.temporal import TemporalDev, WorkerProcess, dev_server, engine_env, free_port
from tests.support.vendor_stub import StubReply, VendorStub
from tests.test_mcp_tasks import CreatedTask, Tasks, poll_until_over, task_request
from tests.test_store import a_run
from tests.test_store_contract import open_backend

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def temporal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TemporalDev]:
    yield from dev_server(tmp_path_factory)


@pytest.fixture
def env(base_env: dict[str, str], temporal: TemporalDev, tmp_path: Path) -> dict[str, str]:
    # doctor's CLI rows are not what these tests are about: the CLIs answer at once
    return engine_env({**base_env, **quick_vendor_clis()}, temporal, tmp_path.name)


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes; every one is stopped when the test ends."""
    started: list[WorkerProcess] = []

    def start(env: dict[str, str], queue: str, *roots: Path, slots: int = 4, **extra: str) -> WorkerProcess:
        for root in roots:
            root.mkdir(parents=True, exist_ok=True)
        worker = WorkerProcess({**env, **extra}, f"{queue}-{tmp_path.name}", list(roots), slots=slots)
        started.append(worker)
        return worker.start()

    yield start
    for i, worker in enumerate(started):
        worker.stop()
        # What each worker said, for a failure's post-mortem.
        (tmp_path / f"worker-{i}-{worker.queue}.log").write_text("".join(worker.lines), encoding="utf-8")


async def server(env: dict[str, str]) -> WorkerOrchestrator:
    orchestrator = WorkerOrchestrator(Settings.from_env(env), runtimes={})
    if not await orchestrator.list_workers():
        await orchestrator.register_worker(WorkerSpec(name="coder", model="codex_cli"))
    return orchestrator


@pytest.fixture
async def serving(env: dict[str, str]) -> AsyncIterator[WorkerOrchestrator]:
    orchestrator = await server(env)
    async with orchestrator, orchestrator.running():
        yield orchestrator


# A lost worker noticed within seconds, not the default half minute: its step ends once no heartbeat
# came for 5 s (MCP_COLLAB_TEMPORAL_HEARTBEAT_TIMEOUT_S, the server's, given to each run), its lease
# lapses 5 s after its last renewal (MCP_COLLAB_LEASE_TTL_S), and a job its queue did not take within
# that TTL (the commit of the run's worktrees) is checked against the workers' leases.
QUICK_DEATH = {"MCP_COLLAB_TEMPORAL_HEARTBEAT_TIMEOUT_S": "5", "MCP_COLLAB_LEASE_TTL_S": "5"}


async def until(orchestrator: WorkerOrchestrator, run_id: str, check: Callable[[Run], bool]) -> Run:
    """The run once ``check`` holds (re-read as the workflow saves it)."""
    with anyio.fail_after(60):
        while True:
            run = await orchestrator.get_run(run_id)
            if check(run):
                return run
            await anyio.sleep(0.1)


async def test_a_run_is_a_workflow_whose_step_runs_on_the_worker_that_has_the_directory(
    env: dict[str, str], machines: Callable[..., WorkerProcess], serving: WorkerOrchestrator, tmp_path: Path
) -> None:
    machines(env, "alpha", tmp_path / "alpha", CODEX_FAKE_SAY="alpha did it")
    machines(env, "beta", tmp_path / "beta", CODEX_FAKE_SAY="beta did it")
    (tmp_path / "beta" / "project").mkdir()
    progress: list[str] = []
    run = await serving.dispatch(
        DispatchRequest(task="fix it", working_directory=str(tmp_path / "beta" / "project")),
        on_progress=progress.append,
    )
    assert run.status == "completed", run.error
    assert run.result == "beta did it", "the step ran on the worker whose roots hold the directory"
    [step] = run.steps
    assert step.status == "completed" and step.runtime_mode == "cli" and step.usage is not None
    assert step.directory == str(tmp_path / "beta" / "project")
    assert any("step 1 started" in m for m in progress) and any("completed" in m for m in progress)
    stored = open_store(Settings.from_env(env)).get_run(run.id)
    assert stored is not None and stored.status == "completed" and stored.steps[0].output == "beta did it"

    alpha = await serving.dispatch(DispatchRequest(task="again", working_directory=str(tmp_path / "alpha")))
    assert alpha.result == "alpha did it"


async def test_a_directory_no_worker_has_is_refused_before_anything_starts(
    env: dict[str, str], machines: Callable[..., WorkerProcess], serving: WorkerOrchestrator, tmp_path: Path
) -> None:
    machines(env, "alpha", tmp_path / "alpha")
    with pytest.raises(InvalidRequestError, match=r"no live mcp-collab worker has .* in its workspace roots"):
        await serving.start(DispatchRequest(task="x", working_directory=str(tmp_path / "elsewhere")))
    with pytest.raises(InvalidRequestError, match="absolute path"):
        await serving.start(DispatchRequest(task="x", working_directory="alpha/../.."))
    assert (await serving.list_runs()).runs == [], "nothing was stored"


async def test_cancel_reaches_the_step_on_another_process_and_kills_its_process_tree(
    env: dict[str, str], machines: Callable[..., WorkerProcess], serving: WorkerOrchestrator, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    machines(
        env,
        "alpha",
        tmp_path / "alpha",
        MCP_COLLAB_CODEX_BIN=fake_cli("hang"),
        CODEX_FAKE_PIDFILE=str(pids),
    )
    run = await serving.start(DispatchRequest(task="hang", working_directory=str(tmp_path / "alpha")))
    await until(serving, run.id, lambda r: bool(r.steps) and r.steps[0].status == "running" and pids.exists())
    with anyio.fail_after(60):
        while len(read_pids(pids)) < 2:  # the fake and its children are up
            await anyio.sleep(0.05)
    cancelled, changed = await serving.cancel(run.id)
    assert changed and cancelled.status == "cancelled"
    assert cancelled.steps[0].status == "cancelled"
    with anyio.fail_after(30):
        while any(alive(pid) for pid in read_pids(pids)):
            await anyio.sleep(0.05)


async def test_a_step_on_temporal_is_held_to_the_servers_step_limits_not_the_workers_own(
    env: dict[str, str], machines: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """MCP_COLLAB_STEP_TIMEOUT, MCP_COLLAB_IDLE_TIMEOUT, MCP_COLLAB_MAX_ANSWER_BYTES and
    MCP_COLLAB_PRICES are the server's, as on the local engine: the worker that runs a step applies
    them (its own are the defaults: an hour, ten minutes, 64 MiB, the built-in prices)."""
    pids = tmp_path / "pids"
    machines(env, "alpha", tmp_path / "alpha", MCP_COLLAB_CODEX_BIN=fake_cli("hang"), CODEX_FAKE_PIDFILE=str(pids))
    machines(env, "beta", tmp_path / "beta", MCP_COLLAB_CODEX_BIN=fake_cli("silent"))
    machines(
        env, "gamma", tmp_path / "gamma", MCP_COLLAB_CODEX_BIN=fake_cli("size_codex"), CODEX_FAKE_ANSWER_CHARS="5000"
    )
    machines(env, "delta", tmp_path / "delta", MCP_COLLAB_CODEX_BIN=fake_cli("ok"))
    dear = '{"gpt-5": {"input": 1000000, "output": 1000000}}'  # a dollar a token: the fake's 3 + 2 cost $5
    first = {"MCP_COLLAB_STEP_TIMEOUT": "3", "MCP_COLLAB_MAX_ANSWER_BYTES": "1000", "MCP_COLLAB_PRICES": dear}
    ended = {}
    for roots, limits in (
        (("alpha", "gamma", "delta"), first),
        (("beta",), {"MCP_COLLAB_IDLE_TIMEOUT": "2"}),
    ):
        orchestrator = await server({**env, **limits})
        if "priced" not in {w.name for w in await orchestrator.list_workers()}:
            await orchestrator.register_worker(WorkerSpec(name="priced", model="codex_cli", cli_model="gpt-5"))
        async with orchestrator, orchestrator.running():
            runs = [
                await orchestrator.start(
                    DispatchRequest(task="work", working_directory=str(tmp_path / root), workers=["priced"])
                )
                for root in roots
            ]
            ended |= {root: await orchestrator.wait(run.id, 60) for root, run in zip(roots, runs, strict=True)}
    timed, idle, long = ended["alpha"], ended["beta"], ended["gamma"]
    assert timed.status == "failed" and "wall-clock limit of 3s" in (timed.steps[0].error or ""), timed.steps
    assert idle.status == "failed" and "printed nothing for 2s" in (idle.steps[0].error or ""), idle.steps
    assert long.status == "failed" and "over the 1000-byte cap" in (long.steps[0].error or ""), long.steps
    priced = ended["delta"].steps[0]
    assert priced.model == "gpt-5" and priced.cost_usd == 5.0 and priced.cost_source == "price_table", priced
    with anyio.fail_after(30):
        while any(alive(pid) for pid in read_pids(pids)):
            await anyio.sleep(0.05)


async def test_an_sdk_step_runs_on_the_worker_and_falls_back_to_its_cli_as_on_the_local_engine(
    env: dict[str, str], machines: Callable[..., WorkerProcess], serving: WorkerOrchestrator, tmp_path: Path,
    stub: VendorStub,
) -> None:  # fmt: skip
    """runtimeMode openai_sdk on Temporal: the worker's own OpenAI client calls the endpoint (the
    loopback stub, over HTTP); a retry-safe failure there falls back to the worker's CLI, and the
    step records runtimeMode and fallbackFrom."""
    machines(
        env, "alpha", tmp_path / "alpha", MCP_COLLAB_CODEX_BIN=fake_cli("ok"),
        OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=f"{stub.url}/v1",
    )  # fmt: skip
    where = str(tmp_path / "alpha")
    by_sdk = await serving.dispatch(DispatchRequest(task="hi", runtime_mode="openai_sdk", working_directory=where))
    assert by_sdk.status == "completed", by_sdk.error
    assert (by_sdk.steps[0].runtime_mode, by_sdk.steps[0].fallback_from) == ("openai_sdk", None)
    stub.script(StubReply(status=503, error_message="overloaded"))
    fell = await serving.dispatch(DispatchRequest(task="hi", runtime_mode="openai_sdk", working_directory=where))
    assert fell.status == "completed", fell.error
    step = fell.steps[0]
    assert (step.runtime_mode, step.fallback_from) == ("cli", "openai_sdk")
    assert step.attempts[0].error_code == "http_503" and step.output == "fake codex did the task"
    assert [r.kind for r in stub.requests].count("responses") == 2, "both SDK steps reached the endpoint"


async def test_a_run_over_its_budget_stops_before_its_next_step_on_temporal_too(
    env: dict[str, str], machines: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    machines(env, "alpha", tmp_path / "alpha", MCP_COLLAB_CODEX_BIN=fake_cli("ok"))
    orchestrator = await server({**env, "MCP_COLLAB_PRICES": '{"gpt-5": {"input": 1000000, "output": 1000000}}'})
    for name in ("a", "b"):
        await orchestrator.register_worker(WorkerSpec(name=name, model="codex_cli", cli_model="gpt-5"))
    async with orchestrator, orchestrator.running():
        run = await orchestrator.dispatch(
            DispatchRequest(
                task="t", strategy="security_redteam_pass", workers=["a", "b"], max_cost_usd=1.0,
                working_directory=str(tmp_path / "alpha"),
            )
        )  # fmt: skip
    assert run.status == "failed" and run.error == "stopped: the run's cost $5 reached its budget of $1 (maxCostUsd)"
    assert [s.status for s in run.steps] == ["completed"], "the second step never started"


async def test_a_server_without_worktrees_has_its_writers_work_in_place_on_the_workers_too(
    env: dict[str, str], machines: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """MCP_COLLAB_WORKTREES=0 on the server: a writer on a worker (whose own setting allows them)
    works in the repository itself, as on the local engine."""
    repo = init_repo(tmp_path / "alpha" / "repo", {"README.md": "hello\n"})
    machines(env, "alpha", tmp_path / "alpha", MCP_COLLAB_CODEX_BIN=fake_cli("write"))
    orchestrator = await server({**env, "MCP_COLLAB_WORKTREES": "0"})
    async with orchestrator, orchestrator.running():
        run = await orchestrator.dispatch(DispatchRequest(task="write", working_directory=str(repo)))
    assert run.status == "completed", run.error
    assert run.worktrees == [] and run.steps[0].directory == str(repo)
    assert (repo / "fake-work.txt").exists(), "written in the repository itself"


async def test_a_run_cancelled_mid_step_keeps_the_worktree_its_step_opened(
    env: dict[str, str], machines: Callable[..., WorkerProcess], serving: WorkerOrchestrator, tmp_path: Path
) -> None:
    """The step's own activity opens its worktree: a cancel still leaves it recorded, its work
    committed on the run's branch, and discard removes it."""
    pids = tmp_path / "pids"
    repo = init_repo(tmp_path / "alpha" / "repo", {"README.md": "hello\n"})
    machines(env, "alpha", tmp_path / "alpha", MCP_COLLAB_CODEX_BIN=fake_cli("hang"), CODEX_FAKE_PIDFILE=str(pids))
    run = await serving.start(DispatchRequest(task="hang", working_directory=str(repo)))
    with anyio.fail_after(60):
        while len(read_pids(pids)) < 2:  # the CLI and its children are up, in the worktree
            await anyio.sleep(0.05)
    cancelled, changed = await serving.cancel(run.id)
    assert changed and cancelled.status == "cancelled"
    [step] = cancelled.steps
    assert step.status == "cancelled"
    [tree] = cancelled.worktrees
    assert step.directory is not None and step.directory.startswith(tree.path), (step.directory, tree.path)
    assert tree.tip is not None and Path(tree.path).is_dir(), "committed at the run's end, as on the local engine"
    discarded = await serving.discard(run.id)
    assert discarded.branches == (tree.branch,) and not Path(tree.path).exists()


async def test_a_worker_that_dies_mid_step_leaves_the_step_interrupted_and_the_run_ends(
    env: dict[str, str], machines: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    env = {**env, **QUICK_DEATH}
    pids = tmp_path / "pids"
    # A CLI that goes quiet and ignores SIGTERM, with children: it outlives the worker's death.
    hang = {"MCP_COLLAB_CODEX_BIN": fake_cli("hang"), "CODEX_FAKE_PIDFILE": str(pids)}
    repo = init_repo(tmp_path / "alpha" / "repo", {"README.md": "hello\n"})  # the writer gets a worktree there
    # Another machine goes on hosting the run's workflow. Started first, its pollers wait longest, so
    # it takes the workflow (were it alpha's, the run's next workflow task would wait out alpha's
    # sticky queue, 10 s, before beta took it over: slower, not different).
    machines(env, "beta", tmp_path / "beta")
    worker = machines(env, "alpha", tmp_path / "alpha", **hang)
    serving = await server(env)
    async with serving, serving.running():
        run = await serving.start(DispatchRequest(task="long", working_directory=str(repo)))
        await until(serving, run.id, lambda r: bool(r.steps) and r.steps[0].status == "running")
        with anyio.fail_after(60):
            while len(read_pids(pids)) < 2:  # the CLI and its children are up
                await anyio.sleep(0.05)
        worker.kill()
        ended = await serving.wait(run.id, 120)
    assert ended.status == "interrupted", ended
    [step] = ended.steps
    assert step.status == "interrupted", step
    assert f"no heartbeat for {QUICK_DEATH['MCP_COLLAB_TEMPORAL_HEARTBEAT_TIMEOUT_S']}s" in (step.error or "")
    assert "never run twice" in (ended.error or "")
    # Its worktree is on the dead machine: the run ends without committing it, rather than wait for it.
    assert any(f"no worker serves task queue alpha-{tmp_path.name} any more" in note for note in ended.notes)
    assert [w.tip for w in ended.worktrees] == [None]
    # The killed worker could not kill its step's CLI; the next worker started on this machine does.
    assert any(alive(pid) for pid in read_pids(pids))
    machines(env, "alpha", tmp_path / "alpha", **hang)
    assert not any(alive(pid) for pid in read_pids(pids))


async def test_a_worker_stopped_mid_step_leaves_the_step_interrupted_and_the_run_ends(
    env: dict[str, str], machines: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    env = {**env, "MCP_COLLAB_LEASE_TTL_S": QUICK_DEATH["MCP_COLLAB_LEASE_TTL_S"]}  # a stop drops the lease at once
    pids = tmp_path / "pids"
    repo = init_repo(tmp_path / "alpha" / "repo", {"README.md": "hello\n"})
    # Its steps get a second to end once it is told to stop (a hung CLI never does).
    worker = machines(
        env, "alpha", tmp_path / "alpha", MCP_COLLAB_CODEX_BIN=fake_cli("hang"), CODEX_FAKE_PIDFILE=str(pids),
        MCP_COLLAB_WORKER_STOP_GRACE_S="1",
    )  # fmt: skip
    machines(env, "beta", tmp_path / "beta")  # hosts the run's workflow once alpha is gone
    serving = await server(env)
    async with serving, serving.running():
        run = await serving.start(DispatchRequest(task="long", working_directory=str(repo)))
        with anyio.fail_after(60):
            while len(read_pids(pids)) < 2:  # the CLI and its children are up
                await anyio.sleep(0.05)
        assert worker.stop() == 0, "SIGTERM: the worker stops cleanly (as systemctl stop or restart does)"
        assert not any(alive(pid) for pid in read_pids(pids)), "it killed its step's process tree on the way out"
        ended = await serving.wait(run.id, 120)
    assert ended.status == "interrupted", ended
    [step] = ended.steps
    assert step.status == "interrupted" and "was shut down before the step ended" in (step.error or "")
    assert any(f"no worker serves task queue alpha-{tmp_path.name} any more" in note for note in ended.notes)


async def test_a_restart_of_the_mcp_server_interrupts_nothing(
    env: dict[str, str], machines: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    machines(env, "alpha", tmp_path / "alpha", MCP_COLLAB_CODEX_BIN=fake_cli("slow"), CODEX_FAKE_SECONDS="3")
    first = await server(env)
    async with first, first.running():
        run = await first.start(DispatchRequest(task="outlive me", working_directory=str(tmp_path / "alpha")))
        await until(first, run.id, lambda r: bool(r.steps) and r.steps[0].status == "running")
    # The first server is gone (as a crash or a restart leaves it); the next one reads the run.
    second = await server(env)
    async with second, second.running():
        ended = await second.wait(run.id, 120)
    assert ended.status == "completed", ended.error
    assert ended.result == "slow work finished after 3s"


async def test_a_server_whose_temporal_is_down_keeps_answering_and_says_so_on_dispatch(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The server connects to Temporal at start, in the background: a Temporal that does not answer
    stops neither the server nor the calls that need only the store."""
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    down = {**env, "MCP_COLLAB_TEMPORAL_ADDRESS": address}
    # A worker announced in the store (its machine is up), so the dispatch gets as far as Temporal.
    open_store(Settings.from_env(down)).renew_lease(temporal_client.worker_lease("alpha", [tmp_path]), 60)
    orchestrator = await server(down)
    async with orchestrator, orchestrator.running():
        assert (await orchestrator.list_runs()).runs == []
        with pytest.raises(temporal_client.TemporalUnavailable, match=f"cannot reach Temporal at {address}"):
            await orchestrator.start(DispatchRequest(task="nowhere", working_directory=str(tmp_path)))
        assert [w.name for w in await orchestrator.list_workers()] == ["coder"]


async def terminated_mid_step(orchestrator: WorkerOrchestrator, where: Path) -> Run:
    """A run whose workflow an operator terminated in Temporal while its step was running."""
    run = await orchestrator.start(DispatchRequest(task="terminated", working_directory=str(where)))
    await until(orchestrator, run.id, lambda r: bool(r.steps) and r.steps[0].status == "running")
    client = await orchestrator.runs.client()  # type: ignore[attr-defined]
    await client.get_workflow_handle(run.id).terminate(reason="an operator ended it in Temporal")
    return run


async def test_a_run_whose_workflow_was_terminated_is_reconciled_by_the_next_server_at_start(
    env: dict[str, str], machines: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """Recovery at start finds the run open in the store with its workflow closed: it records the
    run interrupted, and every call that waited for recovery is answered (it once waited on itself)."""
    machines(env, "alpha", tmp_path / "alpha", MCP_COLLAB_CODEX_BIN=fake_cli("hang"))
    first = await server(env)
    async with first, first.running():
        run = await terminated_mid_step(first, tmp_path / "alpha")
    second = await server(env)
    async with second, second.running():
        with anyio.fail_after(60):
            reconciled = await second.get_run(run.id)
    assert reconciled.status == "interrupted"
    assert "ended as TERMINATED without recording the run's end" in (reconciled.error or "")
    assert reconciled.steps[0].status == "interrupted"


async def test_a_run_whose_workflow_was_terminated_is_recorded_so_by_the_servers_sweep_unread(
    env: dict[str, str], machines: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """Nobody reads the run: the server's sweep finds its workflow closed and records the run
    interrupted in the store, as a list then shows it."""
    env = {**env, **QUICK_DEATH}  # the sweep comes with the lease renewals: every 5/3 s here
    machines(env, "alpha", tmp_path / "alpha", MCP_COLLAB_CODEX_BIN=fake_cli("hang"))
    store = open_store(Settings.from_env(env))
    orchestrator = await server(env)
    async with orchestrator, orchestrator.running():
        run = await terminated_mid_step(orchestrator, tmp_path / "alpha")
        with anyio.fail_after(60):
            while (stored := store.get_run(run.id)) is None or stored.status not in ("interrupted", "failed"):
                await anyio.sleep(0.1)
        listed = await orchestrator.list_runs(status="interrupted", strategy=None, worker=None, limit=10, cursor=None)
    assert "ended as TERMINATED without recording the run's end" in (stored.error or "")
    assert [r.id for r in listed.runs] == [run.id]


async def test_strategies_run_unchanged_writers_in_worktrees_made_by_the_worker(
    env: dict[str, str], machines: Callable[..., WorkerProcess], serving: WorkerOrchestrator, tmp_path: Path
) -> None:
    repo = init_repo(tmp_path / "alpha" / "repo", {"README.md": "hello\n"})
    machines(env, "alpha", tmp_path / "alpha", MCP_COLLAB_CODEX_BIN=fake_cli("write"))
    await serving.register_worker(WorkerSpec(name="second", model="codex_cli"))
    await serving.register_worker(WorkerSpec(name="judge", model="codex_cli"))
    run = await serving.dispatch(
        DispatchRequest(
            task="contend", strategy="best_of_n", workers=["coder", "second", "judge"], working_directory=str(repo)
        )
    )
    assert [s.role for s in run.steps] == ["writer", "writer", "judge"]
    assert len(run.worktrees) == 2 and all(w.tip and "fake-work.txt" in w.diff for w in run.worktrees)
    assert len({w.base_commit for w in run.worktrees}) == 1, "both writers started from the same base"
    assert (
        subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True).stdout == ""
    )

    # The work comes back through the worker that holds it.
    applied = await serving.apply(run.id, "1")
    assert applied.applied and applied.files == ("fake-work.txt",), applied.message
    assert (repo / "fake-work.txt").read_text(encoding="utf-8").startswith("written by the fake")
    discarded = await serving.discard(run.id)
    assert set(discarded.branches) == {w.branch for w in run.worktrees}
    assert not any(Path(w.path).exists() for w in run.worktrees)
    stored = await serving.get_run(run.id)
    assert [w.state for w in stored.worktrees] == ["discarded", "discarded"]


async def test_writers_whose_worktree_diffs_together_exceed_what_temporal_carries_end_and_deliver(
    env: dict[str, str], machines: Callable[..., WorkerProcess], serving: WorkerOrchestrator, tmp_path: Path
) -> None:
    """Three writers of about 850 KB of diff each: more than one payload carries (2 MiB) when their
    worktrees are committed, and when one is applied. Each diff travels cut to its share and is
    stored whole, as on the local engine; a branch applies whole. (The fake judge names no choice:
    the run fails for that, after its worktrees were recorded, as the two-writer test's does.)"""
    repo = init_repo(tmp_path / "alpha" / "repo", {"README.md": "hello\n"})
    machines(env, "alpha", tmp_path / "alpha", MCP_COLLAB_CODEX_BIN=fake_cli("write"), CODEX_FAKE_WRITE_LINES="65000")
    for name in ("second", "third", "judge"):
        await serving.register_worker(WorkerSpec(name=name, model="codex_cli"))
    run = await serving.dispatch(
        DispatchRequest(
            task="contend", strategy="best_of_n", workers=["coder", "second", "third", "judge"],
            working_directory=str(repo),
        )
    )  # fmt: skip
    assert run.error is not None and "the judge named no candidate" in run.error, run.error
    assert len(run.worktrees) == 3 and all(w.tip for w in run.worktrees)
    assert all(w.diff.startswith("diff --git") and w.diff.endswith("+line 64999\n") for w in run.worktrees)
    assert open_store(Settings.from_env(env)).stashed_texts(run.id, [-1, -2, -3]) == [], "the stashes went"
    applied = await serving.apply(run.id, "1")
    assert applied.applied and applied.files == ("fake-work.txt",), applied.message
    lines = (repo / "fake-work.txt").read_text(encoding="utf-8").splitlines()
    assert lines[-1] == "line 64999", "the chosen work applied whole"


async def test_a_red_teamer_with_more_findings_than_temporal_carries_ends_its_run(
    env: dict[str, str], machines: Callable[..., WorkerProcess], serving: WorkerOrchestrator, tmp_path: Path
) -> None:
    """12,000 findings of about 220 characters (2.6 MB), beside an answer that holds them: the
    findings travel cut, saying so, and the answer is stored whole with all of them."""
    machines(env, "alpha", tmp_path / "alpha", MCP_COLLAB_CODEX_BIN=fake_cli("findings"), CODEX_FAKE_FINDINGS="12000")
    await serving.register_worker(WorkerSpec(name="attacker", model="codex_cli"))
    run = await serving.dispatch(
        DispatchRequest(
            task="attack", strategy="security_redteam_pass", workers=["coder", "attacker"],
            working_directory=str(tmp_path / "alpha"),
        )
    )  # fmt: skip
    assert "PayloadsTooLarge" not in (run.error or ""), run.error
    redteam = run.steps[1]
    assert redteam.verdict == "fail" and redteam.findings[0].startswith("issue 0 ")
    assert redteam.findings[-1].startswith("[... ") and "the step's output has them all" in redteam.findings[-1]
    assert redteam.output.count("FINDING: issue") == 12000 and not redteam.output_truncated


async def test_every_tool_behaves_as_with_the_local_engine_through_a_real_mcp_client(
    env: dict[str, str], machines: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    machines(env, "alpha", tmp_path / "alpha", MCP_COLLAB_CODEX_BIN=fake_cli("slow"), CODEX_FAKE_SECONDS="2")
    where = str(tmp_path / "alpha")
    messages: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    async with Client(build_server(Settings.from_env(env), {})) as client:  # type: ignore[arg-type]
        await call(client, "spawn_worker", name="coder", model="codex_cli")
        result = await client.call_tool(
            "dispatch_task",
            {"task": "work", "workingDirectory": where, "waitSeconds": 40},
            progress_callback=on_progress,
        )
        run = result.structured_content
        assert run is not None and run["status"] == "completed", result.content
        assert any("step 1 started" in m for m in messages), messages
        assert any("step 1 completed" in m for m in messages), messages

        # A short wait answers with the run still going; wait_worker_run picks it up; cancel ends it.
        started = await call(client, "dispatch_task", task="long", workingDirectory=where, waitSeconds=0)
        assert started["status"] in ("queued", "running")
        listed = await call(client, "list_worker_runs")
        assert {r["id"] for r in listed["runs"]} == {run["id"], started["id"]}
        waited = await call(client, "wait_worker_run", runId=started["id"], timeoutSeconds=40)
        assert waited["status"] == "completed" and waited["result"] == "slow work finished after 2s"
        output = await call(client, "read_run_output", runId=started["id"], step=0)
        assert "slow work finished" in output["text"]

        third = await call(client, "dispatch_task", task="stop me", workingDirectory=where, waitSeconds=0)
        cancelled = await call(client, "cancel_worker_run", runId=third["id"])
        assert cancelled["cancelled"] is True and cancelled["run"]["status"] == "cancelled"

        checks = {c["name"]: c for c in (await call(client, "check_runtimes"))["checks"]}
        assert checks["engine:temporal"]["ok"] and checks["engine:workers"]["ok"]
        assert f"alpha-{tmp_path.name}" in checks["engine:workers"]["detail"]


async def test_a_follow_up_continues_on_the_worker_that_holds_the_parents_worktree(
    env: dict[str, str], machines: Callable[..., WorkerProcess], serving: WorkerOrchestrator, tmp_path: Path
) -> None:
    repo = init_repo(tmp_path / "beta" / "repo", {"README.md": "hello\n"})
    machines(env, "alpha", tmp_path / "alpha")
    machines(env, "beta", tmp_path / "beta", MCP_COLLAB_CODEX_BIN=fake_cli("write"))
    parent = await serving.dispatch(DispatchRequest(task="start", working_directory=str(repo)))
    assert parent.status == "completed" and len(parent.worktrees) == 1
    follow = await serving.continue_run(parent.id, "now the tests")
    done = await serving.wait(follow.id, 60)
    assert done.status == "completed", done.error
    assert done.parent_id == parent.id
    [step] = done.steps
    assert step.directory is not None and step.directory.startswith(parent.worktrees[0].path)
    assert any("continues in the worktree of" in note for note in done.notes)
    assert done.worktrees and done.worktrees[0].branch == parent.worktrees[0].branch


async def test_a_run_on_temporal_is_an_mcp_task_a_client_polls_and_cancels(
    env: dict[str, str], machines: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    machines(env, "alpha", tmp_path / "alpha", MCP_COLLAB_CODEX_BIN=fake_cli("slow"), CODEX_FAKE_SECONDS="2")
    where = str(tmp_path / "alpha")
    server = build_server(Settings.from_env(env), {})
    async with Client(server, mode="2026-07-28", extensions=[Tasks()]) as client:  # type: ignore[arg-type]
        await call(client, "spawn_worker", name="coder", model="codex_cli")
        created = await client.session.call_tool(
            "dispatch_task", {"task": "take your time", "workingDirectory": where}, allow_claimed=True
        )
        assert isinstance(created, CreatedTask) and created.status == "working", created
        done = await poll_until_over(client, created.task_id)
        assert done["status"] == "completed", done
        run = CallToolResult.model_validate(done["result"]).structured_content
        assert run is not None and run["id"] == created.task_id and run["result"] == "slow work finished after 2s"

    machines(env, "beta", tmp_path / "beta", MCP_COLLAB_CODEX_BIN=fake_cli("hang"), CODEX_FAKE_PIDFILE=str(pids))
    async with Client(build_server(Settings.from_env(env), {}), mode="2026-07-28", extensions=[Tasks()]) as client:  # type: ignore[arg-type]
        created = await client.session.call_tool(
            "dispatch_task", {"task": "hang", "workingDirectory": str(tmp_path / "beta")}, allow_claimed=True
        )
        assert isinstance(created, CreatedTask)
        with anyio.fail_after(60):
            while len(read_pids(pids)) < 2:
                await anyio.sleep(0.05)
        await task_request(client, "tasks/cancel", created.task_id)
        over = await poll_until_over(client, created.task_id)
        assert over["status"] == "cancelled", over
        with anyio.fail_after(30):
            while any(alive(pid) for pid in read_pids(pids)):
                await anyio.sleep(0.05)


async def test_a_review_loop_runs_its_rounds_on_temporal_as_on_the_local_engine(
    env: dict[str, str], machines: Callable[..., WorkerProcess], serving: WorkerOrchestrator, tmp_path: Path
) -> None:
    repo = init_repo(tmp_path / "alpha" / "repo", {"README.md": "hello\n"})
    # The fake reviewer never writes "approve": the loop runs every round it is allowed.
    machines(env, "alpha", tmp_path / "alpha", MCP_COLLAB_CODEX_BIN=fake_cli("write"))
    await serving.register_worker(WorkerSpec(name="reviewer", model="codex_cli"))
    run = await serving.dispatch(
        DispatchRequest(
            task="improve", strategy="review_loop", workers=["coder", "reviewer"], working_directory=str(repo),
            max_rounds=2,
        )
    )  # fmt: skip
    assert run.status == "completed", run.error
    assert [(s.role, s.round) for s in run.steps] == [("writer", 1), ("reviewer", 1), ("writer", 2), ("reviewer", 2)]
    assert run.steps[2].directory == run.steps[0].directory, "the revision works in the same worktree"
    assert len(run.worktrees) == 1 and "fake-work.txt" in run.worktrees[0].diff


# An answer Temporal could not carry (it refuses a payload over 2 MiB): 2 Mi characters, about 2.6
# MiB of UTF-8; and a writer's file whose diff (about 850 KB) is over the 512 KiB a step's diff
# travels with.
LONG_ANSWER_CHARS = 2 << 20
LONG_DIFF_LINES = 65_000


@pytest.mark.parametrize("backend", ["json", "postgres"])
async def test_a_step_too_long_to_travel_through_temporal_is_stored_whole_as_on_the_local_engine(
    env: dict[str, str], machines: Callable[..., WorkerProcess], tmp_path: Path, backend: str,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    """An answer and a diff longer than a step's result may carry are cut for the journey; the
    worker stashes them whole in the run store and the run's save puts them back, so the store
    (and every tool) has them as the local engine would, and the stash is gone."""
    if backend == "postgres":
        env = {**env, "MCP_COLLAB_STORE_URL": request.getfixturevalue("postgres_url")}
    repo = init_repo(tmp_path / "alpha" / "repo", {"README.md": "hello\n"})
    machines(
        env, "alpha", tmp_path / "alpha", MCP_COLLAB_CODEX_BIN=fake_cli("write"),
        CODEX_FAKE_ANSWER_CHARS=str(LONG_ANSWER_CHARS), CODEX_FAKE_WRITE_LINES=str(LONG_DIFF_LINES),
    )  # fmt: skip
    answer = answer_text(LONG_ANSWER_CHARS)
    async with Client(build_server(Settings.from_env(env), {})) as client:  # type: ignore[arg-type]
        await call(client, "spawn_worker", name="coder", model="codex_cli")
        run = await call(client, "dispatch_task", task="answer at length", workingDirectory=str(repo), waitSeconds=50)
        assert run["status"] == "completed", run["error"]
        # Each page reads the whole run again: all 500-odd pages are read from the JSON store; from
        # PostgreSQL (several times slower per page) the last ones.
        start = 0 if backend == "json" else len(answer) - 10_000
        pages: list[str] = []
        offset: int | None = start
        with anyio.fail_after(120):
            while offset is not None:
                page = await call(client, "read_run_output", runId=run["id"], step=0, offset=offset)
                pages.append(page["text"])
                offset = page["nextOffset"]
        assert "".join(pages) == answer[start:] and page["totalChars"] == len(answer)
        whole = await client.read_resource(f"runs://{run['id']}/steps/0/output")
        assert whole.contents[0].text == answer  # type: ignore[union-attr]
        # A follow-up: what it sends of such a parent through Temporal fits there too.
        follow = await call(client, "continue_worker_run", runId=run["id"], message="and more", waitSeconds=50)
        assert follow["status"] == "completed", follow["error"]
    store = open_store(Settings.from_env(env))
    stored = store.get_run(run["id"])
    assert stored is not None and stored.result == answer
    assert store.stashed_texts(run["id"], [0]) == [], "the stash went once the run's record held it"
    [step] = stored.steps
    assert step.output == answer and not step.output_truncated
    assert f"+line {LONG_DIFF_LINES // 2}\n" in step.diff and step.diff.endswith(f"+line {LONG_DIFF_LINES - 1}\n")


@pytest.mark.parametrize("backend", ["json", "postgres"])
async def test_a_save_puts_a_stashed_step_back_whole_and_a_retried_save_keeps_it_so(
    base_env: dict[str, str], tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """``save_run``, the workflow's door to the store, on what a step's activity left: the whole
    texts go into the run's record, then the stash is dropped; a retry of that save (its worker died
    before the workflow heard back) and the later saves that leave the output out keep it whole."""
    store = open_backend(
        backend, str(tmp_path / "state") if backend == "json" else request.getfixturevalue("postgres_url")
    )
    settings = Settings.from_env(base_env)
    activities = Activities(settings, store, StepExecutor(settings, {}, RunRecorder(store, settings.redact)))
    answer = answer_text(LONG_ANSWER_CHARS)
    run = a_run(1, status="running")
    run.steps[0].status = "running"
    await activities.save_run(SaveRun(run=run))
    assert store.stash_texts(run.id, StepTexts(0, answer, "", False))  # as the step's activity does
    ended = run.model_copy(deep=True)
    ended.status, ended.result = "completed", fit(answer, STEP_OUTPUT_BYTES)[0]
    ended.steps[0].status, ended.steps[0].output, ended.steps[0].output_truncated = "completed", ended.result, True
    later = ended.model_copy(deep=True)
    later.steps[0].output = ""
    for job in (SaveRun(run=ended), SaveRun(run=ended), SaveRun(run=later, carried=[0], durable=False)):
        await activities.save_run(job.model_copy(deep=True))
        stored = store.get_run(run.id)
        assert stored is not None and stored.steps[0].output == answer and not stored.steps[0].output_truncated
        assert stored.result == answer and store.stashed_texts(run.id, [0]) == []

    # A stash whose step ended without it (its worker died after stashing): not taken, and dropped.
    lost = a_run(2, status="interrupted")
    lost.steps[0].status = "interrupted"
    store.save_run(lost)
    assert store.stash_texts(lost.id, StepTexts(0, answer, "", False))
    await activities.save_run(SaveRun(run=lost.model_copy(deep=True)))
    assert store.get_run(lost.id) == lost and store.stashed_texts(lost.id, [0]) == []
    getattr(store, "close", lambda: None)()


def engine_checks(report: readiness.ReadinessReport) -> dict[str, readiness.Check]:
    return {c.name: c for c in report.checks if c.name.startswith("engine:")}


async def test_doctor_names_temporal_and_the_workers_serving_and_fails_when_none_is(
    env: dict[str, str], machines: Callable[..., WorkerProcess], tmp_path: Path, postgres_url: str
) -> None:
    env = {**env, "MCP_COLLAB_STORE_URL": postgres_url}  # doctor reads the leases without migrating
    settings = Settings.from_env(env)
    fresh = engine_checks(await readiness.check(settings))["engine:workers"]
    assert not fresh.ok and "not set up for this version yet" in fresh.detail, "no worker has opened the database"
    assert fresh.hint is not None and "mcp-collab worker --queue" in fresh.hint

    alpha = machines(env, "alpha", tmp_path / "alpha")
    machines(env, "beta", tmp_path / "beta")

    report = await readiness.check(settings)
    checks = engine_checks(report)
    assert checks["engine:temporal"].ok, checks["engine:temporal"]
    assert "namespace default: the namespace answers; the runs' queue" in checks["engine:temporal"].detail
    assert "2 pollers" in checks["engine:temporal"].detail, "both workers poll the runs' queue"
    workers = checks["engine:workers"]
    assert workers.ok and workers.detail.startswith("2 serving"), workers
    assert f"alpha-{tmp_path.name} on {socket.gethostname()}" in workers.detail
    assert str(tmp_path / "beta") in workers.detail, "each worker's roots are named"

    alpha.stop()  # a clean exit drops its lease
    workers = engine_checks(await readiness.check(settings))["engine:workers"]
    assert workers.ok and workers.detail.startswith("1 serving") and "alpha" not in workers.detail


async def test_doctor_says_no_worker_is_serving_and_how_to_start_one(env: dict[str, str]) -> None:
    report = await readiness.check(Settings.from_env(env))
    workers = engine_checks(report)["engine:workers"]
    assert not workers.ok and workers.required and not report.ok
    assert "no worker is serving" in workers.detail
    assert workers.hint is not None and "mcp-collab worker --queue" in workers.hint
    assert engine_checks(report)["engine:temporal"].ok


async def test_doctor_says_when_temporal_does_not_answer_and_how_to_fix_it(
    env: dict[str, str], temporal: TemporalDev, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = f"127.0.0.1:{free_port()}"
    refused = engine_checks(await readiness.check(Settings.from_env({**env, "MCP_COLLAB_TEMPORAL_ADDRESS": closed})))
    check = refused["engine:temporal"]
    assert not check.ok and check.required
    assert f"cannot reach Temporal at {closed}" in check.detail and "refused" in check.detail.lower()
    assert check.hint is not None and "temporal server start-dev" in check.hint
    assert "MCP_COLLAB_TEMPORAL_ADDRESS" in check.hint

    missing = Settings.from_env({**env, "MCP_COLLAB_TEMPORAL_NAMESPACE": "no-such-team"})
    check = engine_checks(await readiness.check(missing))["engine:temporal"]
    assert not check.ok and "has no namespace no-such-team" in check.detail
    assert check.hint is not None and "namespace create --namespace no-such-team" in check.hint

    tls = Settings.from_env({**env, "MCP_COLLAB_TEMPORAL_API_KEY": "a-cloud-api-key-0123456789"})
    check = engine_checks(await readiness.check(tls))["engine:temporal"]
    assert not check.ok and "TLS handshake failed" in check.detail, check
    assert "a-cloud-api-key" not in check.model_dump_json()

    # A port that accepts and never answers: the check gives up on its own, and says so.
    monkeypatch.setattr(temporal_client, "PROBE_TIMEOUT_S", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        mute = f"127.0.0.1:{silent.getsockname()[1]}"
        with anyio.fail_after(30):
            report = await readiness.check(Settings.from_env({**env, "MCP_COLLAB_TEMPORAL_ADDRESS": mute}))
    check = engine_checks(report)["engine:temporal"]
    assert not check.ok and check.detail.startswith(f"no answer within 0.5s from Temporal at {mute}")


async def test_doctor_finds_a_temporal_whose_own_services_cannot_reach_each_other(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The dev server bound to an address other than 127.0.0.1 answers at its front door, but its
    services dial each other on 127.0.0.1: a run could not start there. Its namespace looks fine."""
    broken = TemporalDev(tmp_path / "broken", ip="127.0.0.2").start()
    try:
        report = await readiness.check(Settings.from_env({**env, "MCP_COLLAB_TEMPORAL_ADDRESS": broken.address}))
    finally:
        broken.kill()
    check = engine_checks(report)["engine:temporal"]
    assert not check.ok and "answers, but cannot serve the runs' queue" in check.detail, check
    assert check.hint is not None and "--ip" in check.hint


async def test_the_local_engine_reports_no_engine_checks(base_env: dict[str, str]) -> None:
    report = await readiness.check(Settings.from_env({**base_env, **quick_vendor_clis()}))
    assert engine_checks(report) == {}
    assert {c.name for c in report.checks} >= {"store"}


async def test_the_deployment_recipe_end_to_end(
    env: dict[str, str], machines: Callable[..., WorkerProcess], tmp_path: Path, postgres_url: str
) -> None:
    """README, "Deploying on several machines", in one test: PostgreSQL, Temporal, two workers with
    their own queues and roots, `mcp-collab serve --transport http` with a bearer token, and an MCP
    client over HTTP whose dispatches land on the worker that has each directory."""
    env = {**env, "MCP_COLLAB_STORE_URL": postgres_url}
    for name in ("alpha", "beta"):
        (tmp_path / name / "service").mkdir(parents=True)
        machines(env, name, tmp_path / name, CODEX_FAKE_SAY=f"done on {name}")
    token = secrets.token_hex(32)
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mcp_collab", "serve", "--transport", "http", "--port", str(port)],
            env={**env, "MCP_COLLAB_HTTP_TOKEN": token}, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        await until_listening(port, server, log)
        async with httpx2.AsyncClient() as anonymous:
            refused = await anonymous.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert refused.status_code == 401, "no token, no service"
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            async with Client(streamable_http_client(url, http_client=http)) as client:
                await call(client, "spawn_worker", name="coder", model="codex_cli")
                checks = {c["name"]: c for c in (await call(client, "check_runtimes"))["checks"]}
                assert checks["engine:workers"]["ok"] and checks["engine:workers"]["detail"].startswith("2 serving")
                runs = {}
                for name in ("beta", "alpha"):
                    where = str(tmp_path / name / "service")
                    runs[name] = await call(
                        client, "dispatch_task", task="fix it", workingDirectory=where, waitSeconds=40
                    )
        for name, run in runs.items():
            assert run["status"] == "completed" and run["result"] == f"done on {name}", run
    finally:
        server.terminate()
        server.wait(timeout=30)
    said = log.read_text(encoding="utf-8", errors="replace")
    # A clean stop (uvicorn, once shut down, re-raises the SIGTERM it caught); the Temporal client's
    # threads do not meet the interpreter's exit.
    stopped = "Application shutdown complete" in said and "Fatal Python error" not in said
    assert stopped and server.returncode in (0, -signal.SIGTERM), f"{server.returncode}\n{said[-2000:]}"
    listed = subprocess.run(
        [sys.executable, "-m", "mcp_collab", "runs"], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert all(run["id"] in listed for run in runs.values()), listed
    assert token not in said, "the token is never logged"


async def test_a_step_routed_to_a_worker_that_died_before_taking_it_ends_the_run_once_its_lease_lapses(
    env: dict[str, str], machines: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    env = {**env, "MCP_COLLAB_LEASE_TTL_S": "2"}
    gone = machines(env, "alpha", tmp_path / "alpha")
    machines(env, "beta", tmp_path / "beta")  # hosts the run's workflow
    gone.kill()  # its lease is still live: the dispatch is routed to it
    orchestrator = await server(env)
    async with orchestrator, orchestrator.running():
        run = await orchestrator.start(DispatchRequest(task="x", working_directory=str(tmp_path / "alpha")))
        ended = await orchestrator.wait(run.id, 60)
    assert ended.status == "interrupted", ended
    assert "no worker serves task queue" in (ended.error or ""), ended.error
    assert all(step.status != "running" for step in ended.steps)


async def test_doctor_on_a_temporal_server_does_not_fail_for_clis_only_the_workers_need(
    env: dict[str, str], tmp_path: Path
) -> None:
    missing = {f"MCP_COLLAB_{name}_BIN": str(tmp_path / "nowhere" / name) for name in ("CODEX", "GEMINI", "CLAUDE")}
    report = await readiness.check(Settings.from_env({**env, **missing}))
    clis = [c for c in report.checks if c.name.startswith("cli:")]
    assert len(clis) == 3 and all(not c.ok and not c.required for c in clis), clis
    assert all("mcp-collab doctor` on each worker's machine" in (c.hint or "") for c in clis)
    local = await readiness.check(Settings.from_env({**env, **missing, "MCP_COLLAB_ENGINE": "local"}))
    assert all(c.required for c in local.checks if c.name.startswith("cli:")), "the local engine runs them itself"


async def test_dispatches_to_a_queue_whose_runs_already_wait_beyond_its_slots_are_refused_on_every_server(
    env: dict[str, str], machines: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """MCP_COLLAB_MAX_QUEUED_RUNS on Temporal: runs open on a worker queue beyond its workers' slots
    wait for one, and once that many wait, a dispatch there is refused, by whichever server it
    reaches (the count is the store's); a run that ends makes room again."""
    env = {**env, "MCP_COLLAB_MAX_QUEUED_RUNS": "2"}
    machines(env, "alpha", tmp_path / "alpha", slots=1, MCP_COLLAB_CODEX_BIN=fake_cli("hang"))
    where = str(tmp_path / "alpha")
    first, second = await server(env), await server(env)
    async with first, first.running(), second, second.running():
        # Six at once: one run takes the slot, two wait for it, the other three are refused.
        runs: list[Run] = []
        refusals: list[str] = []

        async def dispatch(i: int) -> None:
            try:
                runs.append(await first.start(DispatchRequest(task=f"hold {i}", working_directory=where)))
            except InvalidRequestError as exc:
                refusals.append(str(exc))

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(dispatch, i)
        assert (len(runs), len(refusals)) == (3, 3), refusals
        queue = f"alpha-{tmp_path.name}"
        with pytest.raises(InvalidRequestError) as refused:
            await second.start(DispatchRequest(task="one too many", working_directory=where))
        said = str(refused.value)
        assert f"2 runs already wait for a free slot on worker queue {queue} (3 runs are open there" in said
        assert "its live workers have 1 slot)" in said and "the limit is 2 (MCP_COLLAB_MAX_QUEUED_RUNS" in said
        assert "cancel them" in said and "--slots" in said, "it says what to do"
        assert len((await second.list_runs()).runs) == 3, "the refused dispatch stored nothing"

        ended, _ = await first.cancel(runs[0].id)
        assert ended.status == "cancelled"
        runs.append(await second.start(DispatchRequest(task="room again", working_directory=where)))
        with pytest.raises(InvalidRequestError, match="2 runs already wait for a free slot"):
            await first.continue_run(runs[0].id, "and a follow-up")  # the queue is full again
        for run in runs[1:]:
            await first.cancel(run.id)


async def test_a_run_whose_workflow_fails_on_its_workers_ends_failed_saying_why(
    env: dict[str, str],
    machines: Callable[..., WorkerProcess],
    serving: WorkerOrchestrator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server newer than its workers dispatches a strategy they do not know: the run's workflow
    fails there at once (not retried forever while the run shows queued and nobody is told), and
    the next read of the run records it failed, saying why. Server and workers go on serving."""
    machines(env, "alpha", tmp_path / "alpha", CODEX_FAKE_SAY="still serving")
    where = str(tmp_path / "alpha")
    known = STRATEGIES["single_worker"]
    monkeypatch.setitem(STRATEGIES, "from_a_newer_version", dataclasses.replace(known, name="from_a_newer_version"))
    run = await serving.start(DispatchRequest(task="new", strategy="from_a_newer_version", working_directory=where))
    failed = await until(serving, run.id, lambda r: r.status == "failed")  # get_worker_run's read
    said = (
        f"failed: its Temporal workflow {run.id} failed: InvalidRequestError: unknown strategy 'from_a_newer_version'"
    )
    assert (failed.error or "").startswith(said), failed.error
    assert failed.ended_at is not None and not failed.steps
    waited = await serving.wait(run.id, 30)  # wait_worker_run's
    assert (waited.status, waited.error) == ("failed", failed.error)

    after = await serving.dispatch(DispatchRequest(task="known", working_directory=where))
    assert after.status == "completed" and after.result == "still serving"
