"""Pydantic models at the boundaries: worker profiles, runs, steps, attempts, the runtime policy.

Field names are snake_case in Python and camelCase on the wire (``runtimeMode``, ``fallbackFrom``,
``workerName``), as the original plan names them. Everything persisted or returned to a client is
one of these models; ``contracts/`` holds their JSON Schema (``python -m mcp_collab.contracts``).
"""

# No ``from __future__ import annotations`` here, unlike elsewhere: pydantic would evaluate every
# field's annotation (about 180) from its text when the models are created, at import, on serve's
# path to its first answer. The few names used before their class exists are quoted.

import collections
import functools
import re
import secrets
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator
from pydantic.alias_generators import to_camel

from .errors import QUOTE_CHARS, shown
from .runtimes.registry import RUNTIMES, modes_for
from .security import Redactor

# The one hand-written list of runtimes besides their registry (runtimes/registry.py): mypy and the
# JSON Schema need a literal type, which cannot be computed; tests hold it equal to the registry.
RuntimeMode = Literal["cli", "openai_sdk", "google_sdk", "anthropic_sdk"]
WorkerModel = Literal["codex_cli", "gemini_cli", "claude_cli"]
FallbackPolicy = Literal["on_error", "never"]
RunStatus = Literal["queued", "running", "completed", "failed", "cancelled", "interrupted"]
StepStatus = Literal["pending", "running", "completed", "failed", "cancelled", "interrupted", "skipped"]
AttemptStatus = Literal["completed", "failed", "cancelled"]
ErrorKind = Literal["unavailable", "transient", "fatal"]
Access = Literal["read_only", "workspace_write", "bypass"]
Verdict = Literal["approve", "request_changes", "pass", "fail", "unknown"]
Continuation = Literal["session", "history"]
VerdictSource = Literal["structured", "text"]
# Where a step's dollars come from: the vendor's own figure (claude's total_cost_usd), the price
# table (pricing.py, or the operator's MCP_COLLAB_PRICES), or nowhere (no price for its model).
CostSource = Literal["vendor", "price_table", "unknown"]

RUNTIME_MODES: tuple[RuntimeMode, ...] = get_args(RuntimeMode)
WORKER_MODELS: tuple[WorkerModel, ...] = get_args(WorkerModel)
TERMINAL_RUN_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled", "interrupted"})

# Which runtimes can serve a worker identity (from the registry). Identity is not runtime: a codex
# worker can run through its CLI or the OpenAI SDK, never through Google's.
COMPATIBLE_MODES: dict[WorkerModel, tuple[RuntimeMode, ...]] = {model: modes_for(model) for model in WORKER_MODELS}
# "codex: openai_sdk, gemini: google_sdk, ...": each identity's SDK runtimes, for the field descriptions.
SDK_MODES_TEXT = ", ".join(f"{s.identities}: {s.mode}" for s in RUNTIMES.values() if s.is_sdk)

# Limits on what a caller may send; each refusal names the limit.
MAX_NAME_LENGTH = 64
MAX_INSTRUCTIONS_CHARS = 20_000
# The hard ceiling of the schema; the operator's cap (MCP_COLLAB_MAX_TASK_CHARS) is checked below it.
MAX_TASK_CHARS = 2_000_000
MAX_TIMEOUT_SECONDS = 24 * 3600
# The largest budget a dispatch may name (maxCostUsd); a typo of a few zeros is refused, not spent.
MAX_COST_USD = 100_000.0
# A review loop that has not converged in this many rounds will not: ask a person.
MAX_ROUNDS = 10
# The most runs one page of a listing holds (list_worker_runs' limit).
MAX_PAGE_SIZE = 200


