"""Strategies: deterministic worker choice, prompts that carry the work forward, verdicts, the writer's diff."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from mcp_collab.config import Settings
from mcp_collab.errors import InvalidRequestError, NoFittingWorkerError, UnknownRunError
from mcp_collab.models import DispatchRequest, Verdict, Worker, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.runtimes.base import StepRequest
from mcp_collab.server import build_server
from mcp_collab.strategies import STRATEGIES, assign_workers, parse_verdict
from mcp_collab.testing import Reply, ScriptedRuntime

REVIEWER = STRATEGIES["codex_writes_gemini_reviews"].roles[1]
REDTEAM = STRATEGIES["security_redteam_pass"].roles[1]


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("Looks good.\nVERDICT: APPROVE", "approve"),
        ("**Verdict:** request changes\nmissing tests", "request_changes"),
        ("VERDICT: APPROVE\n...on second thought\nVERDICT: REQUEST_CHANGES", "request_changes"),
        ("I think it is fine", "unknown"),
        ("VERDICT: PASS", "unknown"),
        ("VERDICT: FAIL", "unknown"),
        ("VERDICT: LGTM", "unknown"),
        ("VERDICT: APPROVE\nwait, no.\nVERDICT: maybe", "unknown"),
        ("VERDICT: NOT APPROVE", "unknown"),
        ("VERDICT: APPROVED", "unknown"),
    ],
)
def test_a_reviewer_approves_or_requests_changes_and_anything_else_is_unknown(text: str, verdict: str) -> None:
    assert REVIEWER.verdicts == ("approve", "request_changes")
    assert parse_verdict(text, REVIEWER.verdicts) == (verdict, [])


@pytest.mark.parametrize(
    ("text", "verdict", "findings"),
    [
        (
            "FINDING: high: SQL injection in /login\n- finding: low: verbose errors\nVERDICT: FAIL",
            "fail",
            ["high: SQL injection in /login", "low: verbose errors"],
        ),
        ("nothing exploitable\n`VERDICT: PASS`", "pass", []),
        ("VERDICT: APPROVE", "unknown", []),
        ("VERDICT: REQUEST_CHANGES", "unknown", []),
        ("FINDING: low: chatty logs", "unknown", ["low: chatty logs"]),
    ],
)
def test_a_red_teamer_passes_or_fails_and_anything_else_is_unknown(
    text: str, verdict: str, findings: list[str]
) -> None:
    assert REDTEAM.verdicts == ("pass", "fail")
    assert parse_verdict(text, REDTEAM.verdicts) == (verdict, findings)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("said", "verdict"), [("VERDICT: PASS", "unknown"), ("VERDICT: REQUEST CHANGES", "request_changes")]
)
async def test_the_run_records_the_reviewers_verdict_only_in_the_reviewers_words(
    make_settings: Callable[..., Settings], said: str, verdict: Verdict
) -> None:
    cli = ScriptedRuntime("cli", respond=lambda r: Reply(said if "reviewer" in r.prompt else "done"))
    async with WorkerOrchestrator(make_settings(), runtimes={"cli": cli}) as orch:
        await orch.register_worker(WorkerSpec(name="c", model="codex_cli"))
        await orch.register_worker(WorkerSpec(name="g", model="gemini_cli"))
        run = await orch.dispatch(DispatchRequest(task="t", strategy="codex_writes_gemini_reviews"))
        stored = await orch.get_run(run.id)
    assert run.status == "completed" and stored.verdict == verdict and stored.steps[1].verdict == verdict


def test_worker_choice_is_deterministic_and_named_workers_come_first() -> None:
    registered = [
        Worker(name="g1", model="gemini_cli"), Worker(name="c1", model="codex_cli"),
        Worker(name="c2", model="codex_cli"), Worker(name="a1", model="claude_cli"),
    ]  # fmt: skip
    pair = STRATEGIES["codex_writes_gemini_reviews"]
    assert [w.name for w in assign_workers(pair, registered, None)] == ["c1", "g1"]
    assert [w.name for w in assign_workers(pair, registered, ["c2"])] == ["c2", "g1"]
    redteam = STRATEGIES["security_redteam_pass"]
    assert [w.name for w in assign_workers(redteam, registered, None)] == ["g1", "c1"], (
        "the red-teamer is another worker"
    )
    assert [w.name for w in assign_workers(redteam, registered, ["a1"])] == ["a1", "g1"]
    assert [w.name for w in assign_workers(redteam, [registered[0]], None)] == ["g1", "g1"], "one worker may do both"
    with pytest.raises(
        InvalidRequestError, match=r"takes at most 1 worker\(s\) \(worker: any model\) but 2 were named"
    ):
        assign_workers(STRATEGIES["single_worker"], registered, ["c1", "c2"])


@pytest.mark.anyio
async def test_the_reviewer_sees_the_diff_the_writer_left_in_a_git_repository(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / "parse.py").write_text("def parse(s):\n    return s.split()\n")
    (repo / "untouched.py").write_text("x = 1\n")
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "."], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], cwd=repo, check=True)
    (repo / "untouched.py").write_text("x = 2  # edited by the user before the run\n")

    def writer(req: StepRequest) -> Reply:
        assert req.working_directory is not None and req.access == "workspace_write"
        assert req.working_directory != repo, "the writer works in a worktree of its own"
        assert "edited by the user" in (req.working_directory / "untouched.py").read_text(), "it sees the user's edits"
        (req.working_directory / "parse.py").write_text(
            "def parse(s):\n    if not s:\n        return []\n    return s.split()\n"
        )
        (req.working_directory / "test_parse.py").write_text("def test_empty():\n    assert parse('') == []\n")
        return Reply("Handled empty input and added a test.")

    reviews: list[StepRequest] = []

    def respond(req: StepRequest) -> Reply:
        if "You are the reviewer" not in req.prompt:
            return writer(req)
        reviews.append(req)
        return Reply("Good.\nVERDICT: APPROVE")

    cli = ScriptedRuntime("cli", respond=respond)
    async with WorkerOrchestrator(make_settings(), runtimes={"cli": cli}) as orch:
        await orch.register_worker(WorkerSpec(name="c", model="codex_cli"))
        await orch.register_worker(WorkerSpec(name="g", model="gemini_cli"))
        run = await orch.dispatch(
            DispatchRequest(
                task="handle empty input", strategy="codex_writes_gemini_reviews", working_directory=str(repo)
            )
        )
    assert run.status == "completed" and run.verdict == "approve"
    [review] = reviews
    assert review.access == "read_only"
    assert "+    if not s:" in review.prompt and "test_parse.py" in review.prompt
    assert "Handled empty input and added a test." in review.prompt
    assert "edited by the user" not in review.prompt, "only what the writer changed"
    assert review.working_directory == run_worktree(run), "the reviewer reads the writer's worktree"

    def status() -> str:
        return subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout

    assert status() == " M untouched.py\n", "the user's tree, index and branches were not touched while it ran"
    [worktree] = run.worktrees
    assert worktree.branch == f"mcp-collab/{run.id}" and worktree.carried_changes
    assert "+    if not s:" in worktree.diff and "edited by the user" not in worktree.diff
    async with WorkerOrchestrator(make_settings(), runtimes={"cli": cli}) as orch:
        applied = await orch.apply(run.id)
    assert applied.applied and sorted(applied.files) == ["parse.py", "test_parse.py"]
    assert status() == " M parse.py\n M untouched.py\n?? test_parse.py\n"
    assert "edited by the user" in (repo / "untouched.py").read_text(), "the user's own change is kept"


def run_worktree(run: Any) -> Path:
    return Path(run.worktrees[0].path)


@pytest.mark.anyio
async def test_outside_a_git_repository_the_review_says_there_is_no_diff(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    cli = ScriptedRuntime("cli", respond=lambda r: Reply("VERDICT: APPROVE" if "reviewer" in r.prompt else "done"))
    async with WorkerOrchestrator(make_settings(), runtimes={"cli": cli}) as orch:
        await orch.register_worker(WorkerSpec(name="c", model="codex_cli"))
        await orch.register_worker(WorkerSpec(name="g", model="gemini_cli"))
        await orch.dispatch(
            DispatchRequest(task="t", strategy="codex_writes_gemini_reviews", working_directory=str(tmp_path))
        )
    assert "no changes in a git working tree were found" in cli.requests[1].prompt


@pytest.mark.anyio
async def test_core_refusals_name_no_tool_and_the_mcp_server_adds_its_own_hint(
    make_settings: Callable[..., Settings],
) -> None:
    cli = ScriptedRuntime("cli", respond=lambda r: Reply("done"))
    async with WorkerOrchestrator(make_settings(), runtimes={"cli": cli}) as orch:
        with pytest.raises(NoFittingWorkerError) as no_worker:
            await orch.dispatch(DispatchRequest(task="t"))
        await orch.register_worker(WorkerSpec(name="c", model="codex_cli"))
        with pytest.raises(UnknownRunError) as unknown_run:
            await orch.get_run("run-nope")
        with pytest.raises(InvalidRequestError, match="unknown strategy 'bogus'; accepted: single_worker"):
            await orch.list_runs(strategy="bogus")
    for refusal in (unknown_run.value, no_worker.value):
        assert not any(tool in str(refusal) for tool in ("list_worker_runs", "spawn_worker", "mcp-collab"))

    async with Client(build_server(make_settings(), {"cli": cli})) as client:  # type: ignore[arg-type]
        unfit = await client.call_tool("dispatch_task", {"task": "t", "strategy": "codex_writes_gemini_reviews"})
        missing = await client.call_tool("get_worker_run", {"runId": "run-nope"})
        bogus = await client.call_tool("list_worker_runs", {"strategy": "bogus"})
    assert missing.is_error and "unknown run 'run-nope'; list_worker_runs shows" in str(missing.content)
    assert unfit.is_error and "register one with spawn_worker" in str(unfit.content)
    assert bogus.is_error and "unknown strategy 'bogus'" in str(bogus.content)
    assert "codex_writes_gemini_reviews, security_redteam_pass" in str(bogus.content)
