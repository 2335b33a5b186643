"""Strategies as programs: review loops, parallel consensus, the shape of a run at a glance."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from mcp_collab.config import Settings
from mcp_collab.errors import InvalidRequestError, NoFittingWorkerError
from mcp_collab.models import DispatchRequest, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.runtimes.base import RuntimeResult, StepRequest
from mcp_collab.server import build_server
from tests.support.mcp_helpers import call

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


class Runtime:
    """A cli runtime whose answer is decided per request by ``answer`` (sync or async)."""

    mode = "cli"

    def __init__(self, answer: Callable[[StepRequest], Any]) -> None:
        self.answer = answer
        self.requests: list[StepRequest] = []

    async def aclose(self) -> None:  # the WorkerRuntime seam: nothing held
        return None

    async def run(self, request: StepRequest) -> RuntimeResult:
        self.requests.append(request)
        text = self.answer(request)
        if hasattr(text, "__await__"):
            text = await text
        if isinstance(text, Exception):
            raise text
        return RuntimeResult(text=text, exit_code=0)


async def orchestrator_with(settings: Settings, runtime: Runtime, *workers: tuple[str, str]) -> WorkerOrchestrator:
    orch = WorkerOrchestrator(settings, runtimes={"cli": runtime})  # type: ignore[dict-item]
    for name, model in workers:
        await orch.register_worker(WorkerSpec(name=name, model=model))  # type: ignore[arg-type]
    return orch


async def test_a_review_loop_revises_until_the_reviewer_approves(make_settings: Callable[..., Settings]) -> None:
    reviews = iter(["line 3 is wrong\nVERDICT: REQUEST_CHANGES", "good now\nVERDICT: APPROVE"])

    def answer(req: StepRequest) -> str:
        return next(reviews) if "You are the reviewer" in req.prompt else f"edited ({len(runtime.requests)})"

    runtime = Runtime(answer)
    orch = await orchestrator_with(make_settings(), runtime, ("cw", "codex_cli"), ("gr", "gemini_cli"))

    run = await orch.dispatch(DispatchRequest(task="fix parse()", strategy="review_loop"))

    assert run.status == "completed" and run.verdict == "approve"
    assert [(s.round, s.role, s.worker_name, s.verdict) for s in run.steps] == [
        (1, "writer", "cw", None), (1, "reviewer", "gr", "request_changes"),
        (2, "writer", "cw", None), (2, "reviewer", "gr", "approve"),
    ]  # fmt: skip
    revise = runtime.requests[2].prompt
    assert "line 3 is wrong" in revise and "revising your own work" in revise, "the writer revises with the review"
    assert run.result == "good now\nVERDICT: APPROVE"
    assert (await orch.get_run(run.id)).steps == run.steps, "every round is in the history"


async def test_a_review_loop_stops_at_max_rounds_with_the_last_verdict(make_settings: Callable[..., Settings]) -> None:
    runtime = Runtime(lambda r: "no\nVERDICT: REQUEST_CHANGES" if "You are the reviewer" in r.prompt else "edit")
    orch = await orchestrator_with(make_settings(), runtime, ("cw", "codex_cli"), ("gr", "gemini_cli"))
    run = await orch.dispatch(DispatchRequest(task="t", strategy="review_loop", max_rounds=2))
    assert [s.round for s in run.steps] == [1, 1, 2, 2]
    assert run.status == "completed" and run.verdict == "request_changes"


async def test_max_rounds_belongs_to_looping_strategies(make_settings: Callable[..., Settings]) -> None:
    orch = await orchestrator_with(make_settings(), Runtime(lambda r: "x"), ("cw", "codex_cli"))
    with pytest.raises(InvalidRequestError, match="maxRounds applies to review_loop, not to 'single_worker'"):
        await orch.dispatch(DispatchRequest(task="t", max_rounds=2))


async def test_consensus_answers_run_at_once_and_the_synthesis_sees_each(
    make_settings: Callable[..., Settings],
) -> None:
    started = 0
    everyone_started = anyio.Event()

    async def answer(req: StepRequest) -> str:
        nonlocal started
        if "You are the synthesizer" in req.prompt:
            return "agree on X; disagree on Y"
        started += 1
        if started == 3:
            everyone_started.set()
        await everyone_started.wait()  # would never return if the answers ran one after another
        return f"answer of {req.worker.name}"

    runtime = Runtime(answer)
    orch = await orchestrator_with(
        make_settings(), runtime, ("a", "codex_cli"), ("b", "gemini_cli"), ("c", "claude_cli"), ("s", "claude_cli")
    )
    with anyio.fail_after(10):
        run = await orch.dispatch(
            DispatchRequest(task="which queue?", strategy="parallel_consensus", workers=["a", "b", "c", "s"])
        )

    assert run.status == "completed" and run.result == "agree on X; disagree on Y"
    assert [(s.role, s.worker_name, s.branch) for s in run.steps] == [
        ("answerer", "a", "1:a"), ("answerer", "b", "2:b"), ("answerer", "c", "3:c"), ("synthesizer", "s", None),
    ]  # fmt: skip
    synthesis = runtime.requests[-1].prompt
    assert all(f"answer of {w}" in synthesis for w in "abc")


async def test_a_failed_answer_is_recorded_and_the_synthesis_goes_on_with_two(
    make_settings: Callable[..., Settings],
) -> None:
    from mcp_collab.errors import RuntimeFatal

    def answer(req: StepRequest) -> Any:
        if req.worker.name == "b":
            return RuntimeFatal("the gemini CLI failed (exit code 41)", code="exit_code")
        return "synth" if "synthesizer" in req.prompt else f"answer {req.worker.name}"

    orch = await orchestrator_with(
        make_settings(),
        Runtime(answer),
        ("a", "codex_cli"),
        ("b", "gemini_cli"),
        ("c", "claude_cli"),
        ("s", "claude_cli"),
    )
    run = await orch.dispatch(DispatchRequest(task="q", strategy="parallel_consensus", workers=["a", "b", "c", "s"]))
    assert run.status == "completed"
    assert [(s.worker_name, s.status) for s in run.steps] == [
        ("a", "completed"), ("b", "failed"), ("c", "completed"), ("s", "completed"),
    ]  # fmt: skip
    assert "exit code 41" in (run.steps[1].error or ""), "the failed branch says why"

    two_fail = await orchestrator_with(
        make_settings(MCP_COLLAB_STATE_DIR=str(Path(make_settings().state_dir) / "2")),
        Runtime(lambda r: RuntimeFatal("down", code="x") if r.worker.name != "a" else "only a"),
        ("a", "codex_cli"), ("b", "gemini_cli"), ("c", "claude_cli"),
    )  # fmt: skip
    failed = await two_fail.dispatch(DispatchRequest(task="q", strategy="parallel_consensus"))
    assert failed.status == "failed"
    assert "only 1 of 3 answers came back (a consensus needs 2)" in (failed.error or "")
    assert "synthesizer" not in [s.role for s in failed.steps]


async def test_consensus_refuses_when_fewer_than_two_workers_fit(make_settings: Callable[..., Settings]) -> None:
    orch = await orchestrator_with(make_settings(), Runtime(lambda r: "x"), ("a", "codex_cli"))
    with pytest.raises(NoFittingWorkerError, match=r"answerer role of 'parallel_consensus' \(needs 2 to 5 answerer"):
        await orch.dispatch(DispatchRequest(task="q", strategy="parallel_consensus"))


async def test_cancel_stops_every_branch(make_settings: Callable[..., Settings]) -> None:
    started = 0
    all_running = anyio.Event()

    async def answer(req: StepRequest) -> str:
        nonlocal started
        started += 1
        if started == 3:
            all_running.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    orch = await orchestrator_with(
        make_settings(), Runtime(answer), ("a", "codex_cli"), ("b", "gemini_cli"), ("c", "claude_cli")
    )
    async with orch.running():
        run = await orch.start(DispatchRequest(task="q", strategy="parallel_consensus"))
        with anyio.fail_after(10):
            await all_running.wait()
            cancelled, did = await orch.cancel(run.id)
    assert did and cancelled.status == "cancelled"
    assert [s.status for s in cancelled.steps] == ["cancelled"] * 3


async def test_the_list_shows_the_shape_of_each_run(make_settings: Callable[..., Settings]) -> None:
    def answer(req: StepRequest) -> str:
        if "You are the reviewer" in req.prompt:
            return "VERDICT: APPROVE" if "revising" in runtime.requests[-2].prompt else "VERDICT: REQUEST_CHANGES"
        return "synth" if "synthesizer" in req.prompt else "done"

    runtime = Runtime(answer)
    settings = make_settings()
    async with Client(build_server(settings, {"cli": runtime})) as client:  # type: ignore[dict-item]
        for name, model in (("cw", "codex_cli"), ("gr", "gemini_cli")):
            await call(client, "spawn_worker", name=name, model=model)
        await call(client, "dispatch_task", task="t", strategy="review_loop")
        await call(client, "dispatch_task", task="q", strategy="parallel_consensus")
        runs = (await call(client, "list_worker_runs"))["runs"]
    assert runs[0]["shape"] == (
        "{answerer cw[cli] completed, answerer gr[cli] completed} -> synthesizer cw[cli] completed"
    )
    assert runs[1]["shape"] == (
        "round 1: writer cw[cli] completed -> reviewer gr[cli] completed (request_changes)"
        " | round 2: writer cw[cli] completed -> reviewer gr[cli] completed (approve)"
    )
    assert [s["round"] for s in runs[1]["steps"]] == [1, 1, 2, 2]
