"""The cli runtime and the strategies with the real codex, gemini and claude binaries from npm,
all talking to the loopback stub; the stub's request log shows which client made each call."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from mcp_collab.config import Settings
from mcp_collab.models import DispatchRequest, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from tests.support.vendor_stub import StubReply, StubRequest, VendorStub

pytestmark = [pytest.mark.anyio, pytest.mark.real_cli, pytest.mark.timeout(180)]

WORKERS = [
    WorkerSpec(name="codex-writer", model="codex_cli", cli_model="gpt-5.5", sdk_model="gpt-5.5"),
    WorkerSpec(name="gemini-review", model="gemini_cli", cli_model="gemini-2.5-flash", sdk_model="gemini-2.5-flash"),
    WorkerSpec(name="claude-redteam", model="claude_cli", cli_model="claude-sonnet-4-5"),
]


def verdicts(req: StubRequest) -> StubReply:
    """Writers get a summary; reviewers and red-teamers answer with a verdict line."""
    if "You are the reviewer" in req.prompt:
        return StubReply(text="Looks correct and minimal.\nVERDICT: APPROVE")
    if "security red-teamer" in req.prompt:
        return StubReply(text="FINDING: medium: no input length limit\nVERDICT: FAIL")
    return StubReply(text=f"{req.api} did: {req.last_user_text[-60:]}")


@pytest.fixture
async def orchestrator_for() -> AsyncIterator[Callable[..., Awaitable[WorkerOrchestrator]]]:
    """Builds orchestrators with the three workers registered; closes their SDK clients after the test."""
    made: list[WorkerOrchestrator] = []

    async def make(env: dict[str, str], **extra: str) -> WorkerOrchestrator:
        orchestrator = WorkerOrchestrator(Settings.from_env({**env, **extra}))
        made.append(orchestrator)
        for spec in WORKERS:
            await orchestrator.register_worker(spec)
        return orchestrator

    yield make
    for orchestrator in made:
        await orchestrator.aclose()


def clients(stub: VendorStub) -> list[str]:
    """Who called the stub's model endpoints, by user agent family."""
    found = []
    for r in stub.requests:
        if r.kind not in ("responses", "generateContent", "streamGenerateContent", "messages"):
            continue
        ua = r.user_agent.lower()
        family = (
            "openai-python" if ua.startswith("asyncopenai/python")
            else "codex" if "codex" in ua
            else "gemini-cli" if "geminicli" in ua or "gemini-cli" in ua
            else "claude-cli" if "claude-cli" in ua or "claude-code" in ua
            else "google-genai" if "google-genai" in ua or "google-genai" in r.headers.get("x-goog-api-client", "")
            else ua
        )  # fmt: skip
        found.append(family)
    return found


@pytest.mark.parametrize(
    ("worker", "family"), [("codex-writer", "codex"), ("gemini-review", "gemini-cli"), ("claude-redteam", "claude-cli")]
)
async def test_each_real_cli_completes_a_step_against_the_stub(
    real_env: dict[str, str],
    stub: VendorStub,
    tmp_path: Path,
    worker: str,
    family: str,
    orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]],
) -> None:
    orchestrator = await orchestrator_for(real_env)
    task = "--version; echo $(whoami) && rm -rf ~"  # hostile text must stay data
    progress: list[str] = []
    run = await orchestrator.dispatch(
        DispatchRequest(task=task, workers=[worker], runtime_mode="cli", working_directory=str(tmp_path)),
        on_progress=progress.append,
    )
    assert run.status == "completed", run.error
    vendor = family.removesuffix("-cli")
    assert f"{worker}: {vendor}: session started" in progress, "the CLI's own events become progress"
    [step] = run.steps
    assert step.runtime_mode == "cli" and step.fallback_from is None and step.exit_code == 0
    assert step.output.endswith(task[:80]) and "stub reply from" in step.output
    assert step.usage is not None and step.usage.input_tokens == 12 and step.usage.output_tokens == 5
    assert step.session_id
    assert clients(stub) == [family]
    assert stub.requests[-1].last_user_text.endswith(task)


