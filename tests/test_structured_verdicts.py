"""Judging steps ask for their verdict (findings, a judge's choice) as a schema-shaped answer where
the runtime can give one, read it from their text where it cannot, and record which: the real SDK
clients and the real codex, claude and gemini CLIs against the loopback stub."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp_collab.config import Settings
from mcp_collab.models import DispatchRequest, Run, RuntimeMode, WorkerModel, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator, default_runtimes
from mcp_collab.runtimes.base import RuntimeResult, StepRequest
from mcp_collab.testing import Reply, ScriptedRuntime
from tests.support.cli_homes import user_env
from tests.support.vendor_stub import StubReply, StubRequest, VendorStub

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

RUN_TIMEOUT_S = 150


def git(repo: Path, *args: str) -> str:
    env = ["-c", "user.email=t@t", "-c", "user.name=t"]
    return subprocess.run(["git", *env, *args], cwd=repo, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "app.py").write_text("def main():\n    return 1\n", encoding="utf-8")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "init")
    return repo


class Writer:
    """The writers' cli runtime: each writes a file of its own in the directory it was given, so
    best_of_n has diffs to judge. Writing steps are never asked for a schema-shaped answer."""

    mode = "cli"

    def __init__(self) -> None:
        self.requests: list[StepRequest] = []

    async def aclose(self) -> None:
        return None

    async def run(self, request: StepRequest) -> RuntimeResult:
        self.requests.append(request)
        assert request.working_directory is not None
        (request.working_directory / f"{request.worker.name}.txt").write_text("work\n", encoding="utf-8")
        return RuntimeResult(text=f"{request.worker.name} wrote its file", exit_code=0)


@dataclass(frozen=True)
class Sdk:
    mode: RuntimeMode
    model: WorkerModel
    api: str  # the stub's name for the vendor API
    env: tuple[tuple[str, str], ...] = ()


SDKS = [
    pytest.param(Sdk("openai_sdk", "codex_cli", "openai"), id="openai-responses"),
    pytest.param(Sdk("openai_sdk", "codex_cli", "openai", (("MCP_COLLAB_OPENAI_WIRE_API", "chat"),)), id="openai-chat"),
    pytest.param(Sdk("google_sdk", "gemini_cli", "gemini"), id="google"),
    pytest.param(Sdk("anthropic_sdk", "claude_cli", "anthropic"), id="anthropic"),
]


@dataclass(frozen=True)
class Judging:
    strategy: str
    role: str
    writers: int
    text: str  # what the judge's text says
    structured: dict[str, Any]  # what its structured answer says
    schema: dict[str, Any]  # the enums the vendor must be asked for


ROLES = [
    pytest.param(
        Judging(
            "review_loop",
            "reviewer",
            1,
            "Line 1 is wrong.\nVERDICT: REQUEST_CHANGES",
            {"reasons": "The change is right and tested.", "verdict": "approve"},
            {"verdict": ["approve", "request_changes"]},
        ),
        id="reviewer",
    ),
    pytest.param(
        Judging(
            "security_redteam_pass",
            "redteam",
            1,
            "Nothing exploitable.\nVERDICT: PASS",
            {"reasons": "The token reaches the log.", "findings": ["high: the token is logged"], "verdict": "fail"},
            {"verdict": ["pass", "fail"]},
        ),
        id="redteam",
    ),
    pytest.param(
        Judging(
            "best_of_n",
            "judge",
            2,
            "Candidate 1 is simpler.\nCHOICE: 1",
            {"reasons": "Candidate 2 names its file after its writer.", "choice": "2"},
            {"choice": ["1", "2"]},
        ),
        id="judge",
    ),
]


@pytest.fixture
async def orchestrator_for(
    base_env: dict[str, str], stub: VendorStub, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[WorkerOrchestrator]]]:
    """Orchestrators whose SDK runtimes call the stub with the real clients; closed after the test."""
    made: list[WorkerOrchestrator] = []

    async def make(
        workers: list[tuple[str, WorkerModel]], *, runtimes: dict[str, Any] | None = None, **env: str
    ) -> WorkerOrchestrator:
        settings = Settings.from_env({**base_env, **user_env(tmp_path, stub.url), **env})
        orchestrator = WorkerOrchestrator(settings, runtimes={**default_runtimes(settings), **(runtimes or {})})  # type: ignore[dict-item]
        made.append(orchestrator)
        for name, model in workers:
            await orchestrator.register_worker(WorkerSpec(name=name, model=model, sdk_model="stub-model"))
        return orchestrator

    yield make
    for orchestrator in made:
        await orchestrator.aclose()


async def dispatch(orchestrator: WorkerOrchestrator, request: DispatchRequest) -> Run:
    with anyio.fail_after(RUN_TIMEOUT_S):
        return await orchestrator.dispatch(request)


def enums(schema: dict[str, Any] | None) -> dict[str, list[str]]:
    props = (schema or {}).get("properties", {})
    return {name: prop["enum"] for name, prop in props.items() if "enum" in prop}


@pytest.mark.parametrize("sdk", SDKS)
@pytest.mark.parametrize("judging", ROLES)
async def test_a_judging_step_on_each_sdk_runtime_takes_its_verdict_from_the_structured_answer(
    sdk: Sdk,
    judging: Judging,
    stub: VendorStub,
    repo: Path,
    orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]],
) -> None:
    def model(req: StubRequest) -> StubReply:
        assert req.output_schema is not None, "only the judging step calls the vendor"
        return StubReply(text=judging.text, structured=judging.structured)

    stub.responder = model
    writer = Writer()
    writers = [f"w{i + 1}" for i in range(judging.writers)]
    orchestrator = await orchestrator_for(
        [*((w, "codex_cli") for w in writers), ("judge", sdk.model)], runtimes={"cli": writer}, **dict(sdk.env)
    )

    run = await dispatch(
        orchestrator,
        DispatchRequest(
            task="make the change",
            strategy=judging.strategy,
            workers=[*writers, "judge"],
            runtime_modes={"judge": sdk.mode},
            working_directory=str(repo),
            max_rounds=1 if judging.strategy == "review_loop" else None,
        ),
    )

    assert run.status == "completed", run.error
    [judged] = [s for s in run.steps if s.role == judging.role]
    assert (judged.runtime_mode, judged.verdict_source, judged.verdict_note) == (sdk.mode, "structured", None)
    if judging.role == "judge":
        assert (judged.choice, run.chosen) == ("2", "2"), "the structured choice, not the text's CHOICE: 1"
    else:
        assert (judged.verdict, run.verdict) == (judging.structured["verdict"],) * 2
        assert judged.findings == judging.structured.get("findings", [])
    assert judged.output.startswith(judging.structured["reasons"]), "the output reads as the structured answer"
    [asked] = stub.requests_for(sdk.api)
    assert enums(asked.output_schema) == judging.schema, "the vendor was asked for the role's answers only"
    assert all(r.output_schema is None for r in writer.requests), "writers are not asked for a verdict"


async def test_the_real_codex_cli_gives_its_verdict_through_output_schema(
    real_env: dict[str, str], stub: VendorStub, repo: Path
) -> None:
    def model(req: StubRequest) -> StubReply:
        if req.output_schema is None:
            return StubReply(text="Renamed the function.")
        return StubReply(text="VERDICT: REQUEST_CHANGES", structured={"reasons": "Clean rename.", "verdict": "approve"})

    stub.responder = model
    orchestrator = WorkerOrchestrator(Settings.from_env(real_env))
    try:
        for name in ("codex-a", "codex-b"):
            await orchestrator.register_worker(WorkerSpec(name=name, model="codex_cli", cli_model="gpt-5.5"))
        run = await dispatch(
            orchestrator,
            DispatchRequest(
                task="rename main", strategy="review_loop", workers=["codex-a", "codex-b"], working_directory=str(repo)
            ),
        )
    finally:
        await orchestrator.aclose()

    assert run.status == "completed", run.error
    assert [(s.role, s.runtime_mode, s.verdict, s.verdict_source) for s in run.steps] == [
        ("writer", "cli", None, None),
        ("reviewer", "cli", "approve", "structured"),
    ], "one round: the structured approval ends the loop"
    assert run.steps[1].output == "Clean rename.\n\nVERDICT: APPROVE", "codex's JSON final message, as text"
    writer_call, reviewer_call = stub.requests_for("openai")
    assert writer_call.output_schema is None
    assert reviewer_call.output_schema is not None and reviewer_call.body["text"]["format"]["strict"] is True
    assert enums(reviewer_call.output_schema) == {"verdict": ["approve", "request_changes"]}


async def test_the_real_claude_cli_gives_its_findings_through_json_schema_even_when_its_text_says_otherwise(
    real_env: dict[str, str], stub: VendorStub
) -> None:
    def model(req: StubRequest) -> StubReply:
        if req.output_schema is None:
            return StubReply(text="Wrote the login handler.")
        # The model says PASS in its text, then gives FAIL through claude's StructuredOutput tool.
        answer = {"reasons": "Passwords are compared in plain text.", "findings": ["high: plain"], "verdict": "fail"}
        return StubReply(text="VERDICT: PASS", structured=answer)

    stub.responder = model
    orchestrator = WorkerOrchestrator(Settings.from_env(real_env))
    try:
        for name in ("claude-a", "claude-b"):
            await orchestrator.register_worker(WorkerSpec(name=name, model="claude_cli", cli_model="claude-sonnet-4-5"))
        run = await dispatch(
            orchestrator,
            DispatchRequest(
                task="write a login handler", strategy="security_redteam_pass", workers=["claude-a", "claude-b"]
            ),
        )
    finally:
        await orchestrator.aclose()

    assert run.status == "completed", run.error
    redteam = run.steps[1]
    assert (redteam.verdict, redteam.findings, redteam.verdict_source) == ("fail", ["high: plain"], "structured")
    assert (run.verdict, run.findings) == ("fail", ["high: plain"])
    assert [r.output_tool for r in stub.requests_for("anthropic") if r.output_schema] == ["StructuredOutput"]


async def test_the_real_gemini_cli_has_no_structured_output_so_its_verdict_is_read_from_its_text(
    real_env: dict[str, str], stub: VendorStub
) -> None:
    stub.responder = lambda req: StubReply(
        text="Missing a test.\nVERDICT: REQUEST_CHANGES" if "You are the reviewer" in req.prompt else "Done."
    )
    orchestrator = WorkerOrchestrator(Settings.from_env(real_env))
    try:
        for name in ("gemini-a", "gemini-b"):
            await orchestrator.register_worker(WorkerSpec(name=name, model="gemini_cli", cli_model="gemini-2.5-flash"))
        run = await dispatch(
            orchestrator,
            DispatchRequest(task="add a flag", strategy="review_loop", workers=["gemini-a", "gemini-b"], max_rounds=1),
        )
    finally:
        await orchestrator.aclose()

    assert run.status == "completed", run.error
    review = run.steps[1]
    assert (review.verdict, review.verdict_source, review.verdict_note) == ("request_changes", "text", None)
    assert all(r.output_schema is None for r in stub.requests_for("gemini")), "gemini was never asked for a schema"


async def test_a_runtime_that_ignores_the_schema_has_its_verdict_and_choice_read_from_the_text(
    make_settings: Callable[..., Settings], repo: Path
) -> None:
    def answer(req: StepRequest) -> Reply:
        if req.output_schema is None:
            (req.working_directory or repo).joinpath(f"{req.worker.name}.txt").write_text("x\n", encoding="utf-8")
            return Reply("wrote")
        return Reply("Both fine; 1 is shorter.\nCHOICE: 1")

    scripted = ScriptedRuntime("cli", respond=answer)
    orchestrator = WorkerOrchestrator(make_settings(), runtimes={"cli": scripted})
    for name in ("a", "b", "judge"):
        await orchestrator.register_worker(WorkerSpec(name=name, model="codex_cli"))
    run = await dispatch(
        orchestrator,
        DispatchRequest(task="t", strategy="best_of_n", workers=["a", "b", "judge"], working_directory=str(repo)),
    )

    assert run.status == "completed", run.error
    judge = run.steps[-1]
    assert (judge.choice, judge.verdict_source, judge.verdict_note, run.chosen) == ("1", "text", None, "1")
    assert enums(scripted.requests[-1].output_schema) == {"choice": ["1", "2"]}, "it was asked, and ignored it"


async def test_a_structured_answer_outside_the_schema_falls_back_to_the_text_and_says_why(
    stub: VendorStub, repo: Path, orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]]
) -> None:
    stub.responder = lambda req: StubReply(
        text="Needs a test.\nVERDICT: REQUEST_CHANGES", structured={"reasons": "Fine.", "verdict": "maybe"}
    )
    orchestrator = await orchestrator_for([("w", "codex_cli"), ("judge", "claude_cli")], runtimes={"cli": Writer()})

    run = await dispatch(
        orchestrator,
        DispatchRequest(
            task="t",
            strategy="review_loop",
            workers=["w", "judge"],
            runtime_modes={"judge": "anthropic_sdk"},
            working_directory=str(repo),
            max_rounds=1,
        ),
    )

    review = run.steps[1]
    assert (review.verdict, review.verdict_source) == ("request_changes", "text")
    assert review.verdict_note is not None
    assert "does not match the schema" in review.verdict_note and "verdict" in review.verdict_note
    assert "'maybe'" not in review.verdict_note, "the note names the rule broken, not what the model wrote"


async def test_an_endpoint_that_refuses_the_schema_is_asked_again_without_it_and_the_verdict_read_from_text(
    stub: VendorStub, repo: Path, orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]]
) -> None:
    def model(req: StubRequest) -> StubReply:
        if req.output_schema is not None:  # a compatible server without structured output
            return StubReply(status=400, error_message="response_format json_schema is not supported")
        return StubReply(text="Fine.\nVERDICT: APPROVE")

    stub.responder = model
    orchestrator = await orchestrator_for(
        [("w", "codex_cli"), ("judge", "codex_cli")], runtimes={"cli": Writer()}, MCP_COLLAB_OPENAI_WIRE_API="chat"
    )

    run = await dispatch(
        orchestrator,
        DispatchRequest(
            task="t",
            strategy="review_loop",
            workers=["w", "judge"],
            runtime_modes={"judge": "openai_sdk"},
            working_directory=str(repo),
        ),
    )

    assert run.status == "completed", run.error
    review = run.steps[1]
    assert (review.status, review.verdict, review.verdict_source) == ("completed", "approve", "text")
    assert review.verdict_note is not None and "refused a schema-shaped answer" in review.verdict_note
    assert [r.output_schema is not None for r in stub.requests_for("openai")] == [True, False]


@pytest.mark.anyio
async def test_a_scripted_runtime_can_give_a_structured_verdict(make_settings: Any) -> None:
    from mcp_collab.models import DispatchRequest, WorkerSpec
    from mcp_collab.orchestrator import WorkerOrchestrator
    from mcp_collab.testing import Reply, ScriptedRuntime

    def respond(req: Any) -> Reply:
        if req.output_schema is None:
            return Reply("wrote it")
        return Reply("VERDICT: REQUEST_CHANGES", structured={"reasons": "fine", "verdict": "approve"})

    orch = WorkerOrchestrator(make_settings(), runtimes={"cli": ScriptedRuntime("cli", respond=respond)})
    await orch.register_worker(WorkerSpec(name="c", model="codex_cli"))
    await orch.register_worker(WorkerSpec(name="g", model="gemini_cli"))
    run = await orch.dispatch(DispatchRequest(task="t", strategy="codex_writes_gemini_reviews"))
    assert run.verdict == "approve" and run.steps[1].verdict_source == "structured"
