"""The ``openai_sdk`` runtime: an OpenAI-compatible API through the official async client.

Key and endpoint come from the server's environment (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``), so
any compatible endpoint works (a gateway, vLLM, Ollama, a loopback stub in tests). The model is the
worker profile's ``sdkModel``, else ``MCP_COLLAB_OPENAI_MODEL``, else a built-in default.

Which API it speaks is ``MCP_COLLAB_OPENAI_WIRE_API``: ``responses`` (the Responses API),
``chat`` (Chat Completions, which every self-hosted server speaks and some speak only), or
``auto`` (the default): Responses, and for a custom endpoint that answers 404 or 405 on
``/responses`` without OpenAI's error object (the way a web framework answers a route it lacks:
vLLM, LiteLLM, Ollama), Chat Completions from then on. Detecting it costs one request, once per
endpoint and server, and asks nothing of the user; an OpenAI-shaped 404 means the route exists
(an unknown model) and is reported as it is, as is any 404 from the vendor's own API. The API used
is named in the step's progress and in its session id's form (``resp_...`` or ``chatcmpl-...``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

from ..config import Settings
from ..errors import RuntimeFailure, RuntimeFatal
from ..models import RuntimeMode, Usage
from .base import OUTPUT_SCHEMA_NAME, Resume, RuntimeResult, StepRequest, structured_from_text
from .failures import Call, FailureTable, answered, refused_by_client, timed_out, unreachable
from .sdk_clients import ClientCache, api_key, import_sdk

# What a server without a /responses route answers there (FastAPI, Ollama, vLLM: 404; some
# gateways: 405). Any other failure is the endpoint's answer to the request itself.
NO_RESPONSES_API_STATUSES = frozenset({404, 405})
# What an endpoint answers a request field it does not know (a server without structured output):
# the request, not the model, was refused, so it is asked again without the schema.
SCHEMA_REFUSED_STATUSES = frozenset({400, 422})
RESPONSES = "Responses API"
# Ids of the Responses API's own responses: a follow-up can continue one with previous_response_id.
RESPONSE_ID_PREFIX = "resp"
CHAT = "Chat Completions API"


@functools.cache
def failure_table() -> FailureTable:
    """The openai client's errors; built on first use, so loading this module does not import openai."""
    import openai

    return FailureTable(
        {
            openai.APITimeoutError: timed_out,
            openai.APIConnectionError: unreachable,
            openai.APIStatusError: answered(lambda exc: int(exc.status_code), _api_message),
            openai.OpenAIError: refused_by_client,
        }
    )


class NoResponsesRoute(RuntimeFatal):
    """A custom endpoint answered 404/405 for /responses; ``route_missing``: not in OpenAI's error
    shape, so the route itself is missing there."""

    def __init__(self, message: str, *, code: str, status: int, route_missing: bool) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.route_missing = route_missing


