"""The ``google_sdk`` runtime: Gemini through the official ``google-genai`` async client.

Key from ``GEMINI_API_KEY`` or ``GOOGLE_API_KEY``; endpoint from ``GOOGLE_GEMINI_BASE_URL`` when
set. The SDK's own timeout is in milliseconds and covers one HTTP exchange; a wall-clock guard
around the whole call makes sure a stalled stream cannot outlive the step's limit.
"""

from __future__ import annotations

import functools
import importlib
import time
from typing import Any

import anyio

from ..config import Settings
from ..models import RuntimeMode, Usage
from .base import RuntimeResult, StepRequest, structured_from_text
from .failures import Call, FailureTable, Rule, answered, refused_by_client, timed_out, unreachable
from .sdk_clients import ClientCache, api_key, import_sdk


@functools.cache
def failure_table() -> FailureTable:
    """google-genai's errors, and those of whichever HTTP library it uses (httpx2 in google-genai
    3.x, httpx before); built on first use, so loading this module imports neither."""
    from google.genai import errors

    rules: dict[type[BaseException], Rule] = {
        TimeoutError: timed_out,  # the wall-clock guard around the whole call
        errors.APIError: answered(lambda exc: int(exc.code or 0), lambda exc: str(exc.message or exc.status or "")),
        ValueError: refused_by_client,  # the SDK's own argument checks
    }
    for name in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        rules[module.TimeoutException] = timed_out
        rules[module.TransportError] = unreachable
    return FailureTable(rules)


class GoogleSDKRuntime:
    mode: RuntimeMode = "google_sdk"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._clients = ClientCache(lambda client: client.aio.aclose())

    def _client(self) -> Any:
        genai = import_sdk("google.genai", "google-genai")
        types = import_sdk("google.genai.types", "google-genai")
        key = api_key(self.settings, "GEMINI_API_KEY", "GOOGLE_API_KEY")
        base_url = self.settings.endpoints["gemini"].url
        return self._clients.get(
            key,
            base_url,
            lambda: genai.Client(vertexai=False, api_key=key, http_options=types.HttpOptions(base_url=base_url)),
        )

    async def run(self, request: StepRequest) -> RuntimeResult:
        client = self._client()
        from google.genai import types

        model = request.worker.sdk_model or self.settings.runtime_texts["MCP_COLLAB_GEMINI_MODEL"]
        request.on_progress(f"{request.worker.name}: calling the Gemini API ({model})")
        shaped: dict[str, Any] = {}
        if request.output_schema is not None:
            # response_json_schema takes JSON Schema as it is (response_schema wants Google's subset).
            shaped = {"response_mime_type": "application/json", "response_json_schema": request.output_schema}
        config = types.GenerateContentConfig(
            system_instruction=request.instructions or None,
            http_options=types.HttpOptions(timeout=int(request.timeout_s * 1000)),
            **shaped,
        )
        started = time.monotonic()
        with failure_table().mapped(Call("Gemini API", request.timeout_s)), anyio.fail_after(request.timeout_s):
            response = await client.aio.models.generate_content(model=model, contents=request.prompt, config=config)
        meta = response.usage_metadata
        usage = None
        if meta is not None:
            # Gemini counts thoughts apart from the answer (candidates) and bills both as output.
            thoughts = meta.thoughts_token_count
            answer = meta.candidates_token_count
            usage = Usage(
                input_tokens=meta.prompt_token_count,
                output_tokens=None if answer is None and thoughts is None else (answer or 0) + (thoughts or 0),
                total_tokens=meta.total_token_count,
                cached_input_tokens=meta.cached_content_token_count,
                reasoning_tokens=thoughts,
            )
        text = response.text or ""
        structured, why = (
            structured_from_text(text, "the Gemini API's answer") if request.output_schema is not None else (None, None)
        )
        return RuntimeResult(
            text=text,
            usage=usage,
            session_id=response.response_id,
            duration_ms=int((time.monotonic() - started) * 1000),
            structured=structured,
            structured_error=why,
            model=response.model_version or model,
        )

    async def aclose(self) -> None:
        await self._clients.aclose()
