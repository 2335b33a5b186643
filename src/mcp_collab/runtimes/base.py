"""The runtime seam: one small protocol every runtime implements, one normalized result."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..models import Access, RuntimeMode, Usage, Worker

_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.S)

ProgressSink = Callable[[str], None]
SpawnSink = Callable[[int], Awaitable[None]]


def _ignore(_: str) -> None:
    return None


class PartialOutput:
    """What a step has produced so far, kept by the runtime so a cancelled step keeps its work."""

    def __init__(self) -> None:
        self.text = ""


@dataclass(frozen=True)
class StepRequest:
    """Everything a runtime needs to run one step; nothing it should look up itself."""

    worker: Worker
    prompt: str
    instructions: str
    access: Access
    timeout_s: float
    idle_timeout_s: float
    working_directory: Path | None = None
    # Where a child process starts: the step's directory as opened and checked when the step
    # started (security.pin), so a path swapped since cannot send it elsewhere. Unset: the path.
    child_cwd: Path | None = None
    on_progress: ProgressSink = field(default=_ignore, compare=False)
    on_spawn: SpawnSink | None = field(default=None, compare=False)  # told the pid of a CLI it starts
    partial: PartialOutput = field(default_factory=PartialOutput, compare=False)
    # A follow-up in an earlier conversation: the runtime resumes the vendor's own session.
    resume: Resume | None = None
    # A JSON Schema the final answer should follow (a judging step's verdict, findings, choice). A
    # runtime that can ask its vendor for schema-shaped output does, and returns the object in
    # ``RuntimeResult.structured``; one that cannot ignores it (the prompt asks for text lines too).
    output_schema: dict[str, Any] | None = field(default=None, compare=False)


# The name a schema-shaped answer goes by where a vendor wants one (the Responses API's format name,
# the Messages API's tool): letters, digits and underscores, as every vendor accepts.
OUTPUT_SCHEMA_NAME = "final_answer"


@dataclass(frozen=True)
class Resume:
    """A follow-up in an earlier conversation. The request's ``prompt`` carries the recorded history
    and the follow-up, so a runtime that cannot resume (or finds the session gone) just runs it; one
    that can resumes ``session_id`` (a CLI's session, a Responses API response id) and sends only
    ``message``, and says so in ``RuntimeResult.resumed``."""

    session_id: str
    message: str


@dataclass(frozen=True)
class RuntimeResult:
    text: str
    usage: Usage | None = None
    session_id: str | None = None
    exit_code: int | None = None
    duration_ms: int = 0
    truncated: bool = False
    resumed: bool = False  # the vendor's own session was resumed (see StepRequest.resume)
    # The schema-shaped answer to ``StepRequest.output_schema`` as the vendor gave it (parsed JSON, not
    # yet checked against the schema); None: none was asked for, or this runtime cannot ask for one.
    structured: Any = None
    # Asked for a schema-shaped answer, the runtime could not read one: why (the caller reads the text).
    structured_error: str | None = None
    model: str | None = None  # the model the vendor says it used (else the one requested)
    cost_usd: float | None = None  # the vendor's own figure for what the step cost, when it gives one
    cli_version: str | None = None  # the CLI's --version, for a CLI step


class WorkerRuntime(Protocol):
    """Runs one step. Returns a result or raises a classified ``RuntimeFailure``; never anything else.
    ``aclose`` releases what it holds between steps (an SDK's HTTP connections); the orchestrator
    calls it once, at its own close."""

    mode: RuntimeMode

    async def run(self, request: StepRequest) -> RuntimeResult: ...

    async def aclose(self) -> None: ...


def structured_from_text(text: str, source: str) -> tuple[Any, str | None]:
    """A schema-shaped answer that came as text (the Responses API's output, a CLI's final message):
    the JSON object in it and None, or None and why there is none (``source`` names the text)."""
    body = text.strip()
    fence = _FENCE.fullmatch(body)  # a model may still wrap its JSON in a Markdown fence
    if fence is not None:
        body = fence.group(1)
    if not body:
        return None, f"{source} is empty"
    try:
        value = json.loads(body)
    except json.JSONDecodeError as exc:
        return None, f"{source} is not JSON ({exc.msg} at character {exc.pos})"
    if not isinstance(value, dict):
        return None, f"{source} is JSON but not an object"
    return value, None
