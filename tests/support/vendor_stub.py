"""Loopback stub of the OpenAI Responses and Chat Completions, Gemini and Anthropic Messages APIs.

The stub is a stdlib ``ThreadingHTTPServer`` running in a daemon thread, bound to
127.0.0.1 on a free port.  Because it is a real HTTP server in its own thread it
serves synchronous tests, async tests and child processes (the real ``codex``,
``gemini`` and ``claude`` CLIs) alike.

    with VendorStub() as stub:
        client = AsyncOpenAI(api_key="stub-key-not-secret", base_url=stub.url + "/v1")
        ...
        assert stub.requests_for("openai")[0].prompt == "hello"

Replies are produced by ``stub.responder`` (a callable ``StubRequest -> StubReply``),
after any replies queued with ``stub.script(...)`` have been used up.  Only generation
calls (OpenAI ``/responses`` and ``/chat/completions``, Gemini ``generateContent``/``streamGenerateContent``,
Anthropic ``/messages``) consume scripted replies; token-count calls go to the responder;
anything else is logged with ``api="other"`` and answered 404 (or an empty model list).

The default responder answers ``"stub reply from <api> model <model>: "`` followed by the
first 80 characters of ``last_user_text`` (the last user text part: the task itself for
the CLIs, which prepend environment context to ``prompt``).

``stub.responses_api = False`` makes it a server without the Responses API, as many self-hosted
OpenAI-compatible servers are: ``/responses`` then answers 404 like any unknown route.

Tool calls: a reply with ``tool_calls`` answers a Responses, Gemini or Anthropic generation call
with those calls (``function_call`` / ``custom_tool_call`` items, ``functionCall`` parts,
``tool_use`` blocks) instead of a final message, so a real CLI runs its own tool (codex's
``exec_command`` or ``apply_patch``, gemini's ``write_file`` or ``run_shell_command``, claude's
``Write`` or ``Bash``) and sends the result back; ``StubRequest.tool_outputs`` holds the results a
request carries, so a responder answers the follow-up with a final message::

    stub.responder = lambda req: StubReply("done") if req.tool_outputs else StubReply(
        text="", tool_calls=(ToolCall("exec_command", {"cmd": "printf x > f"}),))

(a tool-call reply says its ``text`` first when there is one: pass ``text=""`` for calls alone).

Structured output: a request that asks for a schema-shaped answer (the Responses API's ``text.format``
of type ``json_schema``, Chat Completions' ``response_format``, Gemini's ``responseJsonSchema`` or
``responseSchema``, an Anthropic ``tool_choice`` forcing one tool, or the ``StructuredOutput`` tool the
claude CLI declares for ``--json-schema``) has that schema in ``StubRequest.output_schema``. It is
answered with ``StubReply.structured`` when set, else with an object that follows the schema and the
reply's text (an enum property takes the value a ``NAME: value`` line of the text names, else its
first; a string the text; an array of strings the ``SINGULAR: item`` lines): as JSON text where the
vendor answers so, or as a call of the tool after the reply's text (so a test can make the text
say one thing and the structured answer another).
``stub.converse(api, *turns)`` scripts the model of an agent that has tools (a CLI acting as an MCP
client): a request of that api which declares the tools the turns call is answered by turn ``k``, where
``k`` is the number of tool results the request carries. A ``ToolCall`` turn answers with a call to the
declared tool whose name is the turn's name or ends with it after a separator (clients prefix MCP tools:
``mcp__server__tool``); a ``str`` turn answers with text; a callable turn gets the tool results so far
(``tool_results(req)``) and returns either. Other requests (the same CLI running as a worker, side calls)
go on to the script and the responder. The conversation is a function of the request, so a client that
re-sends a request gets the same answer.
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
import socket
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "StubReply",
    "StubRequest",
    "ToolCall",
    "VendorStub",
    "declared_tools",
    "default_responder",
    "follow_schema",
    "tool_results",
]


@dataclass(frozen=True)
class StubRequest:
    """One HTTP request as the stub understood it."""

    api: str  # "openai" | "gemini" | "anthropic" | "other"
    method: str
    path: str  # path without the query string
    user_agent: str
    model: str | None
    prompt: str  # concatenated text of the user input / contents / messages
    system: str  # instructions / system text
    stream: bool
    headers: dict[str, str]
    # Extras (not needed by most tests, handy when debugging a CLI):
    query: str = ""
    kind: str = ""  # e.g. "responses", "generateContent", "streamGenerateContent", "messages", "count_tokens"
    body: Any = field(default=None, compare=False, repr=False)  # parsed JSON body (or None)
    last_user_text: str = ""  # last text part of the last user message (the task, for the CLIs)
    time: float = field(default=0.0, compare=False)
    # What the client's tools returned, oldest first: the outputs of earlier tool calls it sends back.
    tool_outputs: tuple[str, ...] = ()
    # The JSON Schema the request asks its answer to follow (see the module doc), and the tool that
    # carries it where the answer is a tool call (Anthropic); None / "": a free answer.
    output_schema: dict[str, Any] | None = field(default=None, compare=False)
    output_tool: str = ""


@dataclass(frozen=True)
class ToolCall:
    """A tool call the stub asks the client to make: in a reply (``StubReply.tool_calls``), or as a
    scripted turn of a client's model (``VendorStub.converse``, where ``name`` is matched against the
    client's possibly prefixed declared name).

    ``arguments`` is a JSON object for function tools; a string makes it a freeform tool call
    (the Responses API's ``custom_tool_call``, which is how codex's ``apply_patch`` takes a patch).
    """

    name: str
    arguments: dict[str, Any] | str = field(default_factory=dict)
    call_id: str = ""  # empty: the stub makes one up


@dataclass(frozen=True)
class StubReply:
    """What the stub answers to one vendor API request."""

    text: str = "stub reply"
    status: int = 200
    error_message: str = ""
    delay_s: float = 0.0
    input_tokens: int = 12  # the whole prompt, its cached parts included (each API's usage says it its way)
    output_tokens: int = 5  # the whole answer, reasoning included
    cached_tokens: int = 0  # of the prompt, read from the vendor's cache
    cache_write_tokens: int = 0  # of the prompt, written to the cache (Anthropic reports it)
    reasoning_tokens: int = 0  # of the answer, reasoning
    model: str | None = None  # the model the answer says served it (default: the one asked for)
    headers: tuple[tuple[str, str], ...] = ()  # extra response headers, e.g. (("retry-after", "0"),)
    # Non-empty: the reply asks the client to call these tools (after ``text``, if any) and ends its
    # turn there; the client sends the tools' results in its next request.
    tool_calls: tuple[ToolCall, ...] = ()
    # The answer to a request for a schema-shaped answer (module doc); None: made from the schema and ``text``.
    structured: Any = None


Responder = Callable[[StubRequest], StubReply]


Turn = ToolCall | str | Callable[[list[str]], "ToolCall | str"]


def default_responder(req: StubRequest) -> StubReply:
    return StubReply(text=f"stub reply from {req.api} model {req.model}: {req.last_user_text[:80]}")


# ---------------------------------------------------------------------------
# request parsing helpers


def _parts(content: Any, part_types: tuple[str, ...] = ("text", "input_text", "output_text")) -> list[str]:
    """Text parts of a message content: a string, a typed part, or a list of parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content] if content else []
    if isinstance(content, dict):
        if isinstance(content.get("text"), str) and content.get("type", "text") in part_types:
            return [content["text"]] if content["text"] else []
        if "parts" in content:
            return _parts(content["parts"], part_types)
        return []
    if isinstance(content, list):
        return [t for p in content for t in _parts(p, part_types)]
    return []


