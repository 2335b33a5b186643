"""Writers in worktrees of their own: the user's tree untouched while runs work, five runs at once on
one repository, best_of_n, and getting the work back (apply, refusals, discard, retention)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from mcp import Client

from mcp_collab.config import Settings
from mcp_collab.errors import InvalidRequestError
from mcp_collab.models import DispatchRequest, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.runtimes.base import RuntimeResult, StepRequest
from mcp_collab.server import build_server
from tests.support.git_repo import git, init_repo
from tests.support.mcp_helpers import call

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return init_repo(tmp_path / "repo", {"app.py": "def main():\n    return 1\n"})


class Writer:
    """A cli runtime: writers write ``<worker>.txt`` (or what ``edit`` says) in their directory."""

    mode = "cli"

    def __init__(self, edit: Callable[[StepRequest], str] | None = None, judge: str = "CHOICE: 2") -> None:
        self.edit = edit
        self.judge = judge
        self.requests: list[StepRequest] = []

    async def aclose(self) -> None:  # the WorkerRuntime seam: nothing held
        return None

    async def run(self, request: StepRequest) -> RuntimeResult:
        self.requests.append(request)
        if request.access == "read_only":
            return RuntimeResult(text=self.judge if "You are the judge" in request.prompt else "VERDICT: APPROVE")
        assert request.working_directory is not None
        name = self.edit(request) if self.edit else f"{request.worker.name}.txt"
        (request.working_directory / name).write_text(f"by {request.worker.name}\n")
        await anyio.lowlevel.checkpoint()
        return RuntimeResult(text=f"wrote {name}", exit_code=0)


async def registered(settings: Settings, runtime: Writer, *names: str) -> WorkerOrchestrator:
    orch = WorkerOrchestrator(settings, runtimes={"cli": runtime})  # type: ignore[dict-item]
    models = ["codex_cli", "gemini_cli", "claude_cli"]
    for i, name in enumerate(names):
        await orch.register_worker(WorkerSpec(name=name, model=models[i % 3]))  # type: ignore[arg-type]
    return orch


async def test_five_concurrent_writer_runs_each_end_with_only_their_own_change(
    make_settings: Callable[..., Settings], repo: Path
) -> None:
    settings = make_settings(MCP_COLLAB_MAX_CONCURRENT_RUNS="5")
    orch = await registered(settings, Writer(lambda r: f"{r.prompt}.txt"), "w")
    async with orch.running():
        runs = [
            await orch.start(DispatchRequest(task=f"job{i}", workers=["w"], working_directory=str(repo)))
            for i in range(5)
        ]
        with anyio.fail_after(60):
            done = [await orch.wait(r.id, None) for r in runs]
    assert git(repo, "status", "--porcelain") == "", "the user's tree was never touched"
    for i, run in enumerate(done):
        assert run.status == "completed", run.error
        [wt] = run.worktrees
        changed = git(repo, "diff", "--name-only", wt.base_commit, wt.branch).split()
        assert changed == [f"job{i}.txt"], f"run {i} has only its own change"
    assert len(git(repo, "worktree", "list").splitlines()) == 6


async def test_best_of_n_writers_work_apart_and_the_judges_choice_is_applied(
    make_settings: Callable[..., Settings], repo: Path
) -> None:
    runtime = Writer(lambda r: "solution.txt")
    orch = await registered(make_settings(), runtime, "a", "b", "c", "j")
    run = await orch.dispatch(
        DispatchRequest(task="solve", strategy="best_of_n", workers=["a", "b", "c", "j"], working_directory=str(repo))
    )
    assert run.status == "completed", run.error
    assert run.chosen == "2"
    assert [(s.role, s.worker_name, s.branch) for s in run.steps] == [
        ("writer", "a", "1"), ("writer", "b", "2"), ("writer", "c", "3"), ("judge", "j", None),
    ]  # fmt: skip
    assert {w.label for w in run.worktrees} == {"1", "2", "3"}
    directories = {r.working_directory for r in runtime.requests[:3]}
    assert len(directories) == 3, "each writer had its own worktree"
    judge = runtime.requests[3].prompt
    assert all(f'label="{label}"' in judge for label in "123") and "+by b" in judge
    assert git(repo, "status", "--porcelain") == ""

    applied = await orch.apply(run.id)

    assert applied.applied and applied.files == ("solution.txt",)
    assert (repo / "solution.txt").read_text() == "by b\n", "the chosen writer's work"
    again = await orch.get_run(run.id)
    assert [w.state for w in sorted(again.worktrees, key=lambda w: w.label or "")] == ["active", "applied", "active"]


async def test_best_of_n_is_refused_outside_a_git_repository(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    orch = await registered(make_settings(), Writer(), "a", "b", "c")
    with pytest.raises(InvalidRequestError, match="best_of_n needs a git repository"):
        await orch.dispatch(DispatchRequest(task="t", strategy="best_of_n", working_directory=str(tmp_path)))
    assert (await orch.list_runs()).runs == [], "refused before anything was stored"


async def test_apply_refuses_when_local_changes_are_in_the_way_and_touches_nothing(
    make_settings: Callable[..., Settings], repo: Path
) -> None:
    orch = await registered(make_settings(), Writer(lambda r: "app.py"), "w")
    run = await orch.dispatch(DispatchRequest(task="t", workers=["w"], working_directory=str(repo)))
    (repo / "app.py").write_text("the user's own edit\n")
    before = {p.name: p.read_bytes() for p in repo.iterdir() if p.is_file()}
    index = (repo / ".git" / "index").read_bytes()

    refused = await orch.apply(run.id)

    assert not refused.applied and refused.files == ("app.py",)
    assert "nothing was applied" in refused.message and "app.py" in refused.message
    assert {p.name: p.read_bytes() for p in repo.iterdir() if p.is_file()} == before
    assert (repo / ".git" / "index").read_bytes() == index


async def test_discard_removes_worktrees_and_branches_and_keeps_the_record(
    make_settings: Callable[..., Settings], repo: Path
) -> None:
    orch = await registered(make_settings(), Writer(), "w")
    run = await orch.dispatch(DispatchRequest(task="t", workers=["w"], working_directory=str(repo)))
    [wt] = run.worktrees
    assert Path(wt.path).is_dir()
    discarded = await orch.discard(run.id)
    assert "discarded" in discarded.message
    assert not Path(wt.path).exists()
    assert wt.branch not in git(repo, "branch", "--list", "mcp-collab/*")
    stored = await orch.get_run(run.id)
    assert stored.worktrees[0].state == "discarded" and "+by w" in stored.worktrees[0].diff, "the diff is kept"
    with pytest.raises(InvalidRequestError, match="was discarded; nothing to apply"):
        await orch.apply(run.id)


async def test_outside_git_the_run_works_in_place_and_says_so(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    orch = await registered(make_settings(), Writer(), "w")
    run = await orch.dispatch(DispatchRequest(task="t", workers=["w"], working_directory=str(plain)))
    assert (plain / "w.txt").exists() and run.worktrees == []
    assert any("in place" in n and "not inside a git repository" in n for n in run.notes)
    with pytest.raises(InvalidRequestError, match="worked in place"):
        await orch.apply(run.id)


async def test_retention_removes_the_worktrees_of_pruned_runs(
    make_settings: Callable[..., Settings], repo: Path
) -> None:
    orch = await registered(make_settings(), Writer(), "w")
    first = await orch.dispatch(DispatchRequest(task="t", workers=["w"], working_directory=str(repo)))
    second = await orch.dispatch(DispatchRequest(task="t", workers=["w"], working_directory=str(repo)))
    pruned = await orch.prune(max_runs=1)
    assert pruned == [first.id]
    assert not Path(first.worktrees[0].path).exists()
    assert Path(second.worktrees[0].path).is_dir()
    assert first.worktrees[0].branch not in git(repo, "branch", "--list", "mcp-collab/*")


async def test_apply_and_discard_through_mcp(make_settings: Callable[..., Settings], repo: Path) -> None:
    async with Client(build_server(make_settings(), {"cli": Writer()})) as client:  # type: ignore[dict-item]
        await call(client, "spawn_worker", name="w", model="codex_cli")
        run = await call(client, "dispatch_task", task="t", workingDirectory=str(repo))
        assert run["worktrees"][0]["branch"] == f"mcp-collab/{run['id']}"
        applied = await call(client, "apply_worker_run", runId=run["id"])
        assert applied["applied"] and applied["files"] == ["w.txt"]
        again = await client.call_tool("apply_worker_run", {"runId": run["id"], "branch": "9"})
        assert again.is_error and "has no branch labelled '9'" in str(again.content)
        gone = await call(client, "discard_worker_run", runId=run["id"])
        assert gone["branches"] == [f"mcp-collab/{run['id']}"] and "discarded" in gone["message"]
        stored = await call(client, "get_worker_run", runId=run["id"])
        assert stored["worktrees"][0]["state"] == "discarded"


async def test_a_long_diff_is_shortened_inline_and_read_whole_by_tool_and_resource(
    make_settings: Callable[..., Settings], repo: Path
) -> None:
    class Big(Writer):
        async def run(self, request: StepRequest) -> RuntimeResult:
            assert request.working_directory is not None
            (request.working_directory / "big.txt").write_text("".join(f"line {i}\n" for i in range(6000)))
            return RuntimeResult(text="wrote big.txt", exit_code=0)

    async with Client(build_server(make_settings(), {"cli": Big()})) as client:  # type: ignore[dict-item]
        await call(client, "spawn_worker", name="w", model="codex_cli")
        run = await call(client, "dispatch_task", task="t", workingDirectory=str(repo))
        shown = run["worktrees"][0]["diff"]
        assert f"runs://{run['id']}/worktrees/0/diff" in shown
        step_shown = run["steps"][0]["diff"]
        assert "read_run_output" in step_shown and f"runs://{run['id']}/steps/0/diff" in step_shown
        pages, offset = [], 0
        while offset is not None:
            page = await call(client, "read_run_output", runId=run["id"], step=0, diff=True, offset=offset)
            pages.append(page["text"])
            offset = page["nextOffset"]
        whole = "".join(pages)
        assert "+line 5999" in whole and whole.startswith("diff --git a/big.txt b/big.txt")
        resource = await client.read_resource(f"runs://{run['id']}/worktrees/0/diff")
        assert resource.contents[0].text == whole  # type: ignore[union-attr]
        own = await client.read_resource(f"runs://{run['id']}/steps/0/diff")
        assert own.contents[0].text == whole  # type: ignore[union-attr]  # the only step made all the change
        refused = await client.call_tool("read_run_output", {"runId": run["id"], "step": 3, "diff": True})
        assert refused.is_error and "has steps 0 to 0" in str(refused.content)
