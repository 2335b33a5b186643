"""A scripted runtime for tests of orchestration (ours and yours).

``ScriptedRuntime`` plays replies in order, or asks a function, and records every request, so a
test can drive the orchestrator, its strategies and its fallback policy without a vendor::

    cli = ScriptedRuntime("cli", [Reply("done")])
    sdk = ScriptedRuntime("openai_sdk", [RuntimeUnavailable("no key", code="missing_credentials")])
    orchestrator = WorkerOrchestrator(settings, store, runtimes={"cli": cli, "openai_sdk": sdk})
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio

from .errors import RuntimeFailure, RuntimeFatal
from .models import RuntimeMode, Usage
from .runtimes.base import RuntimeResult, StepRequest

__all__ = ["Reply", "ScriptedRuntime"]


@dataclass(frozen=True)
class Reply:
    text: str
    input_tokens: int = 10
    output_tokens: int = 5
    session_id: str | None = None
    delay_s: float = 0.0
    progress: tuple[str, ...] = ()
    # The schema-shaped answer a judging step asked for (``StepRequest.output_schema``), e.g.
    # ``{"reasons": "...", "verdict": "approve"}``; given only when the request asked for one.
    structured: Any = None


Script = Reply | RuntimeFailure


class ScriptedRuntime:
    def __init__(
        self,
        mode: RuntimeMode,
        script: Iterable[Script] = (),
        *,
        respond: Callable[[StepRequest], Script] | None = None,
    ) -> None:
        self.mode = mode
        self.script: list[Script] = list(script)
        self.respond = respond
        self.requests: list[StepRequest] = []

    async def aclose(self) -> None:
        return None

    async def run(self, request: StepRequest) -> RuntimeResult:
        self.requests.append(request)
        if self.script:
            item = self.script.pop(0)
        elif self.respond is not None:
            item = self.respond(request)
        else:
            raise RuntimeFatal(f"ScriptedRuntime({self.mode}) has no reply left", code="script_exhausted")
        if isinstance(item, RuntimeFailure):
            raise item
        for message in item.progress:
            request.on_progress(message)
        if item.delay_s:
            await anyio.sleep(item.delay_s)
        return RuntimeResult(
            text=item.text,
            usage=Usage(
                input_tokens=item.input_tokens,
                output_tokens=item.output_tokens,
                total_tokens=item.input_tokens + item.output_tokens,
            ),
            session_id=item.session_id or f"{self.mode}-session-{len(self.requests)}",
            exit_code=0 if self.mode == "cli" else None,
            structured=item.structured if request.output_schema is not None else None,
        )
