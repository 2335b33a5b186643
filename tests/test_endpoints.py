"""One place for custom endpoints: a user sets OPENAI_BASE_URL, GOOGLE_GEMINI_BASE_URL and
ANTHROPIC_BASE_URL (and keys) once, and every runtime calls them, the real CLIs included, with
nothing about the endpoint in the CLIs' own configuration; `doctor` says what each will call."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from mcp_collab.config import Settings
from mcp_collab.errors import ConfigError
from mcp_collab.models import DispatchRequest, Run, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.readiness import check
from mcp_collab.runtimes.cli.vendors import CODEX_RECONNECTS_BEFORE_GIVING_UP, VENDORS
from tests.conftest import quick_vendor_clis, require_real_clis
from tests.support.cli_homes import STUB_API_KEY, USER_CODEX_CONFIG, user_env
from tests.support.vendor_stub import StubReply, StubRequest, VendorStub
from tests.test_real_clis import processes_in

pytestmark = pytest.mark.anyio

CODEX = WorkerSpec(name="codex-writer", model="codex_cli", cli_model="gpt-5.5", sdk_model="gpt-5.5",
                   timeout_seconds=90)  # fmt: skip
GEMINI = WorkerSpec(name="gemini-review", model="gemini_cli", cli_model="gemini-2.5-flash", timeout_seconds=90)
CLAUDE = WorkerSpec(name="claude-redteam", model="claude_cli", cli_model="claude-sonnet-4-5", timeout_seconds=90)


@pytest.fixture
def user(tmp_path: Path, stub: VendorStub, base_env: dict[str, str]) -> dict[str, str]:
    """The server's environment of a user who set the endpoints once, with the real CLIs on PATH."""
    bin_dir = require_real_clis()
    env = {**base_env, **user_env(tmp_path, stub.url)}
    env["PATH"] = f"{bin_dir}{os.pathsep}{base_env['PATH']}"
    return env


@pytest.fixture
async def dispatch() -> AsyncIterator[Callable[..., Awaitable[Run]]]:
    """Dispatches one task to one worker on a fresh orchestrator; closes them all after the test."""
    made: list[WorkerOrchestrator] = []

    async def run(env: dict[str, str], worker: WorkerSpec, task: str, **request: object) -> Run:
        orchestrator = WorkerOrchestrator(Settings.from_env(env))
        made.append(orchestrator)
        if worker.name not in {w.name for w in await orchestrator.list_workers()}:  # the store keeps them
            await orchestrator.register_worker(worker)
        progress = request.pop("progress", None)
        return await orchestrator.dispatch(
            DispatchRequest(task=task, workers=[worker.name], **request),  # type: ignore[arg-type]
            on_progress=progress.append if isinstance(progress, list) else None,
        )

    yield run
    for orchestrator in made:
        await orchestrator.aclose()


def task_calls(stub: VendorStub, task: str) -> list[StubRequest]:
    """The model calls that carried the task (a CLI may make side calls of its own)."""
    return [r for r in stub.requests if r.api != "other" and r.last_user_text.endswith(task)]


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again at once: nothing listens there
    return f"http://127.0.0.1:{port}"


# -- the real CLIs ---------------------------------------------------------------------------------


@pytest.mark.real_cli
@pytest.mark.timeout(180)
async def test_the_real_codex_cli_calls_OPENAI_BASE_URL_with_no_provider_in_its_config(
    user: dict[str, str], stub: VendorStub, dispatch: Callable[..., Awaitable[Run]], tmp_path: Path
) -> None:
    codex_config = Path(user["HOME"]) / ".codex" / "config.toml"
    progress: list[str] = []
    run = await dispatch(user, CODEX, "add a README", runtime_mode="cli", progress=progress)
    assert run.status == "completed", run.error
    assert run.steps[0].output == "stub reply from openai model gpt-5.5: add a README"
    [call] = task_calls(stub, "add a README")
    assert call.kind == "responses" and call.user_agent.startswith("codex_exec/")
    assert call.headers["authorization"] == f"Bearer {STUB_API_KEY}", "the key of OPENAI_API_KEY"
    assert f"codex-writer: starting codex (calling {stub.url}/v1, from OPENAI_BASE_URL)" in progress
    assert codex_config.read_text(encoding="utf-8") == USER_CODEX_CONFIG, "the user's config is not edited"


