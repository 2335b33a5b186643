"""Strategies: deterministic worker choice, prompts that carry the work forward, verdicts, the writer's diff."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from mcp_collab.config import Settings
from mcp_collab.errors import InvalidRequestError
from mcp_collab.models import DispatchRequest, Worker, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.runtimes.base import StepRequest
from mcp_collab.strategies import STRATEGIES, assign_workers, parse_verdict
from mcp_collab.testing import Reply, ScriptedRuntime


@pytest.mark.parametrize(
    ("text", "verdict", "findings"),
    [
        ("Looks good.\nVERDICT: APPROVE", "approve", []),
        ("**Verdict:** request changes\nmissing tests", "request_changes", []),
        ("VERDICT: APPROVE\n...on second thought\nVERDICT: REQUEST_CHANGES", "request_changes", []),
        (
            "FINDING: high: SQL injection in /login\n- finding: low: verbose errors\nVERDICT: FAIL",
            "fail",
            ["high: SQL injection in /login", "low: verbose errors"],
        ),
        ("nothing exploitable\n`VERDICT: PASS`", "pass", []),
        ("I think it is fine", "unknown", []),
    ],
)
def test_verdicts_and_findings_are_read_from_the_judges_output(text: str, verdict: str, findings: list[str]) -> None:
    assert parse_verdict(text) == (verdict, findings)


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
    with pytest.raises(InvalidRequestError, match="has 1 role"):
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
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True)
    assert "?? test_parse.py" in status.stdout, "the user's index was not touched"


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
