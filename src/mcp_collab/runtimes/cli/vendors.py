"""What differs between the three vendor CLIs: argv, and how to read what they print.

Each CLI runs in a line-oriented streaming format (codex ``--json``, gemini and claude
``stream-json``) so that the final text, the usage and the session id are read incrementally,
the output can be bounded without losing the answer, and events become progress messages.
Formats change between versions: parsers ignore events they do not know, and a run that
produced no recognizable final event fails with a message that says so.
An answer may be one line of tens of MB: nothing here copies a line more than a few times, and
what a parser accumulates (messages, streamed pieces) is bounded by the answer cap.
Recorded real outputs per version live in ``fixtures/cli_outputs/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from ...config import DEFAULT_MAX_ANSWER_BYTES
from ...models import Access, Usage
from ..base import StepRequest

MAX_PROGRESS_CHARS = 160
# A streamed answer (gemini's pieces) is joined into ``Parsed.text`` every time while it is this
# small; past it, once it has grown by an eighth, so joining costs a few times the answer, not its
# square, and the partial text a cancel keeps lags the stream by at most an eighth.
JOIN_ALWAYS_BYTES = 64 * 1024
JOIN_GROWTH_DIVISOR = 8


@dataclass
class Parsed:
    """What a parser read from a CLI's stdout."""

    text: str = ""
    usage: Usage | None = None
    session_id: str | None = None
    error: str | None = None
    finished: bool = False  # a final event (turn.completed / result) was seen
    events: int = 0
    messages: list[str] = field(default_factory=list)
    # The size of an answer that outgrew the cap and was not kept (0: none did).
    oversize_answer: int = 0
    max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES
    _messages_bytes: int = field(default=0, init=False, repr=False)

    def add_message(self, text: str) -> None:
        """Keep ``text`` among the messages (the partial output of a run that ends without a final
        answer); the oldest go once they would hold more than the answer cap."""
        self.messages.append(text)
        self._messages_bytes += utf8_len(text)
        while len(self.messages) > 1 and self._messages_bytes > self.max_answer_bytes:
            self._messages_bytes -= utf8_len(self.messages.pop(0))


class OutputParser(Protocol):
    parsed: Parsed

    def feed(self, line: str) -> str | None:
        """Read one stdout line; return a short progress message, or None."""

    def close(self) -> None:
        """The stream ended (or was cut short): bring ``parsed`` up to date with all that was read."""


class Vendor(Protocol):
    name: str  # the binary's name: codex, gemini, claude
    package: str  # the npm package that provides it
    env_prefixes: tuple[str, ...]  # the server variables this CLI reads (its home, keys, endpoints)

    def argv(self, binary: str, request: StepRequest, model: str | None) -> list[str]: ...

    def parser(self, max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES) -> OutputParser: ...