@pytest.mark.real_cli
@pytest.mark.timeout(180)
async def test_the_real_codex_cli_reaches_a_keyless_endpoint(
    user: dict[str, str], stub: VendorStub, dispatch: Callable[..., Awaitable[Run]]
) -> None:
    """Ollama and vLLM often take no key: codex must not insist on one."""
    del user["OPENAI_API_KEY"]
    run = await dispatch(user, CODEX, "add a README", runtime_mode="cli")
    assert run.status == "completed", run.error
    [call] = task_calls(stub, "add a README")
    assert "authorization" not in call.headers


@pytest.mark.real_cli
@pytest.mark.timeout(180)
async def test_the_real_codex_cli_fails_at_once_on_an_endpoint_error_instead_of_retrying(
    user: dict[str, str], stub: VendorStub, dispatch: Callable[..., Awaitable[Run]]
) -> None:
    stub.responder = lambda req: StubReply(status=500, error_message="overloaded")
    run = await dispatch(user, CODEX, "add a README", runtime_mode="cli")
    assert run.status == "failed"
    assert len(task_calls(stub, "add a README")) == 1, "codex's own retries are off for the endpoint"


@pytest.mark.real_cli
@pytest.mark.timeout(180)
async def test_the_real_codex_cli_gives_up_on_an_endpoint_that_is_down_instead_of_reconnecting_forever(
    user: dict[str, str], dispatch: Callable[..., Awaitable[Run]], tmp_path: Path
) -> None:
    down = closed_port_url()
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {**user, "OPENAI_BASE_URL": f"{down}/v1"}
    progress: list[str] = []
    run = await dispatch(env, CODEX, "add a README", working_directory=str(workdir), progress=progress)
    assert run.status == "failed"
    [attempt] = run.steps[0].attempts
    assert (attempt.error_kind, attempt.error_code) == ("transient", "unreachable")
    assert f"the codex CLI cannot reach {down}/v1 (OPENAI_BASE_URL)" in (run.error or ""), run.error
    assert any("codex: Reconnecting..." in p for p in progress), "each reconnect shows as progress"
    assert processes_in(workdir) == [], "no process of codex's tree survives"


def test_codex_reconnecting_for_a_while_and_then_getting_through_is_not_a_failure() -> None:
    parser = VENDORS["codex_cli"].parser()
    reconnect = json.dumps({"type": "error", "message": "Reconnecting... waiting for network"})
    for _ in range(CODEX_RECONNECTS_BEFORE_GIVING_UP - 1):
        parser.feed(reconnect)
    parser.feed(json.dumps({"type": "item.completed", "item": {"type": "agent_message", "text": "done"}}))
    parser.feed(json.dumps({"type": "turn.completed", "usage": {"input_tokens": 1, "output_tokens": 1}}))
    assert (parser.parsed.unreachable, parser.parsed.error, parser.parsed.text) == (None, None, "done")
    for _ in range(CODEX_RECONNECTS_BEFORE_GIVING_UP):
        parser.feed(reconnect)
    assert parser.parsed.unreachable == "Reconnecting... waiting for network"


@pytest.mark.real_cli
@pytest.mark.timeout(180)
async def test_the_real_gemini_cli_calls_GOOGLE_GEMINI_BASE_URL_with_no_settings_of_its_own(
    user: dict[str, str], stub: VendorStub, dispatch: Callable[..., Awaitable[Run]]
) -> None:
    progress: list[str] = []
    run = await dispatch(user, GEMINI, "review the parser", progress=progress)
    assert run.status == "completed", run.error  # before: exit 41, "Invalid auth method"
    assert run.steps[0].output.startswith("stub reply from gemini model gemini-2.5-flash: review the parser")
    [call] = task_calls(stub, "review the parser")
    assert call.kind == "streamGenerateContent" and "geminicli" in call.user_agent.lower()
    assert call.headers["x-goog-api-key"] == STUB_API_KEY
    assert f"gemini-review: starting gemini (calling {stub.url}, from GOOGLE_GEMINI_BASE_URL)" in progress
    assert not (Path(user["HOME"]) / ".gemini" / "settings.json").exists(), "nothing written in the user's home"
    made = Path(user["MCP_COLLAB_STATE_DIR"]) / "gemini-home" / ".gemini" / "settings.json"
    assert stat.S_IMODE(made.stat().st_mode) == 0o600, "settings may hold tokens: owner-only"


