"""What differs between the three vendor CLIs: argv, and how to read what they print.

Each CLI runs in a line-oriented streaming format (codex ``--json``, gemini and claude
``stream-json``) so that the final text, the usage and the session id are read incrementally,
the output can be bounded without losing the answer, and events become progress messages.
Formats change between versions: parsers ignore events they do not know, and a run that
produced no recognizable final event fails with a message that says so.
An answer may be one line of tens of MB: nothing here copies a line more than a few times, and
what a parser accumulates (messages, streamed pieces) is bounded by the answer cap.
Recorded real outputs per version live in ``fixtures/cli_outputs/``.

Each vendor also says which endpoint its CLI will call and what the server hands it so that the
one variable a user set (``OPENAI_BASE_URL``, ``GOOGLE_GEMINI_BASE_URL``, ``ANTHROPIC_BASE_URL``)
reaches it: codex ignores ``OPENAI_BASE_URL`` and gets a provider through ``-c`` overrides; gemini
refuses a base URL without API-key auth selected in its settings and gets a home of the server's
making; claude reads its variable itself. Nothing here edits the user's own CLI configuration.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from ...config import DEFAULT_MAX_ANSWER_BYTES, Settings
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
    model: str | None = None  # the model the CLI says it used
    cost_usd: float | None = None  # the CLI's own figure for the dollars spent (claude)
    error: str | None = None
    finished: bool = False  # a final event (turn.completed / result) was seen
    events: int = 0
    messages: list[str] = field(default_factory=list)
    # The size of an answer that outgrew the cap and was not kept (0: none did).
    oversize_answer: int = 0
    # The CLI says it cannot reach its endpoint and will keep trying: the step gives up with this.
    unreachable: str | None = None
    # The schema-shaped answer, where the CLI reports it apart from its text (claude's structured_output).
    structured: Any = None
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


@dataclass(frozen=True)
class EndpointPlan:
    """Which endpoint a vendor's CLI will call, and what the server hands the CLI so that it does."""

    url: str  # shown form (no credentials): what the CLI will call
    source: str  # where that comes from, in words: "OPENAI_BASE_URL", "codex's own configuration"
    how: str = ""  # what the server does for it, in words (for doctor)
    argv: tuple[str, ...] = ()  # extra arguments before the prompt (codex's -c overrides)
    env: Mapping[str, str] = field(default_factory=dict)  # set in the child's environment
    files: tuple[tuple[Path, str], ...] = ()  # written (atomically, owner-only) before the CLI starts
    problem: str | None = None  # why the CLI cannot use this endpoint: the step fails as unavailable
    custom: bool = False  # a base URL the user set, not the vendor's own API


# How a CLI takes a JSON Schema for its final answer: its option, and whether the option's value is a
# file holding the schema or the schema's text.
SchemaOption = tuple[str, Literal["file", "text"]]


class Vendor(Protocol):
    name: str  # the binary's name: codex, gemini, claude
    package: str  # the npm package that provides it
    env_prefixes: tuple[str, ...]  # the server variables this CLI reads (its home, keys, endpoints)
    schema_option: SchemaOption | None  # None: this CLI cannot shape its answer by a schema

    def argv(self, binary: str, request: StepRequest, model: str | None, extra: tuple[str, ...] = ()) -> list[str]: ...

    def resume_argv(
        self, binary: str, request: StepRequest, model: str | None, extra: tuple[str, ...], session_id: str
    ) -> list[str] | None:
        """The command that resumes ``session_id`` with the follow-up on stdin; None: this CLI cannot."""

    def endpoint(self, settings: Settings) -> EndpointPlan: ...

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


def _usage(
    inp: Any, out: Any, total: Any = None, *, cached: Any = None, written: Any = None, reasoning: Any = None
) -> Usage:
    i, o, t = _int(inp), _int(out), _int(total)
    if t is None and i is not None and o is not None:
        t = i + o
    return Usage(
        input_tokens=i,
        output_tokens=o,
        total_tokens=t,
        cached_input_tokens=_int(cached),
        cache_write_tokens=_int(written),
        reasoning_tokens=_int(reasoning),
    )


def _text(value: Any) -> str | None:
    return value.strip()[:200] or None if isinstance(value, str) else None


# -- codex --------------------------------------------------------------------------------------

