"""The ``anthropic_sdk`` runtime: Claude through the official ``anthropic`` async client (Messages API).

Key from ``ANTHROPIC_API_KEY``; endpoint from ``ANTHROPIC_BASE_URL`` when set (the same one the
claude CLI is pointed at). The model is the worker profile's ``sdkModel``, else
``MCP_COLLAB_ANTHROPIC_MODEL``; the Messages API requires a ceiling on the answer's length,
``MCP_COLLAB_ANTHROPIC_MAX_TOKENS``. The session id is the message id.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import anyio

from ..config import Settings
from ..errors import RuntimeFatal
from ..models import RuntimeMode, Usage
from .base import OUTPUT_SCHEMA_NAME, RuntimeResult, StepRequest
from .failures import Call, FailureTable, answered, refused_by_client, timed_out, unreachable
from .sdk_clients import ClientCache, api_key, import_sdk

API = "Anthropic Messages API"


@functools.cache
def failure_table() -> FailureTable:
    """The anthropic client's errors; built on first use, so loading this module does not import it."""
    import anthropic

    return FailureTable(
        {
            TimeoutError: timed_out,  # the wall-clock guard around the whole call
            anthropic.APITimeoutError: timed_out,
            anthropic.APIConnectionError: unreachable,
            anthropic.APIStatusError: answered(lambda exc: int(exc.status_code), _api_message),
            anthropic.AnthropicError: refused_by_client,
            ValueError: refused_by_client,  # the client's own argument checks
        }
    )


class AnthropicSDKRuntime:
    mode: RuntimeMode = "anthropic_sdk"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._clients = ClientCache(lambda client: client.close())

    def _client(self) -> Any:
        anthropic = import_sdk("anthropic", "anthropic")
        key = api_key(self.settings, "ANTHROPIC_API_KEY")
        base_url = self.settings.endpoints["anthropic"].url
        return self._clients.get(
            key,
            base_url,
            lambda: anthropic.AsyncAnthropic(api_key=key, base_url=base_url, max_retries=self.settings.sdk_max_retries),
        )

    async def run(self, request: StepRequest) -> RuntimeResult:
        client = self._client()
        endpoint = self.settings.endpoints["anthropic"]
        where = f" at {endpoint.shown}" if endpoint.custom else ""
        model = request.worker.sdk_model or self.settings.runtime_texts["MCP_COLLAB_ANTHROPIC_MODEL"]
        request.on_progress(f"{request.worker.name}: calling the {API} ({model}){where}")
        extra: dict[str, Any] = {"system": request.instructions} if request.instructions else {}
        if request.output_schema is not None:
            # The Messages API's way to a schema-shaped answer: one tool whose input is the schema,
            # and the model made to call it; the call's input is the answer.
            extra["tools"] = [
                {
                    "name": OUTPUT_SCHEMA_NAME,
                    "description": "Give your final answer by calling this tool once.",
                    "input_schema": request.output_schema,
                }
            ]
            extra["tool_choice"] = {"type": "tool", "name": OUTPUT_SCHEMA_NAME}
        started = time.monotonic()
        with failure_table().mapped(Call(f"{API}{where}", request.timeout_s)), anyio.fail_after(request.timeout_s):
            message = await client.messages.create(
                model=model,
                max_tokens=self.settings.runtime_counts["MCP_COLLAB_ANTHROPIC_MAX_TOKENS"],
                messages=[{"role": "user", "content": request.prompt}],
                timeout=request.timeout_s,
                **extra,
            )
        text = "".join(block.text for block in message.content if getattr(block, "type", None) == "text")
        structured, why = None, None
        if request.output_schema is not None:
            calls = [
                block.input
                for block in message.content
                if getattr(block, "type", None) == "tool_use" and getattr(block, "name", None) == OUTPUT_SCHEMA_NAME
            ]
            if calls:
                structured = calls[-1]
                # With the call alone, the answer's text is its input, so a failed check still has text to read.
                text = text or json.dumps(structured, ensure_ascii=False)
            else:
                why = f"the {API} answered without calling {OUTPUT_SCHEMA_NAME} (stop reason {message.stop_reason})"
        if not text and message.stop_reason == "refusal":
            raise RuntimeFatal(f"the model refused ({API}, {message.id})", code="refusal")
        return RuntimeResult(
            text=text,
            usage=_usage(message.usage),
            session_id=message.id,
            duration_ms=int((time.monotonic() - started) * 1000),
            structured=structured,
            structured_error=why,
            model=getattr(message, "model", None) or model,
        )

    async def aclose(self) -> None:
        await self._clients.aclose()


def _usage(usage: Any) -> Usage | None:
    """Anthropic counts the prompt in three parts (fresh, written to the cache, read from it); the
    step's input is all three, as the other vendors count it, and the cached parts are kept apart."""
    if usage is None:
        return None
    written = getattr(usage, "cache_creation_input_tokens", None)
    read = getattr(usage, "cache_read_input_tokens", None)
    prompt = (getattr(usage, "input_tokens", None) or 0) + (written or 0) + (read or 0)
    return Usage(
        input_tokens=prompt,
        output_tokens=usage.output_tokens,
        total_tokens=prompt + usage.output_tokens,
        cached_input_tokens=read,
        cache_write_tokens=written,
    )


def _api_message(exc: Any) -> str:
    """The message of Anthropic's error object ({"type": "error", "error": {"message": ...}})."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
    return str(getattr(exc, "message", "") or "")