@pytest.mark.real_cli
@pytest.mark.timeout(180)
async def test_the_real_gemini_cli_keeps_the_users_settings_but_not_their_auth(
    user: dict[str, str], stub: VendorStub, dispatch: Callable[..., Awaitable[Run]]
) -> None:
    own = Path(user["HOME"]) / ".gemini" / "settings.json"
    own.parent.mkdir()
    text = (
        "{\n  // a user's gemini settings, with a comment as gemini allows\n"
        '  "security": {"auth": {"selectedType": "oauth-personal"}},\n'
        '  "context": {"fileName": "NOTES.md"}\n}\n'
    )
    own.write_text(text, encoding="utf-8")
    run = await dispatch(user, GEMINI, "review the parser")
    assert run.status == "completed", run.error
    assert own.read_text(encoding="utf-8") == text, "the user's settings are not edited"
    made = json.loads(
        (Path(user["MCP_COLLAB_STATE_DIR"]) / "gemini-home" / ".gemini" / "settings.json").read_text(encoding="utf-8")
    )
    assert made["context"] == {"fileName": "NOTES.md"}, "the user's own settings carry over"
    assert made["security"]["auth"]["selectedType"] == "gemini-api-key"
    assert made["general"]["maxAttempts"] == 1


@pytest.mark.real_cli
@pytest.mark.timeout(180)
async def test_the_real_claude_cli_calls_ANTHROPIC_BASE_URL_and_fails_at_once(
    user: dict[str, str], stub: VendorStub, dispatch: Callable[..., Awaitable[Run]]
) -> None:
    run = await dispatch(user, CLAUDE, "look for injection")
    assert run.status == "completed", run.error
    [call] = task_calls(stub, "look for injection")
    assert call.kind == "messages" and "claude-cli" in call.user_agent
    assert call.headers["x-api-key"] == STUB_API_KEY
    stub.clear()
    stub.responder = lambda req: StubReply(status=500, error_message="overloaded")
    failed = await dispatch(user, CLAUDE, "look again")
    assert failed.status == "failed" and "500" in (failed.error or "")
    assert len(task_calls(stub, "look again")) == 1, "CLAUDE_CODE_MAX_RETRIES=0: no retries with backoff"


# -- Chat Completions ------------------------------------------------------------------------------


@pytest.mark.real_cli
@pytest.mark.timeout(180)
async def test_an_endpoint_with_only_chat_completions_runs_on_openai_sdk_and_codex_says_why_it_cannot(
    user: dict[str, str], stub: VendorStub, dispatch: Callable[..., Awaitable[Run]]
) -> None:
    stub.responses_api = False
    env = {**user, "MCP_COLLAB_OPENAI_WIRE_API": "chat", "MCP_WORKER_FALLBACK_POLICY": "never"}
    by_sdk = await dispatch(env, CODEX, "add a README", runtime_mode="openai_sdk")
    assert by_sdk.status == "completed", by_sdk.error
    assert by_sdk.steps[0].output == "stub reply from openai model gpt-5.5: add a README"
    assert [r.kind for r in stub.requests] == ["chat_completions"]
    stub.clear()
    by_cli = await dispatch(env, CODEX, "add a README", runtime_mode="cli")
    assert by_cli.status == "failed"
    attempt = by_cli.steps[0].attempts[0]
    assert (attempt.error_kind, attempt.error_code) == ("unavailable", "endpoint_unsupported")
    assert "speaks only the Responses API" in (by_cli.error or "") and "runtimeMode openai_sdk" in (by_cli.error or "")
    assert stub.requests == [], "codex was not started against an endpoint it cannot speak to"


# -- doctor / check_runtimes -----------------------------------------------------------------------


