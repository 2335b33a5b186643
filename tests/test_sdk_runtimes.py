"""The openai_sdk and google_sdk runtimes: the real clients, over HTTP, against the loopback stub."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from mcp_collab.config import Settings
from mcp_collab.errors import RuntimeFatal, RuntimeTransient, RuntimeUnavailable
from mcp_collab.models import Worker
from mcp_collab.runtimes.base import StepRequest
from mcp_collab.runtimes.google_sdk import GoogleSDKRuntime
from mcp_collab.runtimes.openai_sdk import OpenAISDKRuntime
from tests.support.vendor_stub import StubReply, VendorStub

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


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (500, RuntimeTransient, "http_500"),
        (503, RuntimeTransient, "http_503"),
        (429, RuntimeTransient, "http_429"),
        (401, RuntimeUnavailable, "http_401"),
        (400, RuntimeFatal, "http_400"),
        (404, RuntimeFatal, "http_404"),
    ],
)
@pytest.mark.parametrize("vendor", ["openai", "google"])
async def test_http_failures_are_classified_once_at_the_edge(
    stub: VendorStub, vendor: str, status: int, error: type[Exception], code: str
) -> None:
    stub.script(StubReply(status=status, error_message=f"stub says {status}"))
    runtime: Any = (
        OpenAISDKRuntime(openai_settings(stub)) if vendor == "openai" else GoogleSDKRuntime(google_settings(stub))
    )
    with pytest.raises(error) as caught:
        await run_once(runtime, request(CODEX if vendor == "openai" else GEMINI))
    assert caught.value.code == code  # type: ignore[attr-defined]
    assert f"HTTP {status}" in str(caught.value) and f"stub says {status}" in str(caught.value)
    assert len(stub.requests) == 1, "no hidden retries: the fallback policy decides what happens next"


@pytest.mark.parametrize("vendor", ["openai", "google"])
async def test_a_missing_key_is_unavailable_and_sends_nothing(stub: VendorStub, vendor: str) -> None:
    settings = Settings.from_env(
        {"HOME": "/nonexistent", "OPENAI_BASE_URL": stub.url, "GOOGLE_GEMINI_BASE_URL": stub.url}
    )
    runtime: Any = OpenAISDKRuntime(settings) if vendor == "openai" else GoogleSDKRuntime(settings)
    with pytest.raises(RuntimeUnavailable, match="API_KEY"):
        await run_once(runtime, request(CODEX if vendor == "openai" else GEMINI))
    assert stub.requests == []


@pytest.mark.parametrize("vendor", ["openai", "google"])
async def test_an_unreachable_endpoint_is_transient(vendor: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again at once: nothing listens there
    url = f"http://127.0.0.1:{port}"
    env = {
        "HOME": "/nonexistent",
        "OPENAI_API_KEY": "k",
        "OPENAI_BASE_URL": url,
        "GEMINI_API_KEY": "k",
        "GOOGLE_GEMINI_BASE_URL": url,
    }
    runtime: Any = (
        OpenAISDKRuntime(Settings.from_env(env)) if vendor == "openai" else GoogleSDKRuntime(Settings.from_env(env))
    )
    with pytest.raises(RuntimeTransient):
        await run_once(runtime, request(CODEX if vendor == "openai" else GEMINI))


@pytest.mark.parametrize("vendor", ["openai", "google"])
async def test_a_slow_reply_hits_the_step_timeout_as_transient(stub: VendorStub, vendor: str) -> None:
    stub.script(StubReply(text="too late", delay_s=5))
    runtime: Any = (
        OpenAISDKRuntime(openai_settings(stub)) if vendor == "openai" else GoogleSDKRuntime(google_settings(stub))
    )
    with pytest.raises(RuntimeTransient, match="within 1s") as caught:
        await run_once(runtime, request(CODEX if vendor == "openai" else GEMINI, timeout=1))
    assert caught.value.code == "timeout"


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
