"""Conversations that continue: a follow-up to a finished run, linked to it, in the same place."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from mcp import Client

from mcp_collab.config import Settings
from mcp_collab.errors import InvalidRequestError, UnknownWorkerError
from mcp_collab.models import DispatchRequest, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.runtimes.base import RuntimeResult, StepRequest
from mcp_collab.server import build_server
from tests.support.git_repo import init_repo
from tests.support.mcp_helpers import call

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


class Recorder:
    """A cli runtime that edits ``notes.txt`` and, when asked to resume a session it knows, does."""

    mode = "cli"

    def __init__(self, *, resumes: bool) -> None:
        self.resumes = resumes
        self.requests: list[StepRequest] = []

    async def aclose(self) -> None:  # the WorkerRuntime seam: nothing held
        return None

    async def run(self, request: StepRequest) -> RuntimeResult:
        self.requests.append(request)
        if request.working_directory is not None and request.access != "read_only":
            with open(request.working_directory / "notes.txt", "a", encoding="utf-8") as fh:
                fh.write(f"turn {len(self.requests)}\n")
        resumed = self.resumes and request.resume is not None and request.resume.session_id == "sess-1"
        return RuntimeResult(text=f"answer {len(self.requests)}", session_id="sess-1", exit_code=0, resumed=resumed)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return init_repo(tmp_path / "repo", {"a.txt": "a\n"})


async def test_a_follow_up_resumes_the_session_in_the_same_worktree_and_links_its_parent(
    make_settings: Callable[..., Settings], repo: Path
) -> None:
    runtime = Recorder(resumes=True)
    orch = WorkerOrchestrator(make_settings(), runtimes={"cli": runtime})  # type: ignore[dict-item]
    await orch.register_worker(WorkerSpec(name="w", model="codex_cli"))
    async with orch.running():
        first = await orch.dispatch(DispatchRequest(task="write notes", working_directory=str(repo)))
        follow = await orch.wait((await orch.continue_run(first.id, "add one more line")).id, None)

    assert follow.status == "completed" and follow.parent_id == first.id and follow.strategy == "continue"
    [step] = follow.steps
    assert step.continuation == "session" and step.worker_name == "w"
    request = runtime.requests[-1]
    assert request.resume is not None and request.resume.message == "add one more line"
    assert "write notes" in request.prompt and "answer 1" in request.prompt, "the history rides along"
    assert request.working_directory == runtime.requests[0].working_directory, "the same worktree"
    assert follow.worktrees[0].branch == first.worktrees[0].branch
    assert "+turn 2" in follow.worktrees[0].diff and "+turn 1" in follow.worktrees[0].diff
    applied = await orch.apply(follow.id)
    assert applied.applied and (repo / "notes.txt").read_text() == "turn 1\nturn 2\n"


async def test_a_runtime_that_cannot_resume_continues_from_the_recorded_history(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    runtime = Recorder(resumes=False)
    orch = WorkerOrchestrator(make_settings(), runtimes={"cli": runtime})  # type: ignore[dict-item]
    await orch.register_worker(WorkerSpec(name="w", model="codex_cli"))
    async with orch.running():
        first = await orch.dispatch(DispatchRequest(task="explain x", working_directory=str(tmp_path)))
        follow = await orch.wait((await orch.continue_run(first.id, "and y?")).id, None)
    assert follow.steps[0].continuation == "history"
    assert "<follow_up>\nand y?\n</follow_up>" in runtime.requests[-1].prompt


async def test_a_follow_up_works_after_a_restart_and_refusals_name_what_fits(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()
    first_server = WorkerOrchestrator(settings, runtimes={"cli": Recorder(resumes=True)})  # type: ignore[dict-item]
    await first_server.register_worker(WorkerSpec(name="w", model="codex_cli"))
    first = await first_server.dispatch(DispatchRequest(task="t", working_directory=str(tmp_path)))

    runtime = Recorder(resumes=True)
    second_server = WorkerOrchestrator(settings, runtimes={"cli": runtime})  # type: ignore[dict-item]
    async with second_server.running():
        follow = await second_server.wait((await second_server.continue_run(first.id, "more")).id, None)
        assert follow.steps[0].continuation == "session" and runtime.requests[0].resume is not None
        with pytest.raises(InvalidRequestError, match=r"worker 'x' took no step in run .*; its workers: w"):
            await second_server.continue_run(first.id, "more", worker="x")
        with pytest.raises(InvalidRequestError, match="message must not be blank"):
            await second_server.continue_run(first.id, "  ")
        await second_server.remove_worker("w")
        with pytest.raises(UnknownWorkerError, match=r"worker 'w' of run .* is no longer registered"):
            await second_server.continue_run(first.id, "more")
    with pytest.raises(InvalidRequestError, match="unknown strategy 'continue'"):
        await second_server.dispatch(DispatchRequest(task="t", strategy="continue"))


async def test_continue_through_mcp(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    async with Client(build_server(make_settings(), {"cli": Recorder(resumes=True)})) as client:  # type: ignore[dict-item]
        await call(client, "spawn_worker", name="w", model="codex_cli")
        first = await call(client, "dispatch_task", task="t", workingDirectory=str(tmp_path))
        follow = await call(client, "continue_worker_run", runId=first["id"], message="again")
        assert follow["parentId"] == first["id"] and follow["status"] == "completed"
        listed = (await call(client, "list_worker_runs", strategy="continue"))["runs"]
        assert [r["id"] for r in listed] == [follow["id"]]


def test_runs_continue_from_the_terminal(base_env: dict[str, str], tmp_path: Path) -> None:
    from tests.conftest import fake_cli
    from tests.test_cli import mc

    env = {**base_env, "MCP_COLLAB_CODEX_BIN": fake_cli("echo"), "CODEX_FAKE_TEXT": "done"}
    assert mc(env, "workers", "add", "w", "--model", "codex_cli").returncode == 0
    first = mc(env, "dispatch", "t", "--working-directory", str(tmp_path), "--json")
    assert first.returncode == 0, first.stderr
    import json

    run_id = json.loads(first.stdout)["id"]
    follow = mc(env, "runs", "continue", run_id, "and more", "--json")
    assert follow.returncode == 0, follow.stderr
    assert json.loads(follow.stdout)["parentId"] == run_id
    refused = mc(env, "runs", "continue", run_id)
    assert refused.returncode == 2 and "needs a run id and a message" in refused.stderr