def utf8_len(text: str) -> int:
    """Bytes of ``text`` in UTF-8, without encoding it when it is ASCII (the common case)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _short(text: str) -> str:
    # Only the start is looked at: splitting a 20 MB answer into words would cost hundreds of MB.
    text = " ".join(text[: MAX_PROGRESS_CHARS * 4].split())
    return text if len(text) <= MAX_PROGRESS_CHARS else text[: MAX_PROGRESS_CHARS - 1] + "…"


def _json(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        # strict=False: a raw control character (a NUL) inside a string must not lose the event.
        value = json.loads(line, strict=False)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _usage(inp: Any, out: Any, total: Any = None) -> Usage:
    i, o, t = _int(inp), _int(out), _int(total)
    if t is None and i is not None and o is not None:
        t = i + o
    return Usage(input_tokens=i, output_tokens=o, total_tokens=t)


# -- codex --------------------------------------------------------------------------------------

_CODEX_ACCESS: dict[Access, list[str]] = {
    "read_only": ["-s", "read-only"],
    "workspace_write": ["-s", "workspace-write"],
    "bypass": ["--dangerously-bypass-approvals-and-sandbox"],
}


class CodexParser:
    """``codex exec --json``: thread.started, item.*, turn.completed{usage}, turn.failed, error."""

    def __init__(self, max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES) -> None:
        self.parsed = Parsed(max_answer_bytes=max_answer_bytes)
        self._in = self._out = 0

    def close(self) -> None:
        return None

    def feed(self, line: str) -> str | None:
        event = _json(line)
        if event is None:
            return None
        self.parsed.events += 1
        kind = event.get("type")
        if kind == "thread.started":
            self.parsed.session_id = event.get("thread_id") or self.parsed.session_id
            return "codex: session started"
        if kind == "turn.completed":
            usage = event.get("usage") or {}
            self._in += _int(usage.get("input_tokens")) or 0
            self._out += _int(usage.get("output_tokens")) or 0
            self.parsed.usage = _usage(self._in, self._out)
            self.parsed.finished = True
            return None
        if kind == "turn.failed":
            err = event.get("error") or {}
            self.parsed.error = str(err.get("message") if isinstance(err, dict) else err)
            return _short(f"codex: turn failed: {self.parsed.error}")
        if kind == "error":
            self.parsed.error = str(event.get("message", "error"))
            return _short(f"codex: {self.parsed.error}")
        item = event.get("item")
        if not isinstance(item, dict):
            return None
        item_type = item.get("type")
        if kind == "item.completed" and item_type == "agent_message":
            self.parsed.text = str(item.get("text", ""))
            self.parsed.add_message(self.parsed.text)
            return _short(f"codex: {self.parsed.text}")
        if kind == "item.started" and item_type == "command_execution":
            return _short(f"codex: running {item.get('command', '')}")
        if kind == "item.completed" and item_type == "file_change":
            paths = [c.get("path", "?") for c in item.get("changes", []) if isinstance(c, dict)]
            return _short(f"codex: changed {', '.join(paths)}")
        if kind == "item.completed" and item_type == "reasoning":
            return _short(f"codex: thinking: {item.get('text', '')}")
        return None


class Codex:
    name = "codex"
    package = "@openai/codex"
    env_prefixes: tuple[str, ...] = ("CODEX_", "OPENAI_")

    def argv(self, binary: str, request: StepRequest, model: str | None) -> list[str]:
        argv = [binary, "exec", "--json", "--skip-git-repo-check", *_CODEX_ACCESS[request.access]]
        if request.working_directory is not None:
            argv += ["-C", str(request.working_directory)]
        if model:
            argv += ["-m", model]
        return [*argv, "-"]  # the prompt comes on stdin: it can never be taken for a flag

    def parser(self, max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES) -> OutputParser:
        return CodexParser(max_answer_bytes)


# -- gemini -------------------------------------------------------------------------------------

_GEMINI_APPROVAL: dict[Access, str] = {"read_only": "plan", "workspace_write": "auto_edit", "bypass": "yolo"}


class GeminiParser:
    """``gemini -o stream-json``: init, message (assistant deltas), tool_use, tool_result, error, result."""

    def __init__(self, max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES) -> None:
        self.parsed = Parsed(max_answer_bytes=max_answer_bytes)
        self._chunks: list[str] = []
        self._size = 0  # bytes in _chunks
        self._joined = 0  # of which are in parsed.text

    def close(self) -> None:
        self._join()

    def _join(self) -> None:
        if self._joined != self._size:
            self.parsed.text = "".join(self._chunks)
            self._chunks = [self.parsed.text]
            self._joined = self._size

    def _take(self, content: str, *, delta: bool) -> None:
        if not delta:  # a whole message: it replaces whatever came before
            self.parsed.oversize_answer = 0
            self._chunks, self._size, self._joined = [], 0, -1
        elif self.parsed.oversize_answer:
            self.parsed.oversize_answer += utf8_len(content)
            return
        self._chunks.append(content)
        self._size += utf8_len(content)
        if self._size > self.parsed.max_answer_bytes:
            # Too big to keep: let go of it now, and remember how big it grew for the failure.
            self.parsed.oversize_answer = self._size
            self._chunks, self._size, self._joined = [], 0, 0
            self.parsed.text = ""
            return
        if self._size <= JOIN_ALWAYS_BYTES or self._size - self._joined >= self._joined // JOIN_GROWTH_DIVISOR:
            self._join()

    def feed(self, line: str) -> str | None:
        event = _json(line)
        if event is None:
            return None
        self.parsed.events += 1
        kind = event.get("type")
        if kind == "init":
            self.parsed.session_id = event.get("session_id") or self.parsed.session_id
            return "gemini: session started"
        if kind == "message" and event.get("role") == "assistant":
            content = event.get("content")
            if isinstance(content, str):
                self._take(content, delta=bool(event.get("delta")))
            return None
        if kind == "tool_use":
            return _short(f"gemini: using {event.get('tool_name', 'a tool')}")
        if kind == "error":
            self.parsed.error = str(event.get("message", "error"))
            return _short(f"gemini: {self.parsed.error}")
        if kind == "result":
            self._join()
            self.parsed.finished = True
            if event.get("status") not in (None, "success"):
                err = event.get("error")
                message = err.get("message") if isinstance(err, dict) else err
                self.parsed.error = str(message or f"status {event.get('status')}")
            stats = event.get("stats")
            if isinstance(stats, dict):
                self.parsed.usage = _usage(
                    stats.get("input_tokens", stats.get("input")),
                    stats.get("output_tokens", stats.get("output")),
                    stats.get("total_tokens"),
                )
            if self.parsed.text:
                self.parsed.add_message(self.parsed.text)
            return None
        return None


class Gemini:
    name = "gemini"
    package = "@google/gemini-cli"
    env_prefixes: tuple[str, ...] = ("GEMINI_", "GOOGLE_")

    def argv(self, binary: str, request: StepRequest, model: str | None) -> list[str]:
        argv = [
            binary,
            "-o",
            "stream-json",
            "--skip-trust",
            "--approval-mode",
            _GEMINI_APPROVAL[request.access],
        ]
        if model:
            argv += ["-m", model]
        # `-p ""` turns on headless mode; the prompt itself comes on stdin, which gemini appends,
        # so a task beginning with "--" stays text.
        return [*argv, "-p", ""]

    def parser(self, max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES) -> OutputParser:
        return GeminiParser(max_answer_bytes)


# -- claude -------------------------------------------------------------------------------------

_CLAUDE_PERMISSION: dict[Access, str] = {
    "read_only": "plan",
    "workspace_write": "acceptEdits",
    "bypass": "bypassPermissions",
}


class ClaudeParser:
    """``claude -p --output-format stream-json --verbose``: system/init, assistant, user, result."""

    def __init__(self, max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES) -> None:
        self.parsed = Parsed(max_answer_bytes=max_answer_bytes)

    def close(self) -> None:
        return None

    def feed(self, line: str) -> str | None:
        event = _json(line)
        if event is None:
            return None
        self.parsed.events += 1
        kind = event.get("type")
        if kind == "system" and event.get("subtype") == "init":
            self.parsed.session_id = event.get("session_id") or self.parsed.session_id
            return "claude: session started"
        if kind == "assistant":
            message = event.get("message") or {}
            for block in message.get("content", []) if isinstance(message, dict) else []:
                if not isinstance(block, dict):
                    continue
                if block.get("type") == "text" and block.get("text"):
                    self.parsed.add_message(str(block["text"]))
                    return _short(f"claude: {block['text']}")
                if block.get("type") == "tool_use":
                    return _short(f"claude: using {block.get('name', 'a tool')}")
            return None
        if kind == "result":
            self.parsed.finished = True
            self.parsed.session_id = event.get("session_id") or self.parsed.session_id
            result = event.get("result")
            if isinstance(result, str):
                self.parsed.text = result
            if event.get("is_error") or (event.get("subtype") not in (None, "success")):
                self.parsed.error = str(result or event.get("subtype") or "error")
            usage = event.get("usage")
            if isinstance(usage, dict):
                self.parsed.usage = _usage(usage.get("input_tokens"), usage.get("output_tokens"))
            return None
        return None


class Claude:
    name = "claude"
    package = "@anthropic-ai/claude-code"
    env_prefixes: tuple[str, ...] = ("ANTHROPIC_", "CLAUDE_")

    def argv(self, binary: str, request: StepRequest, model: str | None) -> list[str]:
        argv = [
            binary,
            "-p",
            "--output-format",
            "stream-json",
            "--verbose",
            "--permission-mode",
            _CLAUDE_PERMISSION[request.access],
        ]
        if model:
            argv += ["--model", model]
        return argv  # the prompt comes on stdin

    def parser(self, max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES) -> OutputParser:
        return ClaudeParser(max_answer_bytes)


VENDORS: dict[str, Vendor] = {"codex_cli": Codex(), "gemini_cli": Gemini(), "claude_cli": Claude()}
