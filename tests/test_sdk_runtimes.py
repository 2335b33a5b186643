"""The openai_sdk, google_sdk and anthropic_sdk runtimes: what is particular to each, with the real
clients over HTTP against the loopback stub."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from mcp import Client

from mcp_collab.config import Settings
from mcp_collab.errors import ConfigError, RuntimeFatal, RuntimeTransient, RuntimeUnavailable
from mcp_collab.models import DispatchRequest, Worker, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.runtimes.anthropic_sdk import AnthropicSDKRuntime
from mcp_collab.runtimes.base import StepRequest
from mcp_collab.runtimes.google_sdk import GoogleSDKRuntime
from mcp_collab.runtimes.openai_sdk import OpenAISDKRuntime
from mcp_collab.server import build_server
from tests.conftest import fake_cli
from tests.fake_clis.fakecli import answer_text
from tests.support.vendor_stub import StubReply, StubRequest, VendorStub

pytestmark = pytest.mark.anyio

CODEX = Worker(name="codex-writer", model="codex_cli", sdk_model="gpt-test")
GEMINI = Worker(name="gemini-review", model="gemini_cli", sdk_model="gemini-test")


def request(worker: Worker, prompt: str = "write hello.py", timeout: float = 10) -> StepRequest:
    return StepRequest(
        worker=worker, prompt=prompt, instructions="be brief", access="read_only",
        timeout_s=timeout, idle_timeout_s=timeout,
    )  # fmt: skip


def openai_settings(stub: VendorStub, **extra: str) -> Settings:
    return Settings.from_env(
        {"HOME": "/nonexistent", "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": f"{stub.url}/v1", **extra}
    )


def google_settings(stub: VendorStub, **extra: str) -> Settings:
    return Settings.from_env(
        {"HOME": "/nonexistent", "GEMINI_API_KEY": "g-test", "GOOGLE_GEMINI_BASE_URL": stub.url, **extra}
    )


async def run_once(runtime: Any, req: StepRequest) -> Any:
    try:
        return await runtime.run(req)
    finally:
        await runtime.aclose()


async def test_openai_sdk_runs_a_step_through_the_responses_api(stub: VendorStub) -> None:
    result = await run_once(OpenAISDKRuntime(openai_settings(stub)), request(CODEX))
    assert result.text == "stub reply from openai model gpt-test: write hello.py"
    assert result.usage is not None and (result.usage.input_tokens, result.usage.output_tokens) == (12, 5)
    assert result.session_id
    [call] = stub.requests_for("openai")
    assert call.kind == "responses" and call.model == "gpt-test" and call.system == "be brief"
    assert call.user_agent.startswith("AsyncOpenAI/Python")


async def test_openai_sdk_model_comes_from_the_env_when_the_profile_names_none(stub: VendorStub) -> None:
    worker = Worker(name="w", model="codex_cli")
    await run_once(OpenAISDKRuntime(openai_settings(stub, MCP_COLLAB_OPENAI_MODEL="env-model")), request(worker))
    assert stub.requests_for("openai")[0].model == "env-model"


async def test_google_sdk_runs_a_step_through_generate_content(stub: VendorStub) -> None:
    result = await run_once(GoogleSDKRuntime(google_settings(stub)), request(GEMINI))
    assert result.text == "stub reply from gemini model gemini-test: write hello.py"
    assert result.usage is not None and result.usage.total_tokens == 17
    [call] = stub.requests_for("gemini")
    assert call.kind == "generateContent" and call.system == "be brief"
    assert "google-genai-sdk" in call.headers.get("x-goog-api-client", "") + call.user_agent


# The failures every SDK runtime shares (each HTTP status class, no key, no endpoint, too slow, the
# fallback to cli) are tested for every runtime in the registry by tests/test_runtime_registry.py.


# -- Chat Completions: endpoints without the Responses API --------------------------------------


async def test_openai_sdk_in_chat_mode_runs_a_step_through_chat_completions(stub: VendorStub) -> None:
    stub.responses_api = False
    progress: list[str] = []
    req = StepRequest(
        worker=CODEX, prompt="write hello.py", instructions="be brief", access="read_only",
        timeout_s=10, idle_timeout_s=10, on_progress=progress.append,
    )  # fmt: skip
    result = await run_once(OpenAISDKRuntime(openai_settings(stub, MCP_COLLAB_OPENAI_WIRE_API="chat")), req)
    assert result.text == "stub reply from openai model gpt-test: write hello.py"
    assert result.usage is not None and (result.usage.input_tokens, result.usage.output_tokens) == (12, 5)
    assert result.session_id is not None and result.session_id.startswith("chatcmpl-")
    [call] = stub.requests
    assert call.kind == "chat_completions" and call.model == "gpt-test" and call.system == "be brief"
    assert call.user_agent.startswith("AsyncOpenAI/Python")
    assert f"codex-writer: calling the OpenAI Chat Completions API (gpt-test) at {stub.url}/v1" in progress


async def test_auto_mode_finds_an_endpoint_without_responses_once_and_then_goes_straight_to_chat(
    stub: VendorStub,
) -> None:
    stub.responses_api = False
    runtime = OpenAISDKRuntime(openai_settings(stub))
    progress: list[str] = []
    req = StepRequest(
        worker=CODEX, prompt="write hello.py", instructions="", access="read_only",
        timeout_s=10, idle_timeout_s=10, on_progress=progress.append,
    )  # fmt: skip
    try:
        first = await runtime.run(req)
        second = await runtime.run(req)
    finally:
        await runtime.aclose()
    assert first.text == second.text == "stub reply from openai model gpt-test: write hello.py"
    assert [(r.path, r.kind) for r in stub.requests] == [
        ("/v1/responses", ""),
        ("/v1/chat/completions", "chat_completions"),
        ("/v1/chat/completions", "chat_completions"),
    ]
    assert any("has no Responses API (HTTP 404 for /responses); trying the Chat Completions API" in p for p in progress)


async def test_responses_mode_against_an_endpoint_without_it_fails_saying_which_setting_helps(
    stub: VendorStub,
) -> None:
    stub.responses_api = False
    with pytest.raises(RuntimeFatal, match="set MCP_COLLAB_OPENAI_WIRE_API=chat") as caught:
        await run_once(OpenAISDKRuntime(openai_settings(stub, MCP_COLLAB_OPENAI_WIRE_API="responses")), request(CODEX))
    assert caught.value.code == "http_404"
    assert [r.path for r in stub.requests] == ["/v1/responses"], "no Chat Completions call unless asked"


async def test_an_unknown_model_404_in_openai_shape_is_not_taken_for_a_missing_responses_api(
    stub: VendorStub,
) -> None:
    stub.script(StubReply(status=404, error_message="The model `gpt-test` does not exist."))
    with pytest.raises(RuntimeFatal, match="does not exist"):
        await run_once(OpenAISDKRuntime(openai_settings(stub)), request(CODEX))
    assert [r.kind for r in stub.requests] == ["responses"]


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [(503, RuntimeTransient, "http_503"), (401, RuntimeUnavailable, "http_401"), (400, RuntimeFatal, "http_400")],
)
async def test_chat_completions_failures_are_classified_like_responses_ones(
    stub: VendorStub, status: int, error: type[Exception], code: str
) -> None:
    stub.script(StubReply(status=status, error_message=f"stub says {status}"))
    with pytest.raises(error) as caught:
        await run_once(OpenAISDKRuntime(openai_settings(stub, MCP_COLLAB_OPENAI_WIRE_API="chat")), request(CODEX))
    assert caught.value.code == code  # type: ignore[attr-defined]
    assert "Chat Completions API" in str(caught.value) and f"stub says {status}" in str(caught.value)
    assert [r.kind for r in stub.requests] == ["chat_completions"]


# -- anthropic_sdk: the Messages API ------------------------------------------------------------

CLAUDE = Worker(name="claude-review", model="claude_cli", sdk_model="claude-test")


def anthropic_settings(stub: VendorStub, **extra: str) -> Settings:
    return Settings.from_env(
        {"HOME": "/nonexistent", "ANTHROPIC_API_KEY": "sk-ant-test", "ANTHROPIC_BASE_URL": stub.url, **extra}
    )


async def test_anthropic_sdk_runs_a_step_through_the_messages_api(stub: VendorStub) -> None:
    progress: list[str] = []
    req = StepRequest(
        worker=CLAUDE, prompt="review hello.py", instructions="be brief", access="read_only",
        timeout_s=10, idle_timeout_s=10, on_progress=progress.append,
    )  # fmt: skip
    result = await run_once(AnthropicSDKRuntime(anthropic_settings(stub)), req)
    assert result.text == "stub reply from anthropic model claude-test: review hello.py"
    assert result.usage is not None
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.total_tokens) == (12, 5, 17)
    assert result.session_id is not None and result.session_id.startswith("msg_"), "the message id"
    [call] = stub.requests
    assert (call.path, call.kind, call.stream) == ("/v1/messages", "messages", False)
    assert call.model == "claude-test" and call.system == "be brief"
    assert call.user_agent.startswith("AsyncAnthropic/Python") and "anthropic-version" in call.headers
    # The key as the client sends it (x-api-key, or a bearer token in newer clients).
    assert "sk-ant-test" in call.headers.get("x-api-key", "") + call.headers.get("authorization", "")
    assert call.body["max_tokens"] == 16000, "the Messages API requires a ceiling; the documented default"
    assert f"claude-review: calling the Anthropic Messages API (claude-test) at {stub.url}" in progress


async def test_anthropic_sdk_sends_no_system_prompt_when_the_worker_has_no_instructions(stub: VendorStub) -> None:
    req = StepRequest(worker=CLAUDE, prompt="hi", instructions="", access="read_only", timeout_s=10, idle_timeout_s=10)
    await run_once(AnthropicSDKRuntime(anthropic_settings(stub, MCP_COLLAB_ANTHROPIC_MAX_TOKENS="2048")), req)
    [call] = stub.requests
    assert "system" not in call.body and call.body["max_tokens"] == 2048


@pytest.mark.parametrize("value", ["0", "0.5", "-3", "inf", "lots"])
def test_a_bad_anthropic_max_tokens_is_refused_at_start_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match=f"MCP_COLLAB_ANTHROPIC_MAX_TOKENS={value!r}"):
        Settings.from_env({"HOME": "/nonexistent", "MCP_COLLAB_ANTHROPIC_MAX_TOKENS": value})


async def test_an_overloaded_anthropic_api_falls_back_to_the_claude_cli(
    stub: VendorStub, base_env: dict[str, str]
) -> None:
    stub.script(StubReply(status=529, error_message="Overloaded"))
    settings = Settings.from_env(
        {**base_env, "ANTHROPIC_API_KEY": "sk-ant-test", "ANTHROPIC_BASE_URL": stub.url,
         "MCP_COLLAB_CLAUDE_BIN": fake_cli("size_claude"), "CLAUDE_FAKE_ANSWER_CHARS": "40"}
    )  # fmt: skip
    async with WorkerOrchestrator(settings) as orch:
        await orch.register_worker(WorkerSpec(name="claude-review", model="claude_cli", runtime_mode="anthropic_sdk"))
        with anyio.fail_after(60):
            run = await orch.dispatch(DispatchRequest(task="review this", workers=["claude-review"]))
    [step] = run.steps
    assert (run.status, step.runtime_mode, step.fallback_from) == ("completed", "cli", "anthropic_sdk")
    assert step.output == answer_text(40), "the claude CLI's answer"
    assert [(a.runtime_mode, a.error_kind, a.error_code) for a in step.attempts] == [
        ("anthropic_sdk", "transient", "http_529"), ("cli", None, None)
    ]  # fmt: skip
    assert "Overloaded" in (step.attempts[0].error or "")


async def test_a_bad_request_to_the_anthropic_api_fails_without_falling_back(
    stub: VendorStub, base_env: dict[str, str]
) -> None:
    stub.script(StubReply(status=400, error_message="max_tokens: too large"))
    settings = Settings.from_env(
        {**base_env, "ANTHROPIC_API_KEY": "sk-ant-test", "ANTHROPIC_BASE_URL": stub.url,
         "MCP_COLLAB_CLAUDE_BIN": fake_cli("size_claude")}
    )  # fmt: skip
    async with WorkerOrchestrator(settings) as orch:
        await orch.register_worker(WorkerSpec(name="claude-review", model="claude_cli"))
        with anyio.fail_after(60):
            run = await orch.dispatch(
                DispatchRequest(task="review this", workers=["claude-review"], runtime_mode="anthropic_sdk")
            )
    [step] = run.steps
    assert (run.status, step.runtime_mode, step.fallback_from) == ("failed", "anthropic_sdk", None)
    assert [(a.runtime_mode, a.error_kind, a.error_code) for a in step.attempts] == [
        ("anthropic_sdk", "fatal", "http_400")
    ]
    assert "max_tokens: too large" in (step.error or "")


async def test_an_mcp_client_runs_a_claude_worker_on_anthropic_sdk_and_cannot_put_codex_on_it(
    stub: VendorStub, base_env: dict[str, str]
) -> None:
    settings = Settings.from_env({**base_env, "ANTHROPIC_API_KEY": "sk-ant-test", "ANTHROPIC_BASE_URL": stub.url})
    async with Client(build_server(settings)) as client:
        await client.call_tool("spawn_worker", {"name": "claude-review", "model": "claude_cli"})
        await client.call_tool("spawn_worker", {"name": "codex-writer", "model": "codex_cli"})
        done = await client.call_tool(
            "dispatch_task", {"task": "review this", "workers": ["claude-review"], "runtimeMode": "anthropic_sdk"}
        )
        refused = await client.call_tool(
            "dispatch_task", {"task": "write this", "workers": ["codex-writer"], "runtimeMode": "anthropic_sdk"}
        )
    assert done.structured_content is not None and not done.is_error
    [step] = done.structured_content["steps"]
    assert (done.structured_content["status"], step["runtimeMode"], step.get("fallbackFrom")) == (
        "completed", "anthropic_sdk", None
    )  # fmt: skip
    assert [r.kind for r in stub.requests] == ["messages"]
    text = " ".join(getattr(c, "text", "") for c in refused.content)
    assert refused.is_error and "runtimeMode 'anthropic_sdk' cannot run a codex_cli worker" in text
    assert "accepted for codex_cli: 'cli', 'openai_sdk'" in text


async def test_openai_sdk_continues_a_response_with_previous_response_id(stub: VendorStub) -> None:
    import dataclasses

    from mcp_collab.runtimes.base import Resume

    follow = dataclasses.replace(
        request(CODEX, prompt="<earlier_task>...</earlier_task> and now y"), resume=Resume("resp_earlier", "and now y")
    )
    result = await run_once(OpenAISDKRuntime(openai_settings(stub)), follow)
    assert result.resumed
    [call] = stub.requests_for("openai")
    assert call.body["previous_response_id"] == "resp_earlier" and call.body["input"] == "and now y"


async def test_openai_sdk_continues_from_history_when_the_response_is_gone(stub: VendorStub) -> None:
    import dataclasses

    from mcp_collab.runtimes.base import Resume

    def answer(req: StubRequest) -> StubReply:
        if (req.body or {}).get("previous_response_id"):
            return StubReply(status=404, error_message="Previous response with id 'resp_old' not found.")
        return StubReply(text="from history")

    stub.responder = answer
    follow = dataclasses.replace(request(CODEX, prompt="history and now y"), resume=Resume("resp_old", "and now y"))
    result = await run_once(OpenAISDKRuntime(openai_settings(stub)), follow)
    assert not result.resumed and result.text == "from history"
    assert [c.body.get("previous_response_id") for c in stub.requests_for("openai")] == ["resp_old", None]