class OpenAISDKRuntime:
    mode: RuntimeMode = "openai_sdk"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._clients = ClientCache(lambda client: client.close())
        # Per base URL: the endpoint was found to have no Responses API (auto mode).
        self._chat_only: set[str] = set()

    def _client(self) -> Any:
        openai = import_sdk("openai", "openai")
        key = api_key(self.settings, "OPENAI_API_KEY")
        base_url = self.settings.endpoints["openai"].url
        return self._clients.get(
            key,
            base_url,
            lambda: openai.AsyncOpenAI(api_key=key, base_url=base_url, max_retries=self.settings.sdk_max_retries),
        )

    async def run(self, request: StepRequest) -> RuntimeResult:
        client = self._client()
        endpoint = self.settings.endpoints["openai"]
        wire = self.settings.openai_wire_api
        if wire == "chat" or (wire == "auto" and endpoint.url in self._chat_only):
            return await self._call(client, request, chat=True)
        try:
            return await self._call(client, request, chat=False)
        except NoResponsesRoute as missing:
            if not (wire == "auto" and endpoint.url is not None and missing.route_missing):
                raise
            request.on_progress(
                f"{request.worker.name}: {endpoint.shown} has no {RESPONSES} (HTTP {missing.status} for "
                f"/responses); trying the {CHAT}"
            )
            try:
                result = await self._call(client, request, chat=True)
            except RuntimeFailure as again:
                message = f"{again.message} (after /responses answered HTTP {missing.status})"
                raise type(again)(message, code=again.code, exit_code=again.exit_code, output=again.output) from again
            self._chat_only.add(endpoint.url)
            return result

    async def _call(self, client: Any, request: StepRequest, *, chat: bool) -> RuntimeResult:
        resume = request.resume
        if chat or resume is None or not resume.session_id.startswith(RESPONSE_ID_PREFIX):
            return await self._create(client, request, chat=chat)
        try:
            # A follow-up continues the conversation the Responses API kept (previous_response_id):
            # only the follow-up is sent. A response the API no longer has (expired, another
            # account or endpoint) is a 4xx: the step then runs on the recorded history instead.
            resumed = await self._create(client, request, chat=False, previous=resume)
        except RuntimeFatal as gone:
            request.on_progress(
                f"{request.worker.name}: the OpenAI Responses API could not continue {resume.session_id} "
                f"({gone.message[:120]}); continuing from the recorded history"
            )
            return await self._create(client, request, chat=False)
        return dataclasses.replace(resumed, resumed=True)

    async def _create(
        self, client: Any, request: StepRequest, *, chat: bool, previous: Resume | None = None
    ) -> RuntimeResult:
        """One call; with a schema a compatible endpoint refuses (it has no structured output), the
        same call again without it, the answer then read from its text by the caller."""
        try:
            return await self._create_once(client, request, chat=chat, previous=previous)
        except RuntimeFatal as refused:
            status = getattr(refused.__cause__, "status_code", None)
            if request.output_schema is None or status not in SCHEMA_REFUSED_STATUSES:
                raise
            request.on_progress(
                f"{request.worker.name}: the endpoint refused a schema-shaped answer (HTTP {status}); asking again "
                "without one"
            )
            unshaped = dataclasses.replace(request, output_schema=None)
            result = await self._create_once(client, unshaped, chat=chat, previous=previous)
            why = f"the endpoint refused a schema-shaped answer: {refused.message}"
            return dataclasses.replace(result, structured_error=why)

    async def _create_once(
        self, client: Any, request: StepRequest, *, chat: bool, previous: Resume | None = None
    ) -> RuntimeResult:
        model = request.worker.sdk_model or self.settings.runtime_texts["MCP_COLLAB_OPENAI_MODEL"]
        api = CHAT if chat else RESPONSES
        where = f" at {self.settings.endpoints['openai'].shown}" if self.settings.endpoints["openai"].custom else ""
        request.on_progress(f"{request.worker.name}: calling the OpenAI {api} ({model}){where}")
        started = time.monotonic()
        try:
            with failure_table().mapped(Call(f"OpenAI {api}{where}", request.timeout_s)):
                schema = request.output_schema
                if chat:
                    messages = [{"role": "system", "content": request.instructions}] if request.instructions else []
                    messages.append({"role": "user", "content": request.prompt})
                    shaped: dict[str, Any] = {}
                    if schema is not None:
                        shaped["response_format"] = {
                            "type": "json_schema",
                            "json_schema": {"name": OUTPUT_SCHEMA_NAME, "schema": schema, "strict": True},
                        }
                    completion = await client.chat.completions.create(
                        model=model, messages=messages, timeout=request.timeout_s, **shaped
                    )
                else:
                    shaped = {}
                    if schema is not None:
                        form = {"type": "json_schema", "name": OUTPUT_SCHEMA_NAME, "schema": schema, "strict": True}
                        shaped["text"] = {"format": form}
                    response = await client.responses.create(
                        model=model,
                        instructions=request.instructions or None,
                        input=previous.message if previous is not None else request.prompt,
                        timeout=request.timeout_s,
                        **({"previous_response_id": previous.session_id} if previous is not None else {}),
                        **shaped,
                    )
        except RuntimeFatal as failure:
            status = getattr(failure.__cause__, "status_code", None)
            if not chat and status in NO_RESPONSES_API_STATUSES and where and previous is None:
                # A custom endpoint without the route answers in its web framework's words, not
                # OpenAI's error object (which means the route exists: an unknown model, say).
                raise NoResponsesRoute(
                    f"{failure.message}; if this endpoint has no Responses API, set MCP_COLLAB_OPENAI_WIRE_API=chat",
                    code=failure.code,
                    status=int(status),
                    route_missing=not _is_openai_error(failure.__cause__),
                ) from failure.__cause__
            raise
        duration_ms = int((time.monotonic() - started) * 1000)
        if chat:
            return _shaped(_chat_result(completion, duration_ms, model), request, CHAT)
        usage = None
        if response.usage is not None:
            u = response.usage
            usage = Usage(
                input_tokens=u.input_tokens,
                output_tokens=u.output_tokens,
                total_tokens=u.total_tokens,
                cached_input_tokens=_detail(u, "input_tokens_details", "cached_tokens"),
                reasoning_tokens=_detail(u, "output_tokens_details", "reasoning_tokens"),
            )
        result = RuntimeResult(
            text=response.output_text or "",
            usage=usage,
            session_id=response.id,
            duration_ms=duration_ms,
            model=getattr(response, "model", None) or model,
        )
        return _shaped(result, request, RESPONSES)

    async def aclose(self) -> None:
        await self._clients.aclose()


