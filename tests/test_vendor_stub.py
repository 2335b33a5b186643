"""The loopback VendorStub driven by the real openai and google-genai clients (and real CLIs if present)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from tests.support.cli_homes import cli_bin_dir, cli_env
from tests.support.vendor_stub import StubReply, StubRequest, VendorStub

KEY = "stub-key-not-secret"


@pytest.fixture
def stub() -> Any:
    with VendorStub() as s:
        yield s


def _openai(stub: VendorStub) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=KEY, base_url=stub.url + "/v1", max_retries=0, timeout=10)


def _genai(stub: VendorStub) -> genai.Client:
    return genai.Client(api_key=KEY, http_options=genai_types.HttpOptions(base_url=stub.url, timeout=10_000))


def _post(url: str, body: dict[str, Any]) -> tuple[int, str]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def test_binds_loopback_and_stops(stub: VendorStub) -> None:
    assert stub.url.startswith("http://127.0.0.1:")
    assert stub.port > 0


@pytest.mark.anyio
async def test_openai_responses_create(stub: VendorStub) -> None:
    client = _openai(stub)
    resp = await client.responses.create(model="gpt-test", instructions="be brief", input="hello there")
    await client.close()
    assert resp.output_text == "stub reply from openai model gpt-test: hello there"
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (12, 5)
    [req] = stub.requests_for("openai")
    assert (req.method, req.path, req.model, req.stream) == ("POST", "/v1/responses", "gpt-test", False)
    assert req.prompt == "hello there"
    assert req.system == "be brief"
    assert req.user_agent.startswith("AsyncOpenAI/Python")
    assert req.headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.anyio
async def test_openai_streaming_and_script(stub: VendorStub) -> None:
    stub.script(StubReply(text="first scripted", input_tokens=3, output_tokens=4))
    client = _openai(stub)
    stream = await client.responses.create(
        model="gpt-test", input=[{"role": "user", "content": "streamed"}], stream=True
    )
    deltas, final = [], None
    async for event in stream:
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type == "response.completed":
            final = event.response
    assert "".join(deltas) == "first scripted"
    assert final is not None and final.usage is not None and final.usage.total_tokens == 7
    again = await client.responses.create(model="gpt-test", input="after script")
    await client.close()
    assert again.output_text.endswith(": after script")  # script used up: back to the responder
    assert [r.stream for r in stub.requests_for("openai")] == [True, False]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "exc"),
    [(500, openai.InternalServerError), (429, openai.RateLimitError), (400, openai.BadRequestError)],
)
async def test_openai_error_status(stub: VendorStub, status: int, exc: type[Exception]) -> None:
    stub.responder = lambda req: StubReply(status=status, error_message="boom")
    client = _openai(stub)
    with pytest.raises(exc) as info:
        await client.responses.create(model="gpt-test", input="x")
    await client.close()
    assert isinstance(info.value, openai.APIStatusError)
    assert info.value.status_code == status
    assert "boom" in str(info.value)


@pytest.mark.anyio
async def test_genai_generate_content(stub: VendorStub) -> None:
    client = _genai(stub)
    resp = await client.aio.models.generate_content(
        model="gemini-test",
        contents="hi gemini",
        config=genai_types.GenerateContentConfig(system_instruction="you are terse"),
    )
    await client.aio.aclose()
    assert resp.text == "stub reply from gemini model gemini-test: hi gemini"
    assert resp.usage_metadata is not None
    assert resp.usage_metadata.prompt_token_count == 12
    assert resp.usage_metadata.candidates_token_count == 5
    assert resp.usage_metadata.total_token_count == 17
    [req] = stub.requests_for("gemini")
    assert req.path == "/v1/models/gemini-test:generateContent"
    assert (req.model, req.prompt, req.system, req.stream) == (
        "gemini-test",
        "hi gemini",
        "you are terse",
        False,
    )
    assert "google-genai-sdk/" in req.user_agent
    assert req.headers["x-goog-api-key"] == KEY


@pytest.mark.anyio
async def test_genai_stream(stub: VendorStub) -> None:
    client = _genai(stub)
    chunks = [c async for c in await client.aio.models.generate_content_stream(model="g", contents="stream me")]
    await client.aio.aclose()
    assert "".join(c.text or "" for c in chunks) == "stub reply from gemini model g: stream me"
    assert chunks[-1].usage_metadata is not None and chunks[-1].usage_metadata.total_token_count == 17
    [req] = stub.requests_for("gemini")
    assert req.stream and req.query == "alt=sse"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "exc", "grpc_status"),
    [
        (500, genai_errors.ServerError, "INTERNAL"),
        (503, genai_errors.ServerError, "UNAVAILABLE"),
        (429, genai_errors.ClientError, "RESOURCE_EXHAUSTED"),
        (400, genai_errors.ClientError, "INVALID_ARGUMENT"),
    ],
)
async def test_genai_error_status(stub: VendorStub, status: int, exc: type[Exception], grpc_status: str) -> None:
    stub.script(StubReply(status=status, error_message="nope"))
    client = _genai(stub)
    with pytest.raises(exc) as info:
        await client.aio.models.generate_content(model="gemini-test", contents="x")
    await client.aio.aclose()
    assert isinstance(info.value, genai_errors.APIError)
    assert (info.value.code, info.value.status, info.value.message) == (status, grpc_status, "nope")


def test_anthropic_messages_raw(stub: VendorStub) -> None:
    body = {
        "model": "claude-test",
        "max_tokens": 10,
        "system": [{"type": "text", "text": "sys text"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi claude"}]}],
    }
    status, text = _post(stub.url + "/v1/messages", body)
    assert status == 200
    msg = json.loads(text)
    assert msg["content"][0]["text"] == "stub reply from anthropic model claude-test: hi claude"
    assert msg["usage"]["output_tokens"] == 5
    status, text = _post(stub.url + "/v1/messages?beta=true", dict(body, stream=True))
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
    assert "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta") == (
        "stub reply from anthropic model claude-test: hi claude"
    )
    stub.script(StubReply(status=529, error_message="busy"))
    status, text = _post(stub.url + "/v1/messages", body)
    assert status == 529
    assert json.loads(text) == {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    status, text = _post(stub.url + "/v1/messages/count_tokens", body)
    assert (status, json.loads(text)) == (200, {"input_tokens": 12})
    reqs = stub.requests_for("anthropic")
    assert [r.system for r in reqs] == ["sys text"] * 4
    assert [r.stream for r in reqs] == [False, True, False, False]


def test_other_paths_are_logged_and_answered(stub: VendorStub) -> None:
    status, _ = _post(stub.url + "/nowhere", {})
    assert status == 404
    with urllib.request.urlopen(stub.url + "/v1/models", timeout=5) as resp:
        assert resp.status == 200
    assert [(r.api, r.path) for r in stub.requests] == [("other", "/nowhere"), ("other", "/v1/models")]
    stub.clear()
    assert stub.requests == []


def test_responder_exception_becomes_500(stub: VendorStub) -> None:
    def broken(req: StubRequest) -> StubReply:
        raise RuntimeError("bug in test responder")

    stub.responder = broken
    status, text = _post(stub.url + "/v1/responses", {"model": "m", "input": "x"})
    assert status == 500
    assert "bug in test responder" in json.loads(text)["error"]["message"]


def test_delay_does_not_block_other_requests_and_stop_is_prompt() -> None:
    stub = VendorStub().start()
    stub.responder = lambda req: StubReply(text="slow", delay_s=30) if "slow" in req.prompt else StubReply("fast")
    results: list[Any] = []

    def slow_call(stream: bool) -> None:
        try:
            results.append(_post(stub.url + "/v1/responses", {"model": "m", "input": "slow", "stream": stream}))
        except Exception as exc:  # the connection is cut by stop()
            results.append(exc)

    threads = [threading.Thread(target=slow_call, args=(s,), daemon=True) for s in (True, False)]
    for t in threads:
        t.start()
    # an idle keep-alive connection holds a handler thread too
    idle = http.client.HTTPConnection("127.0.0.1", stub.port, timeout=10)
    idle.request("POST", "/v1/messages", body=json.dumps({"model": "c", "messages": []}))
    assert idle.getresponse().read()
    time.sleep(0.2)
    t0 = time.monotonic()
    status, text = _post(stub.url + "/v1/responses", {"model": "m", "input": "quick"})
    assert status == 200 and json.loads(text)["output"][0]["content"][0]["text"] == "fast"
    assert time.monotonic() - t0 < 2
    t0 = time.monotonic()
    stub.stop()
    assert time.monotonic() - t0 < 2
    for t in threads:
        t.join(timeout=5)
        assert not t.is_alive()
    assert len(results) == 2 and all(isinstance(r, Exception) for r in results)
    idle.close()
    stub.stop()  # idempotent


# --------------------------------------------------------------------------- real CLIs (optional)

_BIN = cli_bin_dir()

_CLI_CASES = {
    "codex": (["codex", "exec", "--json", "--skip-git-repo-check", "-C", "{WORK}", "-s", "read-only",
               "-m", "gpt-5.5", "-"], "openai"),
    "gemini": (["gemini", "-m", "gemini-2.5-flash", "-o", "json", "--skip-trust", "--approval-mode", "plan",
                "-p", ""], "gemini"),
    "claude": (["claude", "-p", "--output-format", "json", "--model", "claude-sonnet-4-5",
                "--permission-mode", "plan"], "anthropic"),
}  # fmt: skip


@pytest.mark.real_cli
@pytest.mark.skipif(_BIN is None, reason="npm-installed vendor CLIs not found")
@pytest.mark.parametrize("cli", sorted(_CLI_CASES))
def test_real_cli_against_stub(stub: VendorStub, tmp_path: Path, cli: str) -> None:
    assert _BIN is not None
    argv, api = _CLI_CASES[cli]
    work = tmp_path / "work"
    work.mkdir()
    argv = [str(_BIN / argv[0])] + [a.replace("{WORK}", str(work)) for a in argv[1:]]
    env = {k: os.environ[k] for k in ("PATH", "LANG") if k in os.environ}
    env.update(cli_env(tmp_path / "homes", stub.url))
    task = "--version please: this task starts with dashes"
    proc = subprocess.run(
        argv, cwd=work, env=env, input=task.encode(), capture_output=True, timeout=90, start_new_session=True
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, (out, proc.stderr.decode()[-2000:])
    [req] = stub.requests_for(api)
    assert req.last_user_text == task
    assert f"stub reply from {api} model" in out