def _text_of(content: Any, part_types: tuple[str, ...] = ("text", "input_text", "output_text")) -> str:
    return "\n".join(_parts(content, part_types))


# Each parser returns (user messages as lists of text parts, system text).
_Parsed = tuple[list[list[str]], str]


def _openai_texts(body: dict[str, Any]) -> _Parsed:
    system_parts: list[str] = []
    if isinstance(body.get("instructions"), str):
        system_parts.append(body["instructions"])
    users: list[list[str]] = []
    inp = body.get("input")
    if isinstance(inp, str):
        users.append([inp])
    elif isinstance(inp, list):
        for item in inp:
            if isinstance(item, str):
                users.append([item])
                continue
            if not isinstance(item, dict) or item.get("type", "message") != "message":
                continue
            role = item.get("role")
            if role == "user":
                users.append(_parts(item.get("content")))
            elif role in ("system", "developer"):
                system_parts.append(_text_of(item.get("content")))
    return users, "\n".join(p for p in system_parts if p)


def _chat_texts(body: dict[str, Any]) -> _Parsed:
    users: list[list[str]] = []
    system_parts: list[str] = []
    for m in body.get("messages") or []:
        if not isinstance(m, dict):
            continue
        if m.get("role") == "user":
            users.append(_parts(m.get("content")))
        elif m.get("role") in ("system", "developer"):
            system_parts.append(_text_of(m.get("content")))
    return users, "\n".join(p for p in system_parts if p)


def _gemini_texts(body: dict[str, Any]) -> _Parsed:
    users: list[list[str]] = []
    contents = body.get("contents")
    if isinstance(contents, str | dict):
        contents = [contents]
    if isinstance(contents, list):
        for c in contents:
            if isinstance(c, str):
                users.append([c])
            elif isinstance(c, dict) and c.get("role", "user") == "user":
                users.append(_parts(c.get("parts")))
    si = body.get("systemInstruction", body.get("system_instruction"))
    return users, _text_of(si)


def _anthropic_texts(body: dict[str, Any]) -> _Parsed:
    users: list[list[str]] = []
    for m in body.get("messages") or []:
        if isinstance(m, dict) and m.get("role") == "user":
            users.append(_parts(m.get("content"), ("text",)))
    return users, _text_of(body.get("system"), ("text",))


_GEMINI_PATH = re.compile(r"^(?:/[^/]+)*?/(v1beta|v1alpha|v1)/models/([^/:]+):([A-Za-z]+)$")
_GEMINI_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_ANTHROPIC_ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_OPENAI_ERROR_TYPE = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
}