def compatibility_error(model: WorkerModel, mode: RuntimeMode) -> str | None:
    """The refusal message when ``mode`` cannot serve ``model``, else None."""
    accepted = COMPATIBLE_MODES[model]
    if mode in accepted:
        return None
    return (
        f"runtimeMode {mode!r} cannot run a {model} worker; "
        f"accepted for {model}: {', '.join(repr(m) for m in accepted)}"
    )


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, with the field's wire name, without pydantic's links, types or the
    values sent. A location can hold a caller's text (a key of runtimeModes): it is quoted briefly
    and anything shaped like a key is masked (the MCP edge also redacts known credential values)."""
    parts = []
    for err in exc.errors():
        where = ".".join(
            (to_camel(p) if len(p) <= QUOTE_CHARS else shown(p)) if isinstance(p, str) else str(p)
            for p in err.get("loc", ())
            if p != "__root__"
        )
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return Redactor()("invalid arguments: " + "; ".join(parts))


def utcnow() -> datetime:
    return datetime.now(UTC)


# Control characters other than tab, newline and carriage return (one search, not a loop per
# character: a task is often many kilobytes).
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def no_control_chars(value: str) -> str:
    if _CONTROL_CHARS.search(value):
        raise ValueError("must not contain NUL or other control characters")
    return value


SafeText = Annotated[str, AfterValidator(no_control_chars)]


# The validation context of records read back from a store (``Run.model_validate(data, context=STORED)``).
STORED: dict[str, bool] = {"stored": True}


class WireModel(BaseModel):
    """Base for every model on the wire: camelCase aliases, unknown fields refused.

    Refused from callers, that is: a record a newer mcp-collab stored may carry fields this version
    does not know, and is read without them (validated with the ``STORED`` context)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        ser_json_timedelta="float",
        # Validators and serializers are built on first use, or all at once by build_wire_models.
        defer_build=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _tolerate_newer_fields(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and isinstance(info.context, dict) and info.context.get("stored"):
            known = _known_names(cls)
            if not known.issuperset(data):
                return {k: v for k, v in data.items() if k in known}
        return data


def build_wire_models() -> None:
    """Build the validator and serializer of every wire model now, and defer nothing from here on.

    They are deferred at import (WireModel's ``defer_build``): the server's first answer needs none
    of them, and building them all took about 12 ms of its start. Deferring stops here because a
    deferring config also defers every TypeAdapter made with it, and JSON Schema generation makes
    one per field default: the tools' schemas, generated right after this, cost twice as much."""
    pending: collections.deque[type[WireModel]] = collections.deque([WireModel])
    while pending:  # mostly in the order they were defined: a model's fields' models come before it
        model = pending.popleft()
        model.model_config["defer_build"] = False
        model.model_rebuild()
        pending.extend(model.__subclasses__())


@functools.cache
def _known_names(model: type[BaseModel]) -> frozenset[str]:
    """A model's field names and their aliases: what a stored record of it may hold and be read."""
    return frozenset(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}


class WorkerSpec(WireModel):
    """What a client sends to register a worker."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        description="Unique worker name: letters, digits, '.', '_' or '-', starting with a letter or digit.",
    )
    model: WorkerModel = Field(description="Worker identity: which vendor's agent this is.")
    runtime_mode: RuntimeMode | None = Field(
        default=None,
        description=f"Its default runtime: 'cli' (its CLI) or its vendor's SDK ({SDK_MODES_TEXT}). "
        "Unset: the server default.",
    )
    fallback_policy: FallbackPolicy | None = Field(
        default=None,
        description="'on_error': an SDK step that fails in a retry-safe way runs again through the CLI; "
        "'never': it fails. Unset: the server default.",
    )
    instructions: SafeText = Field(
        default="",
        max_length=MAX_INSTRUCTIONS_CHARS,
        description="Standing instructions (role, style) given to the worker on every step.",
    )
    sdk_model: str | None = Field(
        default=None, max_length=200, description="Model name for the SDK runtime (e.g. an OpenAI model id)."
    )
    cli_model: str | None = Field(
        default=None, max_length=200, description="Model name passed to the vendor CLI with -m/--model."
    )
    timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        le=MAX_TIMEOUT_SECONDS,
        description="Wall-clock limit for one step of this worker. Unset: the server default.",
    )
    working_directory: str | None = Field(
        default=None,
        max_length=4096,
        description="Directory the worker runs in (absolute path). Unset: the server's working directory.",
    )

    @model_validator(mode="after")
    def _mode_fits_model(self) -> "WorkerSpec":
        if self.runtime_mode is not None:
            problem = compatibility_error(self.model, self.runtime_mode)
            if problem:
                raise ValueError(problem)
        for name in ("sdk_model", "cli_model"):
            value = getattr(self, name)
            if value is not None and (not value or value.startswith("-") or any(c.isspace() for c in value)):
                raise ValueError(f"{to_camel(name)} must be a model name without spaces, not starting with '-'")
        return self


class Worker(WorkerSpec):
    """A registered worker profile."""

    created_at: datetime = Field(default_factory=utcnow)


class Usage(WireModel):
    """Tokens as the vendor reported them. ``inputTokens`` is the whole prompt for every vendor, the
    cached part included; ``outputTokens`` all the answer, reasoning included. Unset: not reported."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    cached_input_tokens: int | None = Field(default=None, description="Of the input, read from the cache.")
    cache_write_tokens: int | None = Field(default=None, description="Of the input, written to the cache.")
    reasoning_tokens: int | None = Field(default=None, description="Of the output, reasoning (thinking).")

    def __add__(self, other: "Usage") -> "Usage":
        def plus(a: int | None, b: int | None) -> int | None:
            return None if a is None and b is None else (a or 0) + (b or 0)

        return Usage(**{name: plus(getattr(self, name), getattr(other, name)) for name in Usage.model_fields})


class Attempt(WireModel):
    """One try of one runtime for a step. A step with a fallback has two."""

    runtime_mode: RuntimeMode
    status: AttemptStatus
    started_at: datetime
    ended_at: datetime
    duration_ms: int
    error_kind: ErrorKind | None = None
    error_code: str | None = None
    error: str | None = None
    exit_code: int | None = None


class ProcessRef(WireModel):
    """Enough to find a step's process tree again after a crash, and not mistake a reused pid for it."""

    pid: int
    pgid: int
    start_ticks: int | None = Field(default=None, description="The process's start time in clock ticks since boot.")
    marker: str | None = Field(
        default=None,
        description="The MCP_COLLAB_STEP value in the environment of every process the step started, "
        "detached daemons included; unique to the spawn.",
    )


class RunOwner(WireModel):
    """The server process executing a run (after a recovery: the server that recovered it). A run
    whose owner is gone -- its lease lapsed, or on this host its process died -- is recovered by
    whichever server notices."""

    host: str
    pid: int
    start_ticks: int | None = None
    # "temporal": the run is a Temporal workflow (its own workers execute it, whatever becomes of
    # the server that started it); unset: the server process named here executes it.
    engine: Literal["temporal"] | None = None
    queue: str | None = None  # a run on Temporal: the step queue of the workers that run it
    lease: str | None = Field(
        default=None, description="The owner's lease in the run store; none on runs stored before leases."
    )


LeaseKind = Literal["server", "worker"]


class Lease(WireModel):
    """A process's claim, kept in the run store, that it is alive: renewed before ``expires_at``
    (by the store's clock), dropped at a clean exit. Whatever a lease owns is orphaned once it
    lapses, and a lapsed lease is never taken back."""

    id: str = Field(default_factory=lambda: secrets.token_hex(16))
    kind: LeaseKind
    host: str
    pid: int
    start_ticks: int | None = None
    queue: str | None = None  # the task queue a worker serves
    roots: list[str] = Field(default_factory=list)  # a worker's workspace roots; none for a server
    slots: int | None = None  # the steps a worker runs at once (its --slots); none for a server
    started_at: datetime | None = None  # set by the store when the lease is first taken
    expires_at: datetime | None = None  # None: not taken yet


class Step(WireModel):
    index: int = Field(description="Order in which the step started (0 first); steps are appended as they happen.")
    role: str = Field(description="The step's part in the strategy: worker, writer, reviewer, redteam.")
    round: int | None = Field(default=None, description="The round of a strategy that loops (1 first).")
    branch: str | None = Field(default=None, description="The parallel branch the step belongs to.")
    directory: str | None = Field(default=None, description="The directory the step ran in.")
    access: Access | None = Field(
        default=None, description="What the step could do: read_only, workspace_write, bypass."
    )
    continuation: Continuation | None = Field(
        default=None,
        description="A follow-up's step: 'session' when the vendor's own session was resumed, 'history' when "
        "the recorded history was sent instead (the session could not be resumed; see notes).",
    )
    worker_name: str
    worker_model: WorkerModel
    runtime_mode: RuntimeMode | None = Field(
        default=None, description="The runtime that produced this step's result (or last tried it)."
    )
    fallback_from: RuntimeMode | None = Field(
        default=None, description="The runtime this step fell back from, when a fallback happened."
    )
    status: StepStatus = "pending"
    attempts: list[Attempt] = Field(default_factory=list)
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration_ms: int | None = None
    exit_code: int | None = None
    usage: Usage | None = None
    model: str | None = Field(
        default=None, description="The model the vendor used (as it reported it), else the one requested."
    )
    cli_version: str | None = Field(default=None, description="The CLI's --version, for a CLI step.")
    cost_usd: float | None = Field(default=None, description="What the step cost in US dollars (see costSource).")
    cost_source: CostSource | None = Field(
        default=None, description="vendor (its own figure), price_table, or unknown (no price for the model)."
    )
    diff: str = Field(
        default="", description="A writing step's own change to its directory (a unified diff; stored apart)."
    )
    session_id: str | None = Field(default=None, description="The vendor's session/thread id, when it gave one.")
    output: str = Field(default="", description="The step's final text (bounded; see outputTruncated).")
    output_truncated: bool = False
    error: str | None = None
    verdict: Verdict | None = None
    findings: list[str] = Field(default_factory=list)
    choice: str | None = Field(default=None, description="A judge's pick: the chosen candidate's label (best_of_n).")
    verdict_source: VerdictSource | None = Field(
        default=None,
        description="Where a judging step's verdict, findings or choice came from: 'structured', the runtime's "
        "schema-shaped answer; 'text', its VERDICT/FINDING/CHOICE lines (no structured output there, or it "
        "did not fit: see verdictNote).",
    )
    verdict_note: str | None = Field(
        default=None, description="Why a structured answer that was asked for was not used."
    )
    process: ProcessRef | None = Field(default=None, description="The CLI process of this step, while one runs.")


WorktreeState = Literal["active", "applied", "discarded"]


class RunWorktree(WireModel):
    """A writer's own git worktree: where it is, what it started from, what it produced."""

    label: str | None = Field(default=None, description="The parallel writer it belongs to (best_of_n).")
    path: str = Field(description="The worktree's directory.")
    branch: str = Field(description="Its branch, e.g. mcp-collab/<run id>.")
    entry: str = Field(description="Its entry under the repository's worktrees directory.")
    git_dir: str = Field(description="The repository's shared git directory.")
    head_commit: str | None = Field(default=None, description="The user's HEAD at dispatch.")
    base_commit: str = Field(
        description="What the branch started from (HEAD, or HEAD plus the user's uncommitted changes)."
    )
    carried_changes: bool = Field(default=False, description="The base holds uncommitted changes of the user.")
    tip: str | None = Field(
        default=None, description="The branch's commit holding the writer's work, once the run ended."
    )
    diff: str = Field(
        default="", description="The writer's work against the base (a unified diff; stored apart when long)."
    )
    state: WorktreeState = "active"


class Run(WireModel):
    id: str
    task: str
    strategy: str
    status: RunStatus = "queued"
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    ended_at: datetime | None = None
    runtime_mode: RuntimeMode | None = Field(default=None, description="The dispatch's runtime override, if any.")
    workers: list[str] = Field(default_factory=list, description="Worker names in step order.")
    steps: list[Step] = Field(default_factory=list)
    result: str | None = Field(default=None, description="The run's final text (the last completed step's output).")
    verdict: Verdict | None = None
    findings: list[str] = Field(default_factory=list)
    error: str | None = None
    owner: RunOwner | None = None
    repository: str | None = Field(default=None, description="The git working tree the run's writers worked on.")
    parent_id: str | None = Field(default=None, description="The run this one continues (continue_worker_run).")
    worktrees: list[RunWorktree] = Field(default_factory=list)
    chosen: str | None = Field(default=None, description="best_of_n: the label of the winning worktree.")
    notes: list[str] = Field(default_factory=list, description="What a user should know about how the run worked.")
    duration_ms: int | None = Field(default=None, description="From start to end, once it ended.")
    usage: Usage | None = Field(default=None, description="The tokens of all its steps.")
    cost_usd: float | None = Field(default=None, description="The dollars of its steps whose cost is known.")
    max_cost_usd: float | None = Field(
        default=None, description="Its budget: no step starts once costUsd reached it (maxCostUsd)."
    )


def clone(run: Run) -> Run:
    """A deep copy of a run, a few times faster than ``model_copy(deep=True)`` (pydantic's core does the
    work instead of ``copy.deepcopy`` walking every field in Python)."""
    return Run.model_validate(run.model_dump(), context=STORED)


class DispatchRequest(WireModel):
    task: SafeText = Field(min_length=1, max_length=MAX_TASK_CHARS)
    strategy: str = "single_worker"
    workers: list[str] | None = Field(
        default=None, description="Worker names, in the strategy's step order; unset: chosen by model."
    )
    runtime_mode: RuntimeMode | None = Field(
        default=None, description="Run every step through this runtime (each worker must support it)."
    )
    runtime_modes: dict[str, RuntimeMode] | None = Field(
        default=None, description="Per-worker runtime, by worker name; wins over runtimeMode."
    )
    fallback_policy: FallbackPolicy | None = None
    working_directory: str | None = Field(default=None, max_length=4096)
    max_rounds: int | None = Field(
        default=None, ge=1, le=MAX_ROUNDS, description="review_loop: most write-and-review rounds (default 3)."
    )
    max_cost_usd: float | None = Field(
        default=None,
        gt=0,
        le=MAX_COST_USD,
        description="Budget in US dollars: no step starts once the run's cost reached it. Unset: the server's.",
    )

    @model_validator(mode="after")
    def _task_not_blank(self) -> "DispatchRequest":
        if not self.task.strip():
            raise ValueError("task must not be blank")
        return self


class RuntimePolicy(WireModel):
    """The server-wide runtime policy (from MCP_WORKER_RUNTIME_DEFAULT / MCP_WORKER_FALLBACK_POLICY)."""

    default_mode: RuntimeMode = "cli"
    fallback_policy: FallbackPolicy = "on_error"


class CostTotals(WireModel):
    """Tokens and dollars summed over every run a filter matches (all pages); with a worker filter,
    over that worker's steps only."""

    runs: int = 0
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    uncosted_steps: int = Field(default=0, description="Steps that used tokens but have no known cost.")


class RunPage(WireModel):
    runs: list[Run]
    next_cursor: str | None = None
    totals: CostTotals | None = None


def preview(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def run_shape(steps: list[Step]) -> str:
    """A run at a glance: steps in order, parallel branches in braces, rounds marked.

    ``writer cw[cli] completed -> reviewer gr[cli] completed (request_changes) | round 2: ...``
    ``{answerer a[cli] completed, answerer b[google_sdk] failed} -> synthesizer s[cli] completed``"""

    def label(step: Step) -> str:
        mode: str = step.runtime_mode or "-"
        if step.fallback_from:
            mode = f"{step.fallback_from}->{mode}"
        verdict = f" ({step.verdict})" if step.verdict else ""
        return f"{step.role} {step.worker_name}[{mode}] {step.status}{verdict}"

    parts: list[str] = []
    current_round: int | None = None
    i = 0
    while i < len(steps):
        step = steps[i]
        prefix = ""
        if step.round is not None and step.round != current_round:
            current_round = step.round
            prefix = f"round {step.round}: " if step.round > 1 or any((s.round or 0) > 1 for s in steps) else ""
        if step.branch is not None:
            group = [step]
            while i + len(group) < len(steps) and steps[i + len(group)].branch is not None:
                group.append(steps[i + len(group)])
            parts.append(prefix + "{" + ", ".join(label(s) for s in group) + "}")
            i += len(group)
        else:
            parts.append(prefix + label(step))
            i += 1
    text = ""
    for part in parts:
        text += part if not text else (f" | {part}" if part.startswith("round ") else f" -> {part}")
    return text


class StepSummary(WireModel):
    index: int
    role: str
    round: int | None = None
    branch: str | None = None
    worker_name: str
    runtime_mode: RuntimeMode | None
    fallback_from: RuntimeMode | None
    status: StepStatus
    cost_usd: float | None = None
    output_preview: str = Field(description="The start of the step's output; get_worker_run has more.")


class RunSummary(WireModel):
    """A run as a list shows it: what ran where, and how it ended."""

    id: str
    task: str = Field(description="The start of the task text.")
    strategy: str
    status: RunStatus
    created_at: datetime
    ended_at: datetime | None
    verdict: Verdict | None
    error: str | None
    shape: str = Field(default="", description="The run at a glance: steps in order, {parallel branches}, rounds.")
    duration_ms: int | None = None
    cost_usd: float | None = None
    steps: list[StepSummary]

    @classmethod
    def of(cls, run: Run, chars: int) -> "RunSummary":
        return cls(
            id=run.id,
            task=preview(run.task, chars),
            strategy=run.strategy,
            status=run.status,
            created_at=run.created_at,
            ended_at=run.ended_at,
            verdict=run.verdict,
            error=None if run.error is None else preview(run.error, 2 * chars),
            shape=run_shape(run.steps),
            duration_ms=run.duration_ms,
            cost_usd=run.cost_usd,
            steps=[
                StepSummary(
                    index=s.index,
                    role=s.role,
                    round=s.round,
                    branch=s.branch,
                    worker_name=s.worker_name,
                    runtime_mode=s.runtime_mode,
                    fallback_from=s.fallback_from,
                    status=s.status,
                    cost_usd=s.cost_usd,
                    output_preview=preview(s.output, chars),
                )
                for s in run.steps
            ],
        )


class RunSummaryPage(WireModel):
    runs: list[RunSummary]
    next_cursor: str | None = Field(default=None, description="Pass as cursor to get the next page; null at the end.")
    totals: CostTotals | None = None


class OutputPage(WireModel):
    """One page of a step's full output (or of its worktree's diff), for clients without resources."""

    run_id: str
    step: int
    diff: bool = False
    offset: int = Field(description="Where this page starts, in characters.")
    text: str
    next_offset: int | None = Field(description="Pass as offset for the next page; null at the end.")
    total_chars: int = Field(description="The whole output's length in characters.")


# What check_runtimes and `mcp-collab doctor` report (readiness.check).
class Check(WireModel):
    name: str
    ok: bool
    detail: str
    hint: str | None = None
    required: bool = Field(default=True, description="False: only some runtimes need it.")


class RuntimeReadiness(WireModel):
    mode: RuntimeMode
    worker_model: str
    ready: bool
    reason: str


class ReadinessReport(WireModel):
    checks: list[Check]
    runtimes: list[RuntimeReadiness] = Field(description="Per worker identity and runtime: can it run now?")
    default_runtime: RuntimeMode
    fallback_policy: str

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks if c.required)
