"""Every runtime this server has, declared once.

An entry says what a runtime is (its mode name, the worker identities it serves, whether it edits
files), where its code is (imported on first use, so the server starts without loading an SDK),
what it needs (the SDK package, the credential variables, the vendor endpoint in ``Settings``),
which variables it reads, and how it classifies failures (its module's ``failure_table()``). The
rest is derived from here: the modes each identity accepts (``models.COMPATIBLE_MODES``), the
runtimes an orchestrator builds (``orchestrator.default_runtimes``), the readiness checks and rows,
the server's runtime texts, and the tests that every SDK runtime passes.

Adding a runtime: write its module (a class with ``mode``, ``run`` and ``aclose``, and a
``failure_table()``), add its entry here, add its name to ``models.RuntimeMode`` (the one typed list;
a test holds the two equal), and its own tests. This module imports nothing of the package at
load time, so ``models`` can derive from it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ..config import Settings
    from ..models import RuntimeMode, WorkerModel
    from .base import WorkerRuntime
    from .failures import FailureTable


@dataclass(frozen=True)
class Variable:
    """An environment variable a runtime reads: its name, its default, what it does, and how
    ``Settings.from_env`` reads it at start (``text``, ``count``: a whole number above zero; None:
    read and checked elsewhere, listed here for the README and doctor)."""

    name: str
    default: str
    meaning: str
    kind: Literal["text", "count"] | None = "text"


@dataclass(frozen=True)
class RuntimeSpec:
    mode: RuntimeMode
    serves: tuple[WorkerModel, ...]  # worker identities it can run
    summary: str  # what it calls, in a few words (README, doctor)
    implementation: str  # "module:Class", relative to this package; the class takes Settings
    edits_files: bool = False  # SDK runtimes only return text
    package: tuple[str, str] | None = None  # (distribution, import name) of the SDK it needs
    endpoint: str | None = None  # key of Settings.endpoints it calls
    credentials: tuple[str, ...] = ()  # any one of these variables holds its key
    variables: tuple[Variable, ...] = ()
    endpoint_note: Callable[[Settings], str] | None = None  # how it speaks to the endpoint, when it varies

    @property
    def is_sdk(self) -> bool:
        return self.package is not None

    @property
    def identities(self) -> str:
        """Who it serves, as the server's texts say it: 'codex', 'gemini and claude'."""
        names = [s.removesuffix("_cli") for s in self.serves]
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"

    def _module(self) -> Any:
        module, _, _ = self.implementation.partition(":")
        return importlib.import_module(module, __package__)

    def create(self, settings: Settings) -> WorkerRuntime:
        runtime: WorkerRuntime = getattr(self._module(), self.implementation.partition(":")[2])(settings)
        return runtime

    def failures(self) -> FailureTable | None:
        """How it classifies foreign errors (None: the CLI runtime classifies exit codes itself)."""
        table: Callable[[], FailureTable] | None = getattr(self._module(), "failure_table", None)
        return table() if table is not None else None


def _openai_wire(settings: Settings) -> str:
    return {
        "auto": "Responses API, and Chat Completions if a custom endpoint has no /responses "
        "(MCP_COLLAB_OPENAI_WIRE_API=auto)",
        "responses": "Responses API only (MCP_COLLAB_OPENAI_WIRE_API=responses)",
        "chat": "Chat Completions only (MCP_COLLAB_OPENAI_WIRE_API=chat)",
    }[settings.openai_wire_api]


_SPECS = (
    RuntimeSpec(
        mode="cli",
        serves=("codex_cli", "gemini_cli", "claude_cli"),
        summary="the vendor's CLI as a subprocess, in the worker's directory",
        implementation=".cli:CLIRuntime",
        edits_files=True,
        variables=(
            Variable("MCP_COLLAB_CODEX_BIN", "on PATH", "the codex binary", kind=None),
            Variable("MCP_COLLAB_GEMINI_BIN", "on PATH", "the gemini binary", kind=None),
            Variable("MCP_COLLAB_CLAUDE_BIN", "on PATH", "the claude binary", kind=None),
        ),
    ),
    RuntimeSpec(
        mode="openai_sdk",
        serves=("codex_cli",),
        summary="the OpenAI Responses API through the official `openai` client",
        implementation=".openai_sdk:OpenAISDKRuntime",
        package=("openai", "openai"),
        endpoint="openai",
        credentials=("OPENAI_API_KEY",),
        variables=(
            Variable("MCP_COLLAB_OPENAI_MODEL", "gpt-5-codex", "model when the worker sets no sdkModel"),
            Variable("MCP_COLLAB_OPENAI_WIRE_API", "auto", "responses, chat (Chat Completions) or auto", kind=None),
        ),
        endpoint_note=_openai_wire,
    ),
    RuntimeSpec(
        mode="google_sdk",
        serves=("gemini_cli",),
        summary="the Gemini API through the official `google-genai` client",
        implementation=".google_sdk:GoogleSDKRuntime",
        package=("google-genai", "google.genai"),
        endpoint="gemini",
        credentials=("GEMINI_API_KEY", "GOOGLE_API_KEY"),
        variables=(Variable("MCP_COLLAB_GEMINI_MODEL", "gemini-2.5-pro", "model when the worker sets no sdkModel"),),
    ),
    RuntimeSpec(
        mode="anthropic_sdk",
        serves=("claude_cli",),
        summary="the Anthropic Messages API through the official `anthropic` client",
        implementation=".anthropic_sdk:AnthropicSDKRuntime",
        package=("anthropic", "anthropic"),
        endpoint="anthropic",
        credentials=("ANTHROPIC_API_KEY",),
        variables=(
            # Not claude-sonnet-4-5: the anthropic client lists it as retiring and warns on every call.
            Variable("MCP_COLLAB_ANTHROPIC_MODEL", "claude-sonnet-5-5", "model when the worker sets no sdkModel"),
            # The Messages API requires a ceiling; this one stays under the client's guard against
            # non-streaming calls that could run past 10 minutes (about 21k tokens).
            Variable("MCP_COLLAB_ANTHROPIC_MAX_TOKENS", "16000", "longest answer of a step, in tokens", "count"),
        ),
    ),
)

# By mode, in the order the server's texts and readiness list them.
RUNTIMES: dict[RuntimeMode, RuntimeSpec] = {spec.mode: spec for spec in _SPECS}


def sdk_runtimes() -> list[RuntimeSpec]:
    return [spec for spec in RUNTIMES.values() if spec.is_sdk]


def modes_for(identity: WorkerModel) -> tuple[RuntimeMode, ...]:
    """The modes that can run a worker identity, in registry order."""
    return tuple(spec.mode for spec in RUNTIMES.values() if identity in spec.serves)