def _shaped(result: RuntimeResult, request: StepRequest, api: str) -> RuntimeResult:
    """With a schema asked for, the answer's text is the JSON object (strict mode holds it to the
    schema on OpenAI's side; a compatible server may not): read it out for the caller to check."""
    if request.output_schema is None:
        return result
    value, why = structured_from_text(result.text, f"the {api}'s answer")
    return dataclasses.replace(result, structured=value, structured_error=why)


def _detail(usage: Any, part: str, name: str) -> int | None:
    """A count inside one of the usage's ``*_details`` objects, when the endpoint sent it."""
    value = getattr(getattr(usage, part, None), name, None)
    return value if isinstance(value, int) else None


def _chat_result(completion: Any, duration_ms: int, model: str) -> RuntimeResult:
    choices = getattr(completion, "choices", None) or []
    if not choices:
        raise RuntimeFatal("the OpenAI Chat Completions API answered without a choice", code="empty_answer")
    message = choices[0].message
    text = message.content or ""
    if not text and getattr(message, "refusal", None):
        raise RuntimeFatal(f"the model refused: {message.refusal}"[:500], code="refusal")
    usage = None
    if completion.usage is not None:
        u = completion.usage
        usage = Usage(
            input_tokens=u.prompt_tokens,
            output_tokens=u.completion_tokens,
            total_tokens=u.total_tokens,
            cached_input_tokens=_detail(u, "prompt_tokens_details", "cached_tokens"),
            reasoning_tokens=_detail(u, "completion_tokens_details", "reasoning_tokens"),
        )
    return RuntimeResult(
        text=text,
        usage=usage,
        session_id=completion.id,
        duration_ms=duration_ms,
        model=getattr(completion, "model", None) or model,
    )


def _is_openai_error(exc: Any) -> bool:
    """The openai client keeps the ``error`` object of an OpenAI-shaped body (or the whole body)."""
    body = getattr(exc, "body", None)
    return isinstance(body, dict) and isinstance(body.get("message"), str)


def _api_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])[:500]
    return str(getattr(exc, "message", "") or "")[:500]
