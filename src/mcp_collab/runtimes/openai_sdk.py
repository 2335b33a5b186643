"""The ``openai_sdk`` runtime: the OpenAI Responses API through the official async client.

Key and endpoint come from the server's environment (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``), so
any compatible endpoint works (a gateway, vLLM, a loopback stub in tests). The model is the worker
profile's ``sdkModel``, else ``MCP_COLLAB_OPENAI_MODEL``, else a built-in default.
"""

from __future__ import annotations

import time
from typing import Any

from ..config import Settings
from ..errors import RuntimeFailure, RuntimeFatal, RuntimeTransient, RuntimeUnavailable
from ..models import RuntimeMode, Usage
from .base import RuntimeResult, StepRequest


class OpenAISDKRuntime:
    mode: RuntimeMode = "openai_sdk"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._clients: dict[tuple[str, str | None], Any] = {}

    def _client(self) -> Any:
        try:
            import openai  # imported on first use: the server starts without paying for it
        except ImportError as exc:
            raise RuntimeUnavailable(
                "the openai package is not installed; install mcp-collab with its dependencies",
                code="missing_package",
            ) from exc
        env = self.settings.environ
        key = env.get("OPENAI_API_KEY", "").strip()
        if not key:
            raise RuntimeUnavailable("OPENAI_API_KEY is not set", code="missing_credentials")
        base_url = env.get("OPENAI_BASE_URL", "").strip() or None
        client = self._clients.get((key, base_url))
        if client is None:
            client = openai.AsyncOpenAI(api_key=key, base_url=base_url, max_retries=self.settings.sdk_max_retries)
            self._clients[(key, base_url)] = client
        return client

    async def run(self, request: StepRequest) -> RuntimeResult:
        client = self._client()
        import openai

        model = request.worker.sdk_model or self.settings.openai_model
        request.on_progress(f"{request.worker.name}: calling the OpenAI Responses API ({model})")
        started = time.monotonic()
        try:
            response = await client.responses.create(
                model=model,
                instructions=request.instructions or None,
                input=request.prompt,
                timeout=request.timeout_s,
            )
        except openai.APITimeoutError as exc:
            raise RuntimeTransient(
                f"the OpenAI API did not answer within {request.timeout_s:g}s", code="timeout"
            ) from exc
        except openai.APIConnectionError as exc:
            raise RuntimeTransient(f"cannot reach the OpenAI API: {exc}", code="connection") from exc
        except openai.APIStatusError as exc:
            raise classify_status(exc.status_code, _api_message(exc), "OpenAI API") from exc
        except openai.OpenAIError as exc:
            raise RuntimeFatal(f"the OpenAI client failed: {exc}", code="client_error") from exc
        usage = None
        if response.usage is not None:
            usage = Usage(
                input_tokens=response.usage.input_tokens,
                output_tokens=response.usage.output_tokens,
                total_tokens=response.usage.total_tokens,
            )
        return RuntimeResult(
            text=response.output_text or "",
            usage=usage,
            session_id=response.id,
            duration_ms=int((time.monotonic() - started) * 1000),
        )

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


def classify_status(status: int, message: str, api: str) -> RuntimeFailure:
    """One HTTP status, one error class: the fallback policy rests on this table."""
    text = f"the {api} answered HTTP {status}: {message}".rstrip(": ")
    code = f"http_{status}"
    if status in (401, 403):
        # The request never ran: credentials are missing or refused. The CLI may have its own login.
        return RuntimeUnavailable(text, code=code)
    if status in (408, 409, 429) or status >= 500:
        return RuntimeTransient(text, code=code)
    return RuntimeFatal(text, code=code)


def _api_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])[:500]
    return str(getattr(exc, "message", "") or "")[:500]