async def test_doctor_names_the_endpoint_each_runtime_calls_and_how(stub: VendorStub, base_env: dict[str, str]) -> None:
    report = await check(
        Settings.from_env(
            {**base_env, **quick_vendor_clis(), "OPENAI_BASE_URL": f"{stub.url}/v1", "OPENAI_API_KEY": "k",
             "GOOGLE_GEMINI_BASE_URL": stub.url, "GEMINI_API_KEY": "k"}
        )
    )  # fmt: skip
    checks = {c.name: c for c in report.checks}
    codex = checks["endpoint:codex"]
    assert codex.ok and f"calls {stub.url}/v1 (OPENAI_BASE_URL)" in codex.detail and "-c overrides" in codex.detail
    gemini = checks["endpoint:gemini"]
    assert gemini.ok and f"calls {stub.url} (GOOGLE_GEMINI_BASE_URL)" in gemini.detail
    assert "GEMINI_CLI_HOME" in gemini.detail and "gemini-api-key" in gemini.detail
    assert f"calls {stub.url}/v1 (OPENAI_BASE_URL)" in checks["endpoint:openai_sdk"].detail
    assert "Chat Completions if a custom endpoint has no /responses" in checks["endpoint:openai_sdk"].detail
    claude = checks["endpoint:claude"]
    assert claude.ok and "calls https://api.anthropic.com" in claude.detail, "no ANTHROPIC_BASE_URL: the vendor's"
    assert stub.requests == [], "doctor sends no request to an endpoint, and no key"
    assert not (Path(base_env["MCP_COLLAB_STATE_DIR"]) / "gemini-home").exists(), "doctor writes no CLI home"


async def test_doctor_flags_an_endpoint_that_is_set_but_unreachable(base_env: dict[str, str]) -> None:
    down = closed_port_url()
    host_port = down.removeprefix("http://")
    env = {**base_env, **quick_vendor_clis(), "ANTHROPIC_BASE_URL": f"http://user:pw@{host_port}"}
    report = await check(Settings.from_env(env))
    claude = next(c for c in report.checks if c.name == "endpoint:claude")
    assert not claude.ok and "unreachable" in claude.detail and f"calls {down} (ANTHROPIC_BASE_URL)" in claude.detail
    assert claude.hint == f"start the server at {down} or correct ANTHROPIC_BASE_URL"
    assert "pw" not in claude.detail, "credentials in a URL are never shown"
    runtimes = [r for r in report.runtimes if r.worker_model == "claude_cli"]
    assert [r.mode for r in runtimes] == ["cli", "anthropic_sdk"], "the CLI and the SDK both call that endpoint"
    assert all(not r.ready and "unreachable" in r.reason for r in runtimes)


async def test_doctor_says_codex_cannot_speak_chat_completions(stub: VendorStub, base_env: dict[str, str]) -> None:
    env = {**base_env, **quick_vendor_clis(), "OPENAI_BASE_URL": f"{stub.url}/v1", "MCP_COLLAB_OPENAI_WIRE_API": "chat"}
    report = await check(Settings.from_env(env))
    codex = next(c for c in report.checks if c.name == "endpoint:codex")
    assert not codex.ok and codex.hint is not None and "runtimeMode openai_sdk" in codex.hint


def test_the_doctor_command_prints_each_endpoint(base_env: dict[str, str]) -> None:
    down = closed_port_url()
    done = subprocess.run(
        [sys.executable, "-m", "mcp_collab", "doctor"],
        env={**base_env, **quick_vendor_clis(), "OPENAI_BASE_URL": f"{down}/v1"}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    line = next(x for x in done.stdout.splitlines() if "endpoint:codex" in x)
    assert line.startswith("warn") and f"calls {down}/v1 (OPENAI_BASE_URL)" in line and "unreachable" in line


# -- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["OPENAI_BASE_URL", "GOOGLE_GEMINI_BASE_URL", "ANTHROPIC_BASE_URL"])
@pytest.mark.parametrize("value", ["localhost:11434/v1", "ftp://host/v1", "http://:8000", "http://h:99999/v1"])
def test_a_malformed_base_url_is_refused_naming_the_variable_not_its_value(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"{variable} is not an http\\(s\\) URL") as caught:
        Settings.from_env({"HOME": "/nonexistent", variable: value})
    assert value not in str(caught.value), "a URL may carry credentials"


def test_the_wire_api_setting_names_what_is_accepted() -> None:
    with pytest.raises(ConfigError, match=r"MCP_COLLAB_OPENAI_WIRE_API='completions'.*auto, responses, chat"):
        Settings.from_env({"HOME": "/nonexistent", "MCP_COLLAB_OPENAI_WIRE_API": "completions"})
    assert Settings.from_env({"HOME": "/nonexistent"}).openai_wire_api == "auto"