async def test_the_same_task_runs_through_cli_and_through_openai_sdk(
    real_env: dict[str, str], stub: VendorStub, orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]]
) -> None:
    orchestrator = await orchestrator_for(real_env, OPENAI_API_KEY="sk-stub")
    by_cli = await orchestrator.dispatch(
        DispatchRequest(task="add a README", runtime_mode="cli", workers=["codex-writer"])
    )
    assert clients(stub) == ["codex"]
    stub.clear()
    by_sdk = await orchestrator.dispatch(
        DispatchRequest(task="add a README", runtime_mode="openai_sdk", workers=["codex-writer"])
    )
    assert clients(stub) == ["openai-python"]
    assert (by_cli.status, by_sdk.status) == ("completed", "completed")
    assert by_cli.steps[0].runtime_mode == "cli" and by_sdk.steps[0].runtime_mode == "openai_sdk"
    assert by_cli.steps[0].fallback_from is None and by_sdk.steps[0].fallback_from is None
    listed = await orchestrator.list_runs()
    assert [(r.id, r.steps[0].runtime_mode) for r in listed.runs] == [(by_sdk.id, "openai_sdk"), (by_cli.id, "cli")]


async def test_without_an_openai_key_an_sdk_step_completes_through_the_cli(
    real_env: dict[str, str], stub: VendorStub, orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]]
) -> None:
    assert "OPENAI_API_KEY" not in real_env
    orchestrator = await orchestrator_for(real_env)
    run = await orchestrator.dispatch(
        DispatchRequest(task="add a README", runtime_mode="openai_sdk", workers=["codex-writer"])
    )
    assert run.status == "completed", run.error
    [step] = run.steps
    assert (step.runtime_mode, step.fallback_from) == ("cli", "openai_sdk")
    assert [(a.runtime_mode, a.status, a.error_kind, a.error_code) for a in step.attempts] == [
        ("openai_sdk", "failed", "unavailable", "missing_credentials"),
        ("cli", "completed", None, None),
    ]
    assert clients(stub) == ["codex"]


async def test_without_an_openai_key_and_policy_never_the_step_fails_clearly(
    real_env: dict[str, str], stub: VendorStub, orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]]
) -> None:
    orchestrator = await orchestrator_for(real_env, MCP_WORKER_FALLBACK_POLICY="never")
    run = await orchestrator.dispatch(
        DispatchRequest(task="add a README", runtime_mode="openai_sdk", workers=["codex-writer"])
    )
    assert run.status == "failed"
    assert run.error is not None and "OPENAI_API_KEY is not set" in run.error
    assert run.steps[0].runtime_mode == "openai_sdk" and run.steps[0].fallback_from is None
    assert clients(stub) == []


async def test_a_transient_sdk_failure_falls_back_to_the_real_cli(
    real_env: dict[str, str], stub: VendorStub, orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]]
) -> None:
    orchestrator = await orchestrator_for(real_env)
    stub.script(StubReply(status=503, error_message="overloaded"))
    run = await orchestrator.dispatch(
        DispatchRequest(task="review this", runtime_mode="google_sdk", workers=["gemini-review"])
    )
    assert run.status == "completed", run.error
    step = run.steps[0]
    assert (step.runtime_mode, step.fallback_from) == ("cli", "google_sdk")
    assert step.attempts[0].error_code == "http_503"
    assert clients(stub) == ["google-genai", "gemini-cli"]