_CODEX_SANDBOX_MODE: dict[str, str] = {"read_only": "read-only", "workspace_write": "workspace-write"}
_CODEX_ACCESS: dict[Access, list[str]] = {
    "read_only": ["-s", "read-only"],
    "workspace_write": ["-s", "workspace-write"],
    "bypass": ["--dangerously-bypass-approvals-and-sandbox"],
}


# codex with its endpoint down prints "Reconnecting... waiting for network" on stdout forever (5, 10,
# 20 s apart, whatever its retry settings), so neither its exit nor the idle watchdog ends the step.
# The fourth in a row is 35 s without a connection: long enough to ride out a blip, then the step fails.
CODEX_RECONNECTS_BEFORE_GIVING_UP = 4
_CODEX_RECONNECTING = "Reconnecting..."


class CodexParser:
    """``codex exec --json``: thread.started, item.*, turn.completed{usage}, turn.failed, error."""

    def __init__(self, max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES) -> None:
        self.parsed = Parsed(max_answer_bytes=max_answer_bytes)
        self._reconnects = 0  # "Reconnecting..." errors in a row

    def close(self) -> None:
        return None

    def feed(self, line: str) -> str | None:
        event = _json(line)
        if event is None:
            return None
        self.parsed.events += 1
        kind = event.get("type")
        if kind == "error" and str(event.get("message", "")).startswith(_CODEX_RECONNECTING):
            # Not a failure of the step (codex may get through), unless it never does.
            self._reconnects += 1
            if self._reconnects >= CODEX_RECONNECTS_BEFORE_GIVING_UP:
                self.parsed.unreachable = str(event["message"])
            return _short(f"codex: {event['message']}")
        self._reconnects = 0
        if kind == "thread.started":
            self.parsed.session_id = event.get("thread_id") or self.parsed.session_id
            return "codex: session started"
        if kind == "turn.completed":
            # codex counts the prompt whole (cached_input_tokens is part of input_tokens) and the
            # answer whole (reasoning_output_tokens part of output_tokens), as the Responses API does.
            usage = event.get("usage")
            if isinstance(usage, dict):
                turn = _usage(
                    usage.get("input_tokens"),
                    usage.get("output_tokens"),
                    cached=usage.get("cached_input_tokens"),
                    written=usage.get("cache_write_input_tokens"),
                    reasoning=usage.get("reasoning_output_tokens"),
                )
                self.parsed.usage = turn if self.parsed.usage is None else self.parsed.usage + turn
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