def _chunks(text: str, n: int = 3) -> list[str]:
    """Split text into up to n pieces (so streams carry several deltas)."""
    if not text:
        return [""]
    size = max(1, -(-len(text) // n))
    return [text[i : i + size] for i in range(0, len(text), size)]


# ---------------------------------------------------------------------------
# server


class _StubServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    stub: VendorStub

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Client hang-ups and stop() closing sockets are expected; stay quiet.
        return


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "VendorStub/1.0"
    sys_version = ""
    server: _StubServer

    # -- connection tracking so stop() can close keep-alive / streaming sockets
    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without TCP_NODELAY, Nagle holds the body
        # until the client's delayed ACK (40 ms), which would swamp every latency we measure.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.stub._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.stub._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    # -- body reading
    def _read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            data = bytearray()
            while True:
                line = self.rfile.readline()
                if not line:
                    break
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # trailers
                    while True:
                        t = self.rfile.readline()
                        if not t or t in (b"\r\n", b"\n"):
                            break
                    break
                data += self.rfile.read(size)
                self.rfile.readline()
            raw = bytes(data)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length > 0 else b""
        enc = (self.headers.get("Content-Encoding") or "").lower().strip()
        try:
            if enc == "gzip":
                raw = gzip.decompress(raw)
            elif enc == "deflate":
                raw = zlib.decompress(raw)
        except Exception:
            pass
        return raw

    # -- main dispatch
    def _dispatch(self) -> None:
        stub = self.server.stub
        body_bytes = self._read_body()
        split = urlsplit(self.path)
        path, query = split.path, split.query
        headers = {k.lower(): v for k, v in self.headers.items()}
        body: Any = None
        if body_bytes:
            try:
                body = json.loads(body_bytes)
            except Exception:
                body = None
        req = stub._classify(self.command, path, query, headers, body)
        stub._log(req)

        if req.api == "other":
            self._other(req)
            return

        turn = stub._conversation_turn(req)
        if isinstance(turn, tuple):
            self._tool_call(req, *turn)
            return
        reply = StubReply(text=turn) if isinstance(turn, str) else stub._next_reply(req)
        if reply.delay_s > 0:
            if stub._stopping.wait(reply.delay_s):
                self.close_connection = True
                return
        if reply.status != 200:
            self._vendor_error(req, reply)
            return
        if req.output_schema is not None and not reply.tool_calls and req.kind in _GENERATION_KINDS:
            reply = _structured_reply(req, reply)
        if reply.tool_calls and req.kind in _TOOL_CALL_KINDS:
            self._tool_calls(req, reply)
            return
        if req.kind == "count_tokens":
            self._json(200, {"input_tokens": reply.input_tokens}, reply)
        elif req.kind == "countTokens":
            self._json(200, {"totalTokens": reply.input_tokens}, reply)
        elif req.kind == "chat_completions":
            if req.stream:
                self._sse(_chat_events(req, reply), reply, done_marker=True)
            else:
                self._json(200, _chat_completion(req, reply), reply)
        elif req.api == "openai":
            if req.stream:
                self._sse(_openai_events(req, reply), reply)
            else:
                self._json(200, _openai_response(req, reply, status="completed"), reply)
        elif req.api == "gemini":
            if req.stream and parse_qs(req.query).get("alt", [""])[0] == "sse":
                self._sse(_gemini_events(req, reply), reply)
            elif req.stream:  # streamGenerateContent without alt=sse answers a JSON array
                self._json(200, [data for _, data in _gemini_events(req, reply)], reply)
            else:
                self._json(200, _gemini_response(req, reply, final=True), reply)
        elif req.api == "anthropic":
            if req.stream:
                self._sse(_anthropic_events(req, reply), reply)
            else:
                self._json(200, _anthropic_message(req, reply), reply)

    def _tool_calls(self, req: StubRequest, reply: StubReply) -> None:
        if req.api == "openai":
            if req.stream:
                self._sse(_openai_tool_events(req, reply), reply)
            else:
                self._json(200, _openai_tool_response(req, reply), reply)
        elif req.api == "gemini":
            final = _gemini_tool_response(req, reply)
            if req.stream and parse_qs(req.query).get("alt", [""])[0] == "sse":
                self._sse([(None, final)], reply)
            else:
                self._json(200, [final] if req.stream else final, reply)
        elif req.stream:
            self._sse(_anthropic_tool_events(req, reply), reply)
        else:
            self._json(200, _anthropic_tool_message(req, reply), reply)

    def _tool_call(self, req: StubRequest, name: str, arguments: dict[str, Any]) -> None:
        """Answer with a model turn that calls tool ``name`` (the client's own spelling)."""
        reply = StubReply(text="")
        call_id = f"call_stub_{next(_ids)}"
        if req.api == "openai":
            if req.stream:
                self._sse(_openai_call_events(req, reply, call_id, name, arguments), reply)
            else:
                self._json(200, dict(_openai_response(req, reply, status="completed", with_output=False),
                                     output=[_openai_call_item(call_id, name, arguments)]), reply)  # fmt: skip
        elif req.api == "gemini":
            payload = _gemini_call_response(req, reply, name, arguments)
            if req.stream and parse_qs(req.query).get("alt", [""])[0] == "sse":
                self._sse([(None, payload)], reply)
            else:
                self._json(200, [payload] if req.stream else payload, reply)
        elif req.stream:
            self._sse(_anthropic_call_events(req, reply, call_id, name, arguments), reply)
        else:
            message = _anthropic_message(req, reply)
            message.update(content=[_anthropic_tool_use(call_id, name, arguments)], stop_reason="tool_use")
            self._json(200, message, reply)

    def _other(self, req: StubRequest) -> None:
        p = req.path.rstrip("/")
        if p.endswith("/responses") and not self.server.stub.responses_api:
            # How a self-hosted server's web framework answers a route it lacks (FastAPI: vLLM, LiteLLM).
            self._json(404, {"detail": "Not Found"})
            return
        if self.command == "GET" and p.endswith("/models") and "/v1beta" not in p:
            # OpenAI-ish or codex models listing: an empty list is a sensible answer.
            self._json(200, {"object": "list", "data": [], "models": []})
            return
        if self.command == "GET" and (p.endswith("/v1beta/models") or p.endswith("/v1/models")):
            self._json(200, {"models": []})
            return
        self._json(404, {"error": {"message": f"stub: no route for {self.command} {req.path}", "code": 404}})

    # -- writers
    def _send_head(self, status: int, ctype: str, length: int | None, reply: StubReply | None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("x-request-id", f"req_stub_{next(_ids)}")
        self.send_header("request-id", f"req_stub_{next(_ids)}")
        for k, v in reply.headers if reply else ():
            self.send_header(k, v)
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache")
        else:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _json(self, status: int, obj: Any, reply: StubReply | None = None) -> None:
        data = json.dumps(obj).encode()
        try:
            self._send_head(status, "application/json", len(data), reply)
            if self.command != "HEAD":
                self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _sse(self, events: Iterable[tuple[str | None, Any]], reply: StubReply, *, done_marker: bool = False) -> None:
        stub = self.server.stub
        try:
            self._send_head(200, "text/event-stream", None, reply)
            for name, data in events:
                if stub._stopping.is_set():
                    raise ConnectionAbortedError
                chunk = ""
                if name:
                    chunk += f"event: {name}\n"
                chunk += f"data: {json.dumps(data)}\n\n"
                raw = chunk.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
                self.wfile.flush()
            if done_marker:  # Chat Completions streams end with a literal [DONE]
                raw = b"data: [DONE]\n\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _vendor_error(self, req: StubRequest, reply: StubReply) -> None:
        status = reply.status
        msg = reply.error_message or f"stub error {status}"
        obj: Any
        if req.api == "openai":
            etype = _OPENAI_ERROR_TYPE.get(status, "server_error")
            obj = {"error": {"message": msg, "type": etype, "param": None, "code": None}}
        elif req.api == "gemini":
            obj = {"error": {"code": status, "message": msg, "status": _GEMINI_STATUS.get(status, "UNKNOWN")}}
        else:
            etype = _ANTHROPIC_ERROR_TYPE.get(status, "api_error")
            obj = {"type": "error", "error": {"type": etype, "message": msg}}
        self._json(status, obj, reply)


_ids = itertools.count(1)
_GENERATION_KINDS = ("responses", "chat_completions", "generateContent", "streamGenerateContent", "messages")


# ---------------------------------------------------------------------------
# vendor payloads


def _openai_usage(reply: StubReply) -> dict[str, Any]:
    return {
        "input_tokens": reply.input_tokens,
        "input_tokens_details": {"cached_tokens": reply.cached_tokens},
        "output_tokens": reply.output_tokens,
        "output_tokens_details": {"reasoning_tokens": reply.reasoning_tokens},
        "total_tokens": reply.input_tokens + reply.output_tokens,
    }


def _openai_message(msg_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": msg_id,
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        if text or status == "completed"
        else [],
    }


def _openai_response(req: StubRequest, reply: StubReply, *, status: str, with_output: bool = True) -> dict[str, Any]:
    n = next(_ids)
    body = req.body if isinstance(req.body, dict) else {}
    return {
        "id": f"resp_stub_{n}",
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": reply.model or req.model or "stub-model",
        "output": [_openai_message(f"msg_stub_{n}", reply.text)] if with_output else [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": _openai_usage(reply) if status == "completed" else None,
        "user": None,
        "metadata": {},
    }


def _openai_events(req: StubRequest, reply: StubReply) -> Iterator[tuple[str | None, Any]]:
    seq = itertools.count(0)
    base = _openai_response(req, reply, status="in_progress", with_output=False)
    resp_id = base["id"]
    msg_id = resp_id.replace("resp_", "msg_")
    yield "response.created", {"type": "response.created", "sequence_number": next(seq), "response": base}
    yield (
        "response.in_progress",
        {"type": "response.in_progress", "sequence_number": next(seq), "response": base},
    )
    yield (
        "response.output_item.added",
        {
            "type": "response.output_item.added",
            "sequence_number": next(seq),
            "output_index": 0,
            "item": {
                "type": "message",
                "id": msg_id,
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            },
        },
    )
    part0 = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield (
        "response.content_part.added",
        {
            "type": "response.content_part.added",
            "sequence_number": next(seq),
            "item_id": msg_id,
            "output_index": 0,
            "content_index": 0,
            "part": part0,
        },
    )
    for piece in _chunks(reply.text):
        yield (
            "response.output_text.delta",
            {
                "type": "response.output_text.delta",
                "sequence_number": next(seq),
                "item_id": msg_id,
                "output_index": 0,
                "content_index": 0,
                "delta": piece,
                "logprobs": [],
            },
        )
    yield (
        "response.output_text.done",
        {
            "type": "response.output_text.done",
            "sequence_number": next(seq),
            "item_id": msg_id,
            "output_index": 0,
            "content_index": 0,
            "text": reply.text,
            "logprobs": [],
        },
    )
    yield (
        "response.content_part.done",
        {
            "type": "response.content_part.done",
            "sequence_number": next(seq),
            "item_id": msg_id,
            "output_index": 0,
            "content_index": 0,
            "part": {**part0, "text": reply.text},
        },
    )
    item = _openai_message(msg_id, reply.text)
    yield (
        "response.output_item.done",
        {
            "type": "response.output_item.done",
            "sequence_number": next(seq),
            "output_index": 0,
            "item": item,
        },
    )
    done = dict(base, status="completed", output=[item], usage=_openai_usage(reply))
    yield "response.completed", {"type": "response.completed", "sequence_number": next(seq), "response": done}


def _chat_usage(reply: StubReply) -> dict[str, Any]:
    return {
        "prompt_tokens": reply.input_tokens,
        "completion_tokens": reply.output_tokens,
        "total_tokens": reply.input_tokens + reply.output_tokens,
        "prompt_tokens_details": {"cached_tokens": reply.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reply.reasoning_tokens},
    }


def _chat_completion(req: StubRequest, reply: StubReply) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-stub-{next(_ids)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": reply.model or req.model or "stub-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _chat_usage(reply),
    }


def _chat_events(req: StubRequest, reply: StubReply) -> Iterator[tuple[str | None, Any]]:
    base = {
        "id": f"chatcmpl-stub-{next(_ids)}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": reply.model or req.model or "stub-model",
    }
    yield None, {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    for piece in _chunks(reply.text):
        yield None, {**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
    yield None, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": _chat_usage(reply)}


def _gemini_usage(reply: StubReply) -> dict[str, Any]:
    # Gemini counts thoughts apart from the answer (candidates); the cached part is inside the prompt.
    usage: dict[str, Any] = {
        "promptTokenCount": reply.input_tokens,
        "candidatesTokenCount": reply.output_tokens - reply.reasoning_tokens,
        "totalTokenCount": reply.input_tokens + reply.output_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": reply.input_tokens}],
    }
    if reply.cached_tokens:
        usage["cachedContentTokenCount"] = reply.cached_tokens
    if reply.reasoning_tokens:
        usage["thoughtsTokenCount"] = reply.reasoning_tokens
    return usage


def _gemini_response(req: StubRequest, reply: StubReply, *, final: bool, text: str | None = None) -> dict[str, Any]:
    cand: dict[str, Any] = {
        "content": {"role": "model", "parts": [{"text": reply.text if text is None else text}]},
        "index": 0,
    }
    out: dict[str, Any] = {
        "candidates": [cand],
        "modelVersion": reply.model or req.model or "stub-model",
        "responseId": "stub-resp",
    }
    if final:
        cand["finishReason"] = "STOP"
    out["usageMetadata"] = (
        _gemini_usage(reply)
        if final
        else {"promptTokenCount": reply.input_tokens, "totalTokenCount": reply.input_tokens}
    )
    return out


def _gemini_events(req: StubRequest, reply: StubReply) -> Iterator[tuple[str | None, Any]]:
    pieces = _chunks(reply.text)
    for i, piece in enumerate(pieces):
        yield None, _gemini_response(req, reply, final=(i == len(pieces) - 1), text=piece)


def _anthropic_usage(reply: StubReply) -> dict[str, Any]:
    # Anthropic's input_tokens is the part of the prompt neither read from nor written to the cache.
    return {
        "input_tokens": reply.input_tokens - reply.cached_tokens - reply.cache_write_tokens,
        "output_tokens": reply.output_tokens,
        "cache_creation_input_tokens": reply.cache_write_tokens,
        "cache_read_input_tokens": reply.cached_tokens,
    }


def _anthropic_message(req: StubRequest, reply: StubReply) -> dict[str, Any]:
    return {
        "id": f"msg_stub_{next(_ids)}",
        "type": "message",
        "role": "assistant",
        "model": reply.model or req.model or "stub-model",
        "content": [{"type": "text", "text": reply.text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": _anthropic_usage(reply),
    }


def _anthropic_events(req: StubRequest, reply: StubReply) -> Iterator[tuple[str | None, Any]]:
    msg = _anthropic_message(req, reply)
    start = dict(msg, content=[], stop_reason=None, usage=dict(_anthropic_usage(reply), output_tokens=1))
    yield "message_start", {"type": "message_start", "message": start}
    yield (
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    yield "ping", {"type": "ping"}
    for piece in _chunks(reply.text):
        yield (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": piece},
            },
        )
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": reply.output_tokens},
        },
    )
    yield "message_stop", {"type": "message_stop"}


# ---------------------------------------------------------------------------
# tool calls (StubReply.tool_calls) and their results (StubRequest.tool_outputs)

# The generation calls a reply with tool calls can answer (Chat Completions has no tool calls here).
_TOOL_CALL_KINDS = ("responses", "generateContent", "streamGenerateContent", "messages")


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _tool_outputs(api: str, body: dict[str, Any]) -> tuple[str, ...]:
    """The tool results a request sends back, as text, oldest first."""
    found: list[str] = []
    if api == "openai":  # function_call_output, custom_tool_call_output, ...
        for item in _dicts(body.get("input")):
            if str(item.get("type", "")).endswith("_call_output"):
                found.append(_text_of(item.get("output")))
    elif api == "gemini":
        for content in _dicts(body.get("contents")):
            for part in _dicts(content.get("parts")):
                answer = part.get("functionResponse")
                if isinstance(answer, dict):
                    response = answer.get("response")
                    output = response.get("output") if isinstance(response, dict) else None
                    found.append(output if isinstance(output, str) else json.dumps(response))
    elif api == "anthropic":
        for message in _dicts(body.get("messages")):
            for block in _dicts(message.get("content")):
                if block.get("type") == "tool_result":
                    found.append(_text_of(block.get("content"), ("text",)))
    return tuple(found)


def _call_id(call: ToolCall, n: int, i: int) -> str:
    return call.call_id or f"call_stub_{n}_{i}"


def _openai_tool_items(reply: StubReply, n: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [_openai_message(f"msg_stub_{n}", reply.text)] if reply.text else []
    for i, call in enumerate(reply.tool_calls):
        if isinstance(call.arguments, str):  # a freeform tool, e.g. codex's apply_patch
            items.append(
                {
                    "type": "custom_tool_call",
                    "id": f"ctc_stub_{n}_{i}",
                    "call_id": _call_id(call, n, i),
                    "name": call.name,
                    "input": call.arguments,
                    "status": "completed",
                }
            )
        else:
            items.append(
                {
                    "type": "function_call",
                    "id": f"fc_stub_{n}_{i}",
                    "call_id": _call_id(call, n, i),
                    "name": call.name,
                    "arguments": json.dumps(call.arguments),
                    "status": "completed",
                }
            )
    return items


def _openai_tool_response(req: StubRequest, reply: StubReply) -> dict[str, Any]:
    done = _openai_response(req, reply, status="completed")
    return dict(done, output=_openai_tool_items(reply, int(done["id"].rsplit("_", 1)[1])))


def _openai_tool_events(req: StubRequest, reply: StubReply) -> Iterator[tuple[str | None, Any]]:
    seq = itertools.count(0)
    base = _openai_response(req, reply, status="in_progress", with_output=False)
    items = _openai_tool_items(reply, int(base["id"].rsplit("_", 1)[1]))
    yield "response.created", {"type": "response.created", "sequence_number": next(seq), "response": base}
    for index, item in enumerate(items):
        added = {**item, "status": "in_progress"}
        if item["type"] == "function_call":
            added["arguments"] = ""
        yield (
            "response.output_item.added",
            {"type": "response.output_item.added", "sequence_number": next(seq), "output_index": index, "item": added},
        )
        if item["type"] == "function_call":
            yield (
                "response.function_call_arguments.done",
                {
                    "type": "response.function_call_arguments.done",
                    "sequence_number": next(seq),
                    "item_id": item["id"],
                    "output_index": index,
                    "arguments": item["arguments"],
                },
            )
        yield (
            "response.output_item.done",
            {"type": "response.output_item.done", "sequence_number": next(seq), "output_index": index, "item": item},
        )
    done = dict(base, status="completed", output=items, usage=_openai_usage(reply))
    yield "response.completed", {"type": "response.completed", "sequence_number": next(seq), "response": done}


def _object_arguments(call: ToolCall, api: str) -> dict[str, Any]:
    if isinstance(call.arguments, str):
        raise ValueError(f"stub: {api} tools take JSON object arguments, not freeform text ({call.name})")
    return call.arguments


def _gemini_tool_response(req: StubRequest, reply: StubReply) -> dict[str, Any]:
    n = next(_ids)
    parts: list[dict[str, Any]] = [{"text": reply.text}] if reply.text else []
    for i, call in enumerate(reply.tool_calls):
        parts.append(
            {"functionCall": {"id": _call_id(call, n, i), "name": call.name, "args": _object_arguments(call, "gemini")}}
        )
    out = _gemini_response(req, reply, final=True)
    out["candidates"][0]["content"]["parts"] = parts
    return out


def _anthropic_tool_blocks(reply: StubReply) -> list[dict[str, Any]]:
    n = next(_ids)
    blocks: list[dict[str, Any]] = [{"type": "text", "text": reply.text}] if reply.text else []
    for i, call in enumerate(reply.tool_calls):
        blocks.append(
            {
                "type": "tool_use",
                "id": call.call_id or f"toolu_stub_{n}_{i}",
                "name": call.name,
                "input": _object_arguments(call, "anthropic"),
            }
        )
    return blocks


def _anthropic_tool_message(req: StubRequest, reply: StubReply) -> dict[str, Any]:
    return dict(_anthropic_message(req, reply), content=_anthropic_tool_blocks(reply), stop_reason="tool_use")


def _anthropic_tool_events(req: StubRequest, reply: StubReply) -> Iterator[tuple[str | None, Any]]:
    msg = _anthropic_tool_message(req, reply)
    start = dict(msg, content=[], stop_reason=None, usage=dict(_anthropic_usage(reply), output_tokens=1))
    yield "message_start", {"type": "message_start", "message": start}
    for index, block in enumerate(msg["content"]):
        if block["type"] == "text":
            opened: dict[str, Any] = {"type": "text", "text": ""}
            delta: dict[str, Any] = {"type": "text_delta", "text": block["text"]}
        else:
            opened = dict(block, input={})
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": opened}
        yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        yield "content_block_stop", {"type": "content_block_stop", "index": index}


# tool calls: the client's declared tools, the results it sends back, a model turn calling a tool


def declared_tools(req: StubRequest) -> list[str]:
    """Names of the tools the request offers its model (each vendor's declaration shape)."""
    body = req.body if isinstance(req.body, dict) else {}
    names: list[str] = []
    tools = list(body.get("tools") or [])
    for item in body.get("input") or [] if isinstance(body.get("input"), list) else []:
        if isinstance(item, dict) and item.get("type") == "tool_search_output":
            tools.extend(item.get("tools") or [])  # codex offers deferred tools once its search found them
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        if tool.get("type") == "tool_search":  # codex's search over its deferred (MCP) tools
            names.append("tool_search")
        elif tool.get("type") == "namespace":  # Responses namespaces (codex groups an MCP server's tools)
            names.extend(f"{tool.get('name')}/{t['name']}" for t in tool.get("tools") or [] if "name" in t)
        elif isinstance(tool.get("name"), str):  # OpenAI Responses function tools, Anthropic tools
            names.append(tool["name"])
        elif isinstance(tool.get("function"), dict) and isinstance(tool["function"].get("name"), str):
            names.append(tool["function"]["name"])  # Chat Completions
        for group in ("functionDeclarations", "function_declarations"):  # Gemini
            names.extend(d["name"] for d in tool.get(group) or [] if isinstance(d, dict) and "name" in d)
    return names


def _result_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts = [p.get("text") for p in value]
        if all(isinstance(t, str) for t in texts):
            return "\n".join(t for t in texts if t is not None)
    return json.dumps(value)


def tool_results(req: StubRequest) -> list[str]:
    """The tool results the request carries back to its model, oldest first, as text."""
    body = req.body if isinstance(req.body, dict) else {}
    found: list[str] = []
    if req.api == "openai":
        for item in body.get("input") or [] if isinstance(body.get("input"), list) else []:
            kind = item.get("type", "") if isinstance(item, dict) else ""
            if kind.endswith("call_output"):
                found.append(_result_text(item.get("output")))
            elif kind == "tool_search_output":  # what codex's tool search found: the tools it loaded
                found.append(_result_text(item.get("tools")))
        for m in body.get("messages") or []:
            if isinstance(m, dict) and m.get("role") == "tool":
                found.append(_result_text(m.get("content")))
    elif req.api == "gemini":
        for c in body.get("contents") or []:
            for part in c.get("parts") or [] if isinstance(c, dict) else []:
                if isinstance(part, dict) and isinstance(part.get("functionResponse"), dict):
                    response = part["functionResponse"].get("response")
                    # gemini-cli sends a tool's text as {"output": text}
                    output = response.get("output") if isinstance(response, dict) else None
                    found.append(output if isinstance(output, str) else _result_text(response))
    elif req.api == "anthropic":
        for m in body.get("messages") or []:
            content = m.get("content") if isinstance(m, dict) else None
            for block in content if isinstance(content, list) else []:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    found.append(_result_text(block.get("content")))
    return found


def _client_name(declared: list[str], name: str) -> str | None:
    """The declared tool that is ``name``: the same, or prefixed and ending in a separator + name."""
    for d in declared:
        if d == name or (d.endswith(name) and not d[-len(name) - 1].isalnum()):
            return d
    return None


def _openai_call_item(call_id: str, name: str, arguments: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    if name == "tool_search":  # a call of codex's client-side tool search
        return {
            "type": "tool_search_call",
            "id": call_id.replace("call_", "ts_"),
            "call_id": call_id,
            "execution": "client",
            "arguments": arguments,
            "status": status,
        }
    namespace, _, name = name.rpartition("/")  # "namespace/tool" for a tool declared in a namespace
    item = {
        "type": "function_call",
        "id": call_id.replace("call_", "fc_"),
        "call_id": call_id,
        "name": name,
        "arguments": json.dumps(arguments) if status == "completed" else "",
        "status": status,
    }
    return {**item, "namespace": namespace} if namespace else item


def _openai_call_events(
    req: StubRequest, reply: StubReply, call_id: str, name: str, arguments: dict[str, Any]
) -> Iterator[tuple[str | None, Any]]:
    seq = itertools.count(0)
    base = _openai_response(req, reply, status="in_progress", with_output=False)
    item = _openai_call_item(call_id, name, arguments)
    yield "response.created", {"type": "response.created", "sequence_number": next(seq), "response": base}
    yield (
        "response.output_item.added",
        {
            "type": "response.output_item.added",
            "sequence_number": next(seq),
            "output_index": 0,
            "item": _openai_call_item(call_id, name, arguments, status="in_progress"),
        },
    )
    yield (
        "response.function_call_arguments.delta",
        {
            "type": "response.function_call_arguments.delta",
            "sequence_number": next(seq),
            "item_id": item["id"],
            "output_index": 0,
            "delta": item["arguments"],
        },
    )
    yield (
        "response.function_call_arguments.done",
        {
            "type": "response.function_call_arguments.done",
            "sequence_number": next(seq),
            "item_id": item["id"],
            "output_index": 0,
            "arguments": item["arguments"],
        },
    )
    yield (
        "response.output_item.done",
        {"type": "response.output_item.done", "sequence_number": next(seq), "output_index": 0, "item": item},
    )
    done = dict(base, status="completed", output=[item], usage=_openai_usage(reply))
    yield "response.completed", {"type": "response.completed", "sequence_number": next(seq), "response": done}


def _gemini_call_response(req: StubRequest, reply: StubReply, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    out = _gemini_response(req, reply, final=True)
    out["candidates"][0]["content"]["parts"] = [{"functionCall": {"name": name, "args": arguments}}]
    return out


def _anthropic_tool_use(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id.replace("call_", "toolu_"), "name": name, "input": arguments}


def _anthropic_call_events(
    req: StubRequest, reply: StubReply, call_id: str, name: str, arguments: dict[str, Any]
) -> Iterator[tuple[str | None, Any]]:
    msg = _anthropic_message(req, reply)
    start = dict(msg, content=[], stop_reason=None, usage=dict(_anthropic_usage(reply), output_tokens=1))
    block = _anthropic_tool_use(call_id, name, arguments)
    yield "message_start", {"type": "message_start", "message": start}
    yield (
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": dict(block, input={})},
    )
    yield (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": json.dumps(arguments)},
        },
    )
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": reply.output_tokens},
        },
    )
    yield "message_stop", {"type": "message_stop"}


# ---------------------------------------------------------------------------
# public class


class VendorStub:
    """Loopback HTTP stub for the OpenAI, Gemini and Anthropic APIs (see module doc)."""

    def __init__(self, responder: Responder | None = None) -> None:
        self.responder: Responder = responder or default_responder
        self._lock = threading.Lock()
        self._requests: list[StubRequest] = []
        self._script: deque[StubReply] = deque()
        self._conversations: dict[str, tuple[Turn, ...]] = {}
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _StubServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        self.port = 0
        self.responses_api = True  # False: /responses is an unknown route (404), as on many self-hosted servers

    # -- lifecycle
    def start(self) -> VendorStub:
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _StubServer(("127.0.0.1", 0), _Handler)
        server.stub = self
        self._server = server
        self.port = server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"VendorStub:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                c.close()
            except OSError:
                pass
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def __enter__(self) -> VendorStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection
    @property
    def requests(self) -> list[StubRequest]:
        """Snapshot of every request received so far (oldest first)."""
        with self._lock:
            return list(self._requests)

    def requests_for(self, api: str) -> list[StubRequest]:
        with self._lock:
            return [r for r in self._requests if r.api == api]

    def clear(self) -> None:
        """Forget logged requests and any unused scripted replies."""
        with self._lock:
            self._requests.clear()
            self._script.clear()

    # -- scripting
    def script(self, *replies: StubReply | str) -> None:
        """Queue replies used, in order, by the next vendor API calls before the responder."""
        with self._lock:
            for r in replies:
                self._script.append(StubReply(text=r) if isinstance(r, str) else r)

    def converse(self, api: str, *turns: Turn) -> None:
        """Script the tool-using model of ``api``'s requests that declare the called tools (module doc)."""
        with self._lock:
            self._conversations[api] = turns

    # -- internals used by the handler
    def _conversation_turn(self, req: StubRequest) -> tuple[str, dict[str, Any]] | str | None:
        """This request's scripted turn: (client's tool name, arguments), a text, or None (not ours)."""
        with self._lock:
            turns = self._conversations.get(req.api)
        if not turns or req.kind not in _GENERATION_KINDS:
            return None
        declared = declared_tools(req)
        results = tool_results(req)
        if len(results) >= len(turns):
            return None
        turn = turns[len(results)]
        if isinstance(turn, ToolCall) and _client_name(declared, turn.name) is None:
            return None  # a request of another agent of this vendor (a worker), not the scripted client
        if callable(turn) and not isinstance(turn, ToolCall):
            turn = turn(results)
        if isinstance(turn, str):
            return turn
        name = _client_name(declared, turn.name)
        if name is None:  # the script is wrong: say so to the test through the client's output
            return f"stub: the client does not declare {turn.name!r}; it declares {declared}"
        return name, turn.arguments

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _log(self, req: StubRequest) -> None:
        with self._lock:
            self._requests.append(req)

    def _next_reply(self, req: StubRequest) -> StubReply:
        counting = req.kind in ("count_tokens", "countTokens")  # token counts never consume the script
        with self._lock:
            scripted = self._script.popleft() if self._script and not counting else None
        if scripted is not None:
            return scripted
        try:
            return self.responder(req)
        except Exception as exc:  # a broken responder should show up as a vendor 500
            return StubReply(status=500, error_message=f"stub responder raised {exc!r}")

    def _classify(self, method: str, path: str, query: str, headers: dict[str, str], body: Any) -> StubRequest:
        ua = headers.get("user-agent", "")
        b = body if isinstance(body, dict) else {}
        api, kind, model, stream = "other", "", None, False
        users: list[list[str]] = []
        system = ""
        m = _GEMINI_PATH.match(path)
        if method == "POST" and m and m.group(3) in ("generateContent", "streamGenerateContent", "countTokens"):
            api, kind, model = "gemini", m.group(3), m.group(2)
            stream = kind == "streamGenerateContent"
            src = b.get("generateContentRequest") if kind == "countTokens" and "generateContentRequest" in b else b
            users, system = _gemini_texts(src if isinstance(src, dict) else {})
        elif method == "POST" and path.rstrip("/").endswith("/chat/completions"):
            api, kind = "openai", "chat_completions"
            model = b.get("model")
            stream = bool(b.get("stream"))
            users, system = _chat_texts(b)
        elif method == "POST" and path.rstrip("/").endswith("/responses") and self.responses_api:
            api, kind = "openai", "responses"
            model = b.get("model")
            stream = bool(b.get("stream"))
            users, system = _openai_texts(b)
        elif method == "POST" and path.rstrip("/").endswith("/messages/count_tokens"):
            api, kind = "anthropic", "count_tokens"
            model = b.get("model")
            users, system = _anthropic_texts(b)
        elif method == "POST" and path.rstrip("/").endswith("/messages"):
            api, kind = "anthropic", "messages"
            model = b.get("model")
            stream = bool(b.get("stream"))
            users, system = _anthropic_texts(b)
        return StubRequest(
            api=api,
            method=method,
            path=path,
            user_agent=ua,
            model=model if isinstance(model, str) else None,
            prompt="\n".join(t for msg in users for t in msg),
            system=system,
            stream=stream,
            headers=headers,
            query=query,
            kind=kind,
            body=body,
            last_user_text=next((msg[-1] for msg in reversed(users) if msg), ""),
            time=time.time(),
            tool_outputs=_tool_outputs(api, b) if api != "other" else (),
            **_requested_schema(kind, b),
        )


# ---------------------------------------------------------------------------
# structured output (StubRequest.output_schema, StubReply.structured)

# The tool the claude CLI declares for --json-schema, and which its model must call with the answer.
CLAUDE_STRUCTURED_TOOL = "StructuredOutput"


def _requested_schema(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """``output_schema`` (and ``output_tool``) of a request, in each vendor's shape of asking."""
    schema: Any = None
    tool = ""
    if kind == "responses":
        fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            schema = fmt.get("schema")
    elif kind == "chat_completions":
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), dict):
            schema = fmt["json_schema"].get("schema")
    elif kind in ("generateContent", "streamGenerateContent"):
        config = body.get("generationConfig") or body.get("generation_config") or {}
        if isinstance(config, dict):
            for key in ("responseJsonSchema", "responseSchema", "response_json_schema", "response_schema"):
                schema = schema or config.get(key)
    elif kind == "messages":
        tools = {t["name"]: t for t in _dicts(body.get("tools")) if isinstance(t.get("name"), str)}
        choice = body.get("tool_choice")
        if isinstance(choice, dict) and choice.get("type") == "tool" and choice.get("name") in tools:
            tool = choice["name"]
        elif CLAUDE_STRUCTURED_TOOL in tools:
            tool = CLAUDE_STRUCTURED_TOOL
        if tool:
            schema = tools[tool].get("input_schema")
    if not isinstance(schema, dict):
        return {}
    return {"output_schema": schema, "output_tool": tool}


def _named_in(text: str, name: str) -> list[str]:
    """The values of ``NAME: value`` lines of ``text``, in order (case and markup ignored)."""
    line = re.compile(rf"^[\W_]*{re.escape(name)}[\W_]*:\s*(.+?)\s*$", re.I | re.M)
    return [v.strip("`*") for v in line.findall(text)]


def follow_schema(schema: dict[str, Any], text: str) -> Any:
    """An object that follows ``schema`` and says what ``text`` says (module doc)."""
    out: dict[str, Any] = {}
    for name, prop in (schema.get("properties") or {}).items():
        kind = prop.get("type") if isinstance(prop, dict) else None
        if isinstance(prop, dict) and isinstance(prop.get("enum"), list) and prop["enum"]:
            said = [re.sub(r"[\s-]+", "_", v.lower()) for v in _named_in(text, name)]
            named = [v for v in said if v in prop["enum"]]
            out[name] = named[-1] if named else prop["enum"][0]
        elif kind == "string":
            out[name] = text
        elif kind == "array":
            out[name] = _named_in(text, name[:-1] if name.endswith("s") else name)
        elif kind == "object":
            out[name] = follow_schema(prop, text)
    return out


def _structured_reply(req: StubRequest, reply: StubReply) -> StubReply:
    """``reply`` as the answer to a request for a schema-shaped answer: JSON text, or a tool call."""
    assert req.output_schema is not None
    value = reply.structured if reply.structured is not None else follow_schema(req.output_schema, reply.text)
    if req.output_tool:
        return replace(reply, tool_calls=(ToolCall(req.output_tool, value),))
    return replace(reply, text=json.dumps(value))