async def test_codex_writes_gemini_reviews_with_the_real_clis(
    real_env: dict[str, str],
    stub: VendorStub,
    tmp_path: Path,
    orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]],
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    stub.responder = verdicts
    orchestrator = await orchestrator_for(real_env)
    run = await orchestrator.dispatch(
        DispatchRequest(
            task="add input validation", strategy="codex_writes_gemini_reviews", working_directory=str(repo)
        )
    )
    assert run.status == "completed", run.error
    assert [(s.worker_name, s.role, s.runtime_mode, s.status) for s in run.steps] == [
        ("codex-writer", "writer", "cli", "completed"),
        ("gemini-review", "reviewer", "cli", "completed"),
    ]
    assert run.verdict == "approve" and run.steps[1].verdict == "approve"
    assert clients(stub) == ["codex", "gemini-cli"]
    review_prompt = stub.requests_for("gemini")[-1].prompt
    assert "openai did: " in review_prompt, "the reviewer sees the writer's output"


async def test_codex_writes_on_openai_sdk_and_gemini_reviews_on_google_sdk(
    real_env: dict[str, str], stub: VendorStub, orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]]
) -> None:
    stub.responder = verdicts
    orchestrator = await orchestrator_for(real_env, OPENAI_API_KEY="sk-stub")
    run = await orchestrator.dispatch(
        DispatchRequest(
            task="fix the parser",
            strategy="codex_writes_gemini_reviews",
            runtime_modes={"codex-writer": "openai_sdk", "gemini-review": "google_sdk"},
        )
    )
    assert run.status == "completed", run.error
    assert [(s.runtime_mode, s.fallback_from) for s in run.steps] == [("openai_sdk", None), ("google_sdk", None)]
    assert clients(stub) == ["openai-python", "google-genai"]
    assert run.verdict == "approve"


async def test_security_redteam_pass_with_the_real_clis(
    real_env: dict[str, str], stub: VendorStub, orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]]
) -> None:
    stub.responder = verdicts
    orchestrator = await orchestrator_for(real_env)
    run = await orchestrator.dispatch(
        DispatchRequest(
            task="write a login form handler",
            strategy="security_redteam_pass",
            workers=["codex-writer", "gemini-review"],
        )
    )
    assert run.status == "completed", run.error
    assert [(s.worker_name, s.role, s.status) for s in run.steps] == [
        ("codex-writer", "worker", "completed"),
        ("gemini-review", "redteam", "completed"),
    ]
    assert run.verdict == "fail" and run.findings == ["medium: no input length limit"]
    assert clients(stub) == ["codex", "gemini-cli"]


def processes_in(directory: Path) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd").startswith(str(directory)):
                    found.append(int(entry))
            except OSError:
                continue
    return found


# Each CLI reaches the stub within about a second of its start (gemini, the slowest, in 1.1 s here):
# this leaves it several times that on a loaded machine, and the test checks that it got there.
STALLED_TIMEOUT_S = 5


@pytest.mark.parametrize("worker", ["codex-writer", "gemini-review", "claude-redteam"])
async def test_a_real_cli_waiting_on_a_stalled_api_is_killed_at_its_timeout(
    real_env: dict[str, str],
    stub: VendorStub,
    tmp_path: Path,
    worker: str,
    orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]],
) -> None:
    stub.responder = lambda req: StubReply(text="too late", delay_s=60)
    workdir = tmp_path / "work"
    workdir.mkdir()
    orchestrator = await orchestrator_for(real_env)
    await orchestrator.remove_worker(worker)
    spec = next(w for w in WORKERS if w.name == worker)
    await orchestrator.register_worker(spec.model_copy(update={"timeout_seconds": STALLED_TIMEOUT_S}))
    run = await orchestrator.dispatch(DispatchRequest(task="hello", workers=[worker], working_directory=str(workdir)))
    assert run.status == "failed"
    assert f"wall-clock limit of {STALLED_TIMEOUT_S}s" in (run.error or "")
    asked = [r for r in stub.requests if r.api != "other" and r.last_user_text.endswith("hello")]
    assert asked, "the CLI had asked its model and was waiting on the answer when its time was up"
    assert processes_in(workdir) == [], "no process of the CLI's tree survives"