# The provider the server defines for codex when OPENAI_BASE_URL is set (codex 0.169 ignores that
# variable). Its own name, so a provider of the same name in the user's config.toml is not reused.
CODEX_PROVIDER_ID = "mcp_collab"
# codex retries a failing request about 30 times over 25 s by default; a step fails at once instead,
# and the caller decides whether to run it again.
CODEX_PROVIDER_RETRIES = 0


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string (a JSON string is one, when non-ASCII stays unescaped:
    TOML refuses JSON's surrogate-pair escapes)."""
    return json.dumps(value, ensure_ascii=False)


class Codex:
    name = "codex"
    package = "@openai/codex"
    env_prefixes: tuple[str, ...] = ("CODEX_", "OPENAI_")
    # `exec` and `exec resume` both take it; the final agent message is then the JSON object.
    schema_option: SchemaOption | None = ("--output-schema", "file")

    def argv(self, binary: str, request: StepRequest, model: str | None, extra: tuple[str, ...] = ()) -> list[str]:
        argv = [binary, "exec", "--json", "--skip-git-repo-check", *_CODEX_ACCESS[request.access], *extra]
        if request.working_directory is not None:
            argv += ["-C", str(request.working_directory)]
        if model:
            argv += ["-m", model]
        return [*argv, "-"]  # the prompt comes on stdin: it can never be taken for a flag

    def resume_argv(
        self, binary: str, request: StepRequest, model: str | None, extra: tuple[str, ...], session_id: str
    ) -> list[str] | None:
        # `exec resume` takes no -s or -C: the sandbox goes as a config override, and the session is
        # found in (and runs in) the process's own directory, the step's.
        access = (
            ["--dangerously-bypass-approvals-and-sandbox"]
            if request.access == "bypass"
            else ["-c", f"sandbox_mode={toml_string(_CODEX_SANDBOX_MODE[request.access])}"]
        )
        argv = [binary, "exec", "resume", "--json", "--skip-git-repo-check", *access, *extra]
        if model:
            argv += ["-m", model]
        return [*argv, "--", session_id, "-"]

    def endpoint(self, settings: Settings) -> EndpointPlan:
        ep = settings.endpoints["openai"]
        if not ep.custom:
            return EndpointPlan(url=ep.shown, source="codex's own configuration ($CODEX_HOME/config.toml or its login)")
        assert ep.url is not None
        if settings.openai_wire_api == "chat":
            return EndpointPlan(
                url=ep.shown,
                source=ep.variable,
                custom=True,
                problem=(
                    "MCP_COLLAB_OPENAI_WIRE_API=chat says the endpoint has no Responses API, and the codex CLI "
                    'speaks only the Responses API (codex 0.169 refuses wire_api "chat"); run this worker with '
                    "runtimeMode openai_sdk, which speaks Chat Completions, or set MCP_COLLAB_OPENAI_WIRE_API="
                    "responses (or auto) if the endpoint serves /responses"
                ),
            )
        provider = f"model_providers.{CODEX_PROVIDER_ID}"
        overrides = [
            f"model_provider={toml_string(CODEX_PROVIDER_ID)}",
            f"{provider}.name={toml_string(f'{ep.variable} (set by mcp-collab)')}",
            f"{provider}.base_url={toml_string(ep.url)}",
            f"{provider}.wire_api={toml_string('responses')}",
            f"{provider}.request_max_retries={CODEX_PROVIDER_RETRIES}",
            f"{provider}.stream_max_retries={CODEX_PROVIDER_RETRIES}",
        ]
        key_note = "no key (OPENAI_API_KEY is not set)"
        if settings.environ.get("OPENAI_API_KEY", "").strip():
            # The provider names the variable; the key itself never appears in argv (ps shows argv).
            overrides.append(f"{provider}.env_key={toml_string('OPENAI_API_KEY')}")
            key_note = "the key from OPENAI_API_KEY"
        return EndpointPlan(
            url=ep.shown,
            source=ep.variable,
            custom=True,
            how=(
                f"the server hands codex a provider through -c overrides (wire_api responses, {key_note}, "
                f"retries {CODEX_PROVIDER_RETRIES}); $CODEX_HOME/config.toml is left as it is"
            ),
            argv=tuple(a for o in overrides for a in ("-c", o)),
        )

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
            self.parsed.model = _text(event.get("model")) or self.parsed.model
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
                # input_tokens is the whole prompt, ``cached`` the part of it read from the cache.
                self.parsed.usage = _usage(
                    stats.get("input_tokens", stats.get("input")),
                    stats.get("output_tokens", stats.get("output")),
                    stats.get("total_tokens"),
                    cached=stats.get("cached"),
                    reasoning=stats.get("thoughts", stats.get("thoughts_tokens")),
                )
                models = stats.get("models")
                if isinstance(models, dict) and models:
                    self.parsed.model = ", ".join(str(m)[:100] for m in models)
            if self.parsed.text:
                self.parsed.add_message(self.parsed.text)
            return None
        return None


# The home the server makes for gemini when GOOGLE_GEMINI_BASE_URL is set, under its state dir.
GEMINI_HOME_DIR = "gemini-home"
# What the server's gemini home settles, over whatever the user's own settings say: API-key auth
# (a base URL with any other auth exits 41), no folder-trust prompt (headless: exit 55), nothing sent
# elsewhere than the endpoint, and one attempt per request (10 by default: minutes on a 500 or 429),
# so a failure reaches the step at once.
GEMINI_ENDPOINT_SETTINGS: dict[str, dict[str, Any]] = {
    "security": {"auth": {"selectedType": "gemini-api-key"}, "folderTrust": {"enabled": False}},
    "privacy": {"usageStatisticsEnabled": False},
    "telemetry": {"enabled": False},
    "general": {"maxAttempts": 1},
}
# gemini's settings are JSON with comments; these match a string (kept) or a comment (dropped).
_JSONC_TOKENS = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/', re.DOTALL)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base``, key by key at every depth; neither is changed."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping):
            below = merged.get(key)
            merged[key] = _merge(below if isinstance(below, Mapping) else {}, value)
        else:
            merged[key] = value
    return merged


def user_gemini_settings(settings: Settings) -> tuple[Path, dict[str, Any] | None, str | None]:
    """The user's own gemini settings file, what it holds (None: absent or unreadable), and why it
    could not be read."""
    env = settings.environ
    home = env.get("GEMINI_CLI_HOME") or env.get("HOME") or os.path.expanduser("~")
    path = Path(home) / ".gemini" / "settings.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return path, None, None
    except (OSError, UnicodeDecodeError) as exc:
        return path, None, f"cannot read it ({exc.__class__.__name__})"
    stripped = _JSONC_TOKENS.sub(lambda m: m.group() if m.group().startswith('"') else "", text)
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError as exc:
        return path, None, f"it is not JSON (line {exc.lineno})"
    if not isinstance(value, dict):
        return path, None, "it is not a JSON object"
    return path, value, None


class Gemini:
    name = "gemini"
    package = "@google/gemini-cli"
    env_prefixes: tuple[str, ...] = ("GEMINI_", "GOOGLE_")
    schema_option: SchemaOption | None = None  # gemini 0.61 has no option for it in headless mode

    def argv(self, binary: str, request: StepRequest, model: str | None, extra: tuple[str, ...] = ()) -> list[str]:
        argv = [
            binary,
            "-o",
            "stream-json",
            "--skip-trust",
            "--approval-mode",
            _GEMINI_APPROVAL[request.access],
            *extra,
        ]
        if model:
            argv += ["-m", model]
        # `-p ""` turns on headless mode; the prompt itself comes on stdin, which gemini appends,
        # so a task beginning with "--" stays text.
        return [*argv, "-p", ""]

    def resume_argv(
        self, binary: str, request: StepRequest, model: str | None, extra: tuple[str, ...], session_id: str
    ) -> list[str] | None:
        return None  # gemini 0.61 resumes only "latest" or a list index of its project: not one session by id

    def endpoint(self, settings: Settings) -> EndpointPlan:
        ep = settings.endpoints["gemini"]
        if not ep.custom:
            return EndpointPlan(url=ep.shown, source="gemini's own settings and login")
        env = settings.environ
        child_env: dict[str, str] = {}
        if not env.get("GEMINI_API_KEY", "").strip():
            if not env.get("GOOGLE_API_KEY", "").strip():
                return EndpointPlan(
                    url=ep.shown,
                    source=ep.variable,
                    custom=True,
                    problem=(
                        f"{ep.variable} is set but neither GEMINI_API_KEY nor GOOGLE_API_KEY is: the gemini CLI "
                        "reaches a base URL only with API-key auth; export GEMINI_API_KEY (any value, if the "
                        "endpoint takes none)"
                    ),
                )
            child_env["GEMINI_API_KEY"] = env["GOOGLE_API_KEY"]  # the one gemini's API-key auth reads
        # The user's own settings are the base (their MCP servers, model and tool settings make the
        # worker behave like their gemini); only what a base URL needs is settled over them. The copy
        # lives in the server's state dir and is owner-only: settings may hold tokens.
        user_path, user, unreadable = user_gemini_settings(settings)
        merged = _merge(user or {}, GEMINI_ENDPOINT_SETTINGS)
        merged["security"]["auth"].pop("enforcedType", None)  # a user-level pin to another auth exits 41
        home = settings.state_dir / GEMINI_HOME_DIR
        child_env["GEMINI_CLI_HOME"] = str(home)
        if user is not None:
            based = f"your {user_path.name} merged under it"
        elif unreadable:
            based = f"your {user_path} not used: {unreadable}"
        else:
            based = "you have no settings of your own"
        return EndpointPlan(
            url=ep.shown,
            source=ep.variable,
            custom=True,
            how=(
                "the server runs gemini with its own GEMINI_CLI_HOME (in the state dir) whose settings select "
                f"gemini-api-key auth, folder trust off, telemetry off, maxAttempts 1 ({based})"
            ),
            env=child_env,
            files=((home / ".gemini" / "settings.json", json.dumps(merged, indent=2, ensure_ascii=False) + "\n"),),
        )

    def parser(self, max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES) -> OutputParser:
        return GeminiParser(max_answer_bytes)


# -- claude -------------------------------------------------------------------------------------

_CLAUDE_PERMISSION: dict[Access, str] = {
    "read_only": "plan",
    "workspace_write": "acceptEdits",
    "bypass": "bypassPermissions",
}


# Retries claude makes against a custom endpoint unless the user set CLAUDE_CODE_MAX_RETRIES:
# none, as for codex and gemini, so a failing endpoint fails the step at once.
CLAUDE_ENDPOINT_RETRIES = 0


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
            self.parsed.model = _text(event.get("model")) or self.parsed.model
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
            if event.get("structured_output") is not None:
                self.parsed.structured = event["structured_output"]
            if event.get("is_error") or (event.get("subtype") not in (None, "success")):
                self.parsed.error = str(result or event.get("subtype") or "error")
            usage = event.get("usage")
            if isinstance(usage, dict):
                self.parsed.usage = _claude_usage(usage)
            cost = event.get("total_cost_usd")
            if isinstance(cost, (int, float)) and not isinstance(cost, bool) and cost >= 0:
                self.parsed.cost_usd = float(cost)
            models = event.get("modelUsage")
            if isinstance(models, dict) and models:
                # Every model the session used (claude may hand small tasks to a smaller one).
                self.parsed.model = ", ".join(str(m)[:100] for m in models)
            return None
        return None


def _claude_usage(usage: dict[str, Any]) -> Usage:
    """claude counts the prompt in three parts (fresh, written to the cache, read from it): the input
    is all three, as the other vendors count it, with the cached parts kept apart."""
    fresh, written, read = (
        _int(usage.get(k)) for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )
    details = usage.get("output_tokens_details")
    thinking = details.get("thinking_tokens") if isinstance(details, dict) else None
    prompt = None if fresh is None and written is None and read is None else (fresh or 0) + (written or 0) + (read or 0)
    return _usage(prompt, usage.get("output_tokens"), cached=read, written=written, reasoning=thinking)


class Claude:
    name = "claude"
    package = "@anthropic-ai/claude-code"
    env_prefixes: tuple[str, ...] = ("ANTHROPIC_", "CLAUDE_")
    # claude declares a StructuredOutput tool its model must call; the result event carries the call's
    # input as structured_output (and its result text is that JSON).
    schema_option: SchemaOption | None = ("--json-schema", "text")

    def argv(self, binary: str, request: StepRequest, model: str | None, extra: tuple[str, ...] = ()) -> list[str]:
        argv = [
            binary,
            "-p",
            "--output-format",
            "stream-json",
            "--verbose",
            "--permission-mode",
            _CLAUDE_PERMISSION[request.access],
            *extra,
        ]
        if model:
            argv += ["--model", model]
        return argv  # the prompt comes on stdin

    def resume_argv(
        self, binary: str, request: StepRequest, model: str | None, extra: tuple[str, ...], session_id: str
    ) -> list[str] | None:
        return [*self.argv(binary, request, model, extra), "--resume", session_id]

    def endpoint(self, settings: Settings) -> EndpointPlan:
        ep = settings.endpoints["anthropic"]
        if not ep.custom:
            return EndpointPlan(url=ep.shown, source="claude's own login or ANTHROPIC_API_KEY")
        # claude reads ANTHROPIC_BASE_URL itself (it passes with the ANTHROPIC_ prefix); it retries a
        # 500 or 429 with backoff for minutes unless told not to. A value the user set is kept.
        env: dict[str, str] = {}
        retries = settings.environ.get("CLAUDE_CODE_MAX_RETRIES", "").strip()
        if not retries:
            env["CLAUDE_CODE_MAX_RETRIES"] = str(CLAUDE_ENDPOINT_RETRIES)
        return EndpointPlan(
            url=ep.shown,
            source=ep.variable,
            custom=True,
            how=f"claude reads {ep.variable} itself; CLAUDE_CODE_MAX_RETRIES={retries or CLAUDE_ENDPOINT_RETRIES}"
            + (" (yours)" if retries else " (set by the server, so a failure reaches the step at once)"),
            env=env,
        )

    def parser(self, max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES) -> OutputParser:
        return ClaudeParser(max_answer_bytes)


VENDORS: dict[str, Vendor] = {"codex_cli": Codex(), "gemini_cli": Gemini(), "claude_cli": Claude()}
