"""The MCP edge: tools and resources over the WorkerOrchestrator. No logic lives here.

Every tool is ``async``; every refusal is a ``ToolError`` whose message says what was wrong and
what is accepted; anything unexpected is logged to stderr with its traceback and reported to the
client as a short internal error. Tool results are capped (about 20 KB) so clients with a token
budget stay safe; full outputs are MCP resources (``runs://{runId}``,
``runs://{runId}/steps/{index}/output``) and, for clients that cannot read resources, pages of the
``read_run_output`` tool.

What every client gets without configuring anything: each tool carries a title and annotations
(codex runs read-only tools without asking), arguments a client injects on its own are tolerated
(see ``_StrictArguments``), a call that waits sends a progress notification at least every
``PROGRESS_HEARTBEAT_S``, and ``tools/list`` stays small (compact output schemas, see
``compact_schema``). Tools are registered on the first ``tools/list`` or ``tools/call``, in a worker
thread: building their schemas is most of the server's start-up cost, and the first answer a client
waits for (``initialize``) needs none of it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, ParamSpec, TypeVar, cast

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectSendStream
from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult, InputRequiredResult, ResourceTemplate, TextContent, Tool, ToolAnnotations
from pydantic import AnyUrl, Field, ValidationError

from . import __version__
from .config import Settings
from .errors import (
    CollabError,
    EngineStartError,
    NoFittingWorkerError,
    StoreError,
    UnknownRunError,
    listing,
    shown,
)
from .models import (
    MAX_PAGE_SIZE,
    MAX_ROUNDS,
    DispatchRequest,
    FallbackPolicy,
    OutputPage,
    ReadinessReport,
    Run,
    RunPage,
    RunStatus,
    RunSummary,
    RunSummaryPage,
    RuntimeMode,
    WireModel,
    Worker,
    WorkerModel,
    WorkerSpec,
    build_wire_models,
    describe_validation_error,
)
from .runtimes.registry import sdk_runtimes
from .security import Redactor
from .store import RunStore, cursor_after
from .strategies import STRATEGIES, dispatchable
from .tasks import DISPATCH_TOOL, TasksExtension

if TYPE_CHECKING:
    # The engine loads off the path to the first answer (see _Engine).
    from .engine.delivery import Delivered
    from .orchestrator import WorkerOrchestrator
    from .runtimes.base import WorkerRuntime

log = logging.getLogger("mcp_collab.server")

# A tool result stays under about 20 KB so a client with a per-result token cap is never flooded.
# The result carries its JSON twice (structuredContent, and indented text for older clients), so
# the compact JSON gets well under half of that.
RESULT_BUDGET_BYTES = 8_000
MIN_PREVIEW_CHARS = 120
LIST_PREVIEW_CHARS = 160
# Blocking tools return before a tool timeout. Claude Code does not restart its timeout on
# progress and users set MCP_TOOL_TIMEOUT low, so the default wait is short; a client that allows
# more passes more, up to a ceiling under the TypeScript SDK's 60 s request timeout.
DEFAULT_WAIT_S = 20.0
MAX_WAIT_S = 55.0
# A call that waits sends progress at least this often: a client that restarts its timeout on
# progress (the TypeScript SDK's resetTimeoutOnProgress) with a 10 s timeout gets two per timeout.
PROGRESS_HEARTBEAT_S = 5.0
PROGRESS_BUFFER = 1000
MAX_ERROR_CHARS = 4_000
# One page of read_run_output; its JSON (sent twice, like every result) stays within the budget.
OUTPUT_PAGE_CHARS = RESULT_BUDGET_BYTES
# Arguments real clients add to every tool's schema and send on their own; never ours to refuse.
CLIENT_INJECTED_ARGUMENTS: frozenset[str] = frozenset(
    {
        "wait_for_previous",  # gemini-cli: asks it to run the call after the model's previous ones
    }
)
# How alike an unknown argument's name must be to an accepted one to be taken for a typo of it.
TYPO_SIMILARITY = 0.75

P = ParamSpec("P")
R = TypeVar("R")


# Code loaded off the event loop (the engine's modules; the tools, whose registration imports too)
# is loaded by one thread at a time: two threads importing the same package at once can fail with
# Python's "deadlock detected" on its module locks.
_LOADING = threading.Lock()


def _load_engine() -> None:
    """The engine's modules, and readiness (check_runtimes' checks), which needs the same ones."""
    with _LOADING:
        importlib.import_module(".orchestrator", __package__)
        importlib.import_module(".readiness", __package__)


# How long after it began to listen a stdio server starts its engine if no call needed it sooner:
# after a client's start-up exchange (initialize, then tools/list, whose schemas take a worker
# thread ~0.1 s), so it does not delay those; soon enough that a dead server's runs are recovered
# promptly even if no tool is ever called.
ENGINE_START_S = 0.5


class _Engine:
    """The orchestrator the tools and resources drive, owned by the server's lifespan.

    Over stdio it starts off the path to the server's first answers: a client's start-up probe
    (``initialize``, from spawn to answer) and its ``tools/list`` need none of the engine's imports,
    its lease or recovery. It starts when a call first needs it (that call waits for it, as a read
    of runs waits for recovery) or ``ENGINE_START_S`` after the server began to listen, whichever
    comes first; its modules load in a worker thread, so the event loop goes on answering meanwhile.
    Elsewhere (HTTP, in process) it starts before the server takes requests, as it always did."""

    def __init__(
        self, settings: Settings, store: RunStore | None, runtimes: Mapping[RuntimeMode, WorkerRuntime] | None
    ) -> None:
        self._settings = settings
        self._store = store
        self._runtimes = runtimes
        self._wanted = anyio.Event()
        self._ready = anyio.Event()
        self._stopping = anyio.Event()
        self._orchestrator: WorkerOrchestrator | None = None
        self._failure: CollabError | None = None

    async def orchestrator(self) -> WorkerOrchestrator:
        """The running orchestrator; a caller that comes before it started starts it and waits."""
        if self._orchestrator is not None and self._failure is None:
            return self._orchestrator  # running: no trip round the event loop (a set Event's wait is one)
        self._wanted.set()
        await self._ready.wait()
        if self._failure is not None:
            raise EngineStartError(
                f"this server could not start its engine: {self._failure}; restart it once that is fixed "
                "(`mcp-collab doctor` checks the store)"
            )
        assert self._orchestrator is not None  # set before _ready, unless the start failed
        return self._orchestrator

    async def run(self, *, deferred: bool, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the orchestrator (at once, or ``deferred`` as the class says) and run it until ``stop``.
        Not deferred, ``task_status`` reports the start once it is running, so an error at start (a
        store that refuses the lease, say) stops the server from coming up, as it did before."""
        if deferred:
            task_status.started()
            with anyio.move_on_after(ENGINE_START_S):
                await self._wanted.wait()
            if self._stopping.is_set():
                return
            await anyio.to_thread.run_sync(_load_engine)
            if self._stopping.is_set():
                return
        else:
            _load_engine()
        from .orchestrator import WorkerOrchestrator

        try:
            # Runs live in the orchestrator's task group, owned by the server's lifespan: a request
            # that times out, is cancelled or disconnects does not take its run with it.
            orchestrator = WorkerOrchestrator(self._settings, store=self._store, runtimes=self._runtimes)
            async with orchestrator, orchestrator.running():
                self._orchestrator = orchestrator
                self._ready.set()
                if not deferred:
                    task_status.started()
                await self._stopping.wait()
        except CollabError as exc:
            if not deferred or self._orchestrator is not None:
                raise
            # The server is answering its client already: the log says why now, every call that
            # needs the engine says why, and the server still exits with the error when it stops.
            log.error("could not start the engine: %s", exc)
            self._failure = exc
            self._ready.set()
            await self._stopping.wait()
            raise

    def stop(self) -> None:
        self._stopping.set()
        self._wanted.set()


# NamedTuples rather than dataclasses here: creating a dataclass costs about 0.5 ms of the import,
# and this module is on serve's path to its first answer.
class AppState(NamedTuple):
    engine: _Engine
    settings: Settings
    heartbeat_s: float = PROGRESS_HEARTBEAT_S

    async def orchestrator(self) -> WorkerOrchestrator:
        """The running orchestrator (a call that comes before it started waits for it)."""
        return await self.engine.orchestrator()


class WorkerList(WireModel):
    workers: list[Worker]


class DeliveryResult(WireModel):
    run_id: str
    branches: list[str] = Field(description="The run's branches this acted on.")
    applied: bool = Field(description="True when the changes are now in the working tree.")
    files: list[str] = Field(description="The files changed, or the files in the way of a refused apply.")
    message: str

    @classmethod
    def of(cls, done: Delivered) -> DeliveryResult:
        return cls(
            run_id=done.run.id,
            branches=list(done.branches),
            applied=done.applied,
            files=list(done.files),
            message=done.message,
        )


class CancelResult(WireModel):
    run: Run
    cancelled: bool = Field(description="False when the run had already ended.")
    message: str


def _output_uri(run_id: str, step: int) -> str:
    return f"runs://{run_id}/steps/{step}/output"


def _diff_uri(run_id: str, index: int) -> str:
    return f"runs://{run_id}/worktrees/{index}/diff"


def _step_diff_uri(run_id: str, step: int) -> str:
    return f"runs://{run_id}/steps/{step}/diff"


def _clip(text: str, limit: int, where: str) -> tuple[str, bool]:
    if len(text) <= limit:
        return text, False
    return f"{text[:limit]}\n[... {len(text) - limit} more characters: {where} ...]", True


def _step_pointer(run_id: str, step: int, offset: int) -> str:
    """Where the rest of a shortened output is: the resource, and the tool for clients without resources."""
    return (
        f"read {_output_uri(run_id, step)}, or call read_run_output with "
        f'{{"runId": "{run_id}", "step": {step}, "offset": {offset}}}'
    )


def _size(model: WireModel) -> int:
    return len(model.model_dump_json(by_alias=True))


def for_client(run: Run, budget: int = RESULT_BUDGET_BYTES) -> Run:
    """``run`` if it fits the inline budget, else a copy with its long texts shortened; the full texts
    stay readable as resources and through read_run_output. Only what is shortened is copied."""
    if _size(run) <= budget:
        return run
    limit = budget
    while True:
        steps = []
        for step in run.steps:
            output, clipped = _clip(step.output, limit, _step_pointer(run.id, step.index, limit))
            if clipped:
                step = step.model_copy(update={"output": output, "output_truncated": True})
            where = (
                f'read {_step_diff_uri(run.id, step.index)}, or call read_run_output with {{"runId": "{run.id}", '
                f'"step": {step.index}, "diff": true, "offset": {limit}}}'
            )
            diff, clipped = _clip(step.diff, limit, where)
            if clipped:
                step = step.model_copy(update={"diff": diff})
            steps.append(step)
        last = len(run.steps) - 1
        result = run.result
        if result is not None:
            result, _ = _clip(
                result, limit, _step_pointer(run.id, last, limit) if last >= 0 else f"read runs://{run.id}"
            )
        trees = []
        for i, worktree in enumerate(run.worktrees):
            # read_run_output's diff is a step's own now; the worktree's whole diff is its resource.
            where = f"read {_diff_uri(run.id, i)}"
            text, clipped = _clip(worktree.diff, limit, where)
            trees.append(worktree.model_copy(update={"diff": text}) if clipped else worktree)
        task, _ = _clip(run.task, limit, f"read runs://{run.id}")
        view = run.model_copy(update={"task": task, "steps": steps, "result": result, "worktrees": trees})
        if _size(view) <= budget or limit <= MIN_PREVIEW_CHARS:
            return view
        limit = max(MIN_PREVIEW_CHARS, limit // 2)


def page_for_client(page: RunPage, cursor_after: Callable[[Run], str]) -> RunSummaryPage:
    """Summaries of a page, cut short (with a cursor to the rest) if they would not fit the budget."""
    runs = [RunSummary.of(r, LIST_PREVIEW_CHARS) for r in page.runs]
    kept = len(runs)
    while kept > 1 and _size(RunSummaryPage(runs=runs[:kept])) > RESULT_BUDGET_BYTES:
        kept -= 1
    if kept == len(runs):
        return RunSummaryPage(runs=runs, next_cursor=page.next_cursor, totals=page.totals)
    return RunSummaryPage(runs=runs[:kept], next_cursor=cursor_after(page.runs[kept - 1]), totals=page.totals)


def worktree_of(run: Run, step: int) -> int | None:
    """The index of the worktree step ``step`` ran in, if it ran in one."""
    directory = run.steps[step].directory if 0 <= step < len(run.steps) else None
    if directory is None:
        return None
    for i, worktree in enumerate(run.worktrees):
        if directory == worktree.path or directory.startswith(worktree.path.rstrip("/") + "/"):
            return i
    return None


def step_diff(run: Run, step: int) -> str | None:
    """What step ``step`` changed: its own diff, else (in a run recorded before steps had their own,
    where no step has one) the diff of the worktree it ran in, else None."""
    if run.steps[step].diff:
        return run.steps[step].diff
    if any(s.diff for s in run.steps):
        return None  # this step changed nothing; another one did
    index = worktree_of(run, step)
    return run.worktrees[index].diff if index is not None else None


def output_page(run: Run, step: int, offset: int, limit: int, *, diff: bool = False) -> OutputPage:
    """Characters ``offset`` to at most ``offset + limit`` of a step's output (or of the diff of the
    worktree it ran in), fewer if their JSON would not fit the result budget (escapes such as newlines
    count double); pages join exactly."""
    if not 0 <= step < len(run.steps):
        steps = f"steps 0 to {len(run.steps) - 1}" if run.steps else "no steps"
        raise ToolError(f"run {run.id} has {steps}; got step {step}")
    if diff:
        text = step_diff(run, step)
        if text is None:
            writers = [s.index for s in run.steps if step_diff(run, s.index) is not None]
            accepted = f"steps that have one: {', '.join(map(str, writers))}" if writers else "no step of this run has"
            raise ToolError(
                f"step {step} of run {run.id} changed no file and did not work in a worktree, so it has no diff; "
                f"{accepted}"
            )
    else:
        text = run.steps[step].output
    what = "diff" if diff else "output"
    if offset > len(text):
        raise ToolError(
            f"offset {offset} is past the end of step {step}'s {what} ({len(text)} characters); "
            f"accepted: 0 to {len(text)}"
        )
    chunk = text[offset : offset + limit]
    while len(chunk) > 1 and len(json.dumps(chunk, ensure_ascii=False)) > RESULT_BUDGET_BYTES:
        chunk = chunk[: len(chunk) // 2]
    end = offset + len(chunk)
    return OutputPage(
        run_id=run.id,
        step=step,
        diff=diff,
        offset=offset,
        text=chunk,
        next_offset=end if end < len(text) else None,
        total_chars=len(text),
    )


def _bounded(message: str) -> str:
    """The last guard on an error's size: messages quote inputs briefly, but never trust that."""
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + "… (message cut)"


def tool_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Refusals become clear tool errors; anything else is logged and reported without a trace."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            try:
                return await fn(*args, **kwargs)
            except BaseExceptionGroup as group:
                raise _sole_error(group) from None
        except ToolError:
            raise
        except CollabError as exc:
            raise ToolError(_bounded(with_hint(exc))) from None
        except ValidationError as exc:
            raise ToolError(describe_validation_error(exc)) from None
        except Exception as exc:
            log.exception("tool %s failed", fn.__name__)
            raise ToolError(
                f"internal error in {fn.__name__} ({type(exc).__name__}); the server logged the details "
                "to stderr and is still running"
            ) from None

    return wrapper


def resource_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """A resource read that cannot be answered says why: an unknown run or step is "not found"
    (-32602) naming what exists, a store problem its cause; never a bare internal error."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except UnknownRunError as exc:
            raise ResourceNotFoundError(_bounded(with_hint(exc))) from None
        except CollabError as exc:
            raise ResourceError(_bounded(str(exc))) from None

    return wrapper


# The core's messages name no tool; here the client hears which tool to call next.
TOOL_HINTS: dict[type[CollabError], str] = {
    UnknownRunError: "list_worker_runs shows the runs this server knows",
    NoFittingWorkerError: "register one with spawn_worker, or name one per role in dispatch_task's workers",
}


def with_hint(exc: CollabError) -> str:
    hint = next((h for cls, h in TOOL_HINTS.items() if isinstance(exc, cls)), None)
    return f"{exc}; {hint}" if hint else str(exc)


def _sole_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """A task group wraps the one error that ended it; tools report that error, not the group."""
    leaves = [e for e in _leaves(group) if not isinstance(e, anyio.get_cancelled_exc_class())]
    return leaves[0] if len(leaves) == 1 else group


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _state(ctx: Context) -> AppState:
    return cast(AppState, ctx.request_context.lifespan_context)


async def _orchestrator(ctx: Context) -> WorkerOrchestrator:
    return await _state(ctx).orchestrator()


STRATEGY_GUIDE = "\n".join(f"- {s.name}: {s.summary}" for s in STRATEGIES.values() if not s.internal)


def _gist(summary: str) -> str:
    """A strategy's first sentence: what it does. The server's instructions carry each one whole."""
    head, dot, _ = summary.partition(". ")
    return head + dot.strip()


# In dispatch_task's description, which every client shows its model on every session, so it stays short.
STRATEGY_GIST = "\n".join(f"- {s.name}: {_gist(s.summary)}" for s in STRATEGIES.values() if not s.internal)
# The server's instructions say which SDK runtime (from the registry) serves whom; dispatch_task's
# description, which every client shows its model on every session, only how runtimes differ.
RUNTIME_GUIDE = (
    "Runtimes: 'cli' (the vendor CLI; edits files); "
    + ", ".join(f"'{s.mode}' ({s.identities})" for s in sdk_runtimes())
    + " (text only). Under fallback on_error a retry-safe SDK failure reruns through 'cli' (see fallbackFrom)."
)
RUNTIME_GIST = (
    "Runtimes: cli (edits files) or the vendor's *_sdk (text only); "
    "on_error reruns a retry-safe SDK failure via cli (fallbackFrom)."
)
WAITING_GUIDE = "Shorter tool timeout? Pass a smaller waitSeconds, then wait_worker_run with timeoutSeconds under it."


# The tools. Each validates, calls the orchestrator and shapes the result; build_server registers them.


@tool_errors
async def spawn_worker(
    ctx: Context,
    name: Annotated[str, Field(description="Unique worker name, e.g. 'codex-writer'.")],
    model: WorkerModel,
    runtimeMode: RuntimeMode | None = None,  # the tool's description says what it is; dispatch_task's, which fits
    fallbackPolicy: FallbackPolicy | None = None,
    instructions: Annotated[str, Field(description="Standing instructions given on every step.")] = "",
    sdkModel: Annotated[str | None, Field(description="Model for the SDK runtime.")] = None,
    cliModel: Annotated[str | None, Field(description="Model passed to the CLI's -m/--model.")] = None,
    timeoutSeconds: Annotated[float | None, Field(description="Wall-clock limit per step.")] = None,
    workingDirectory: Annotated[str | None, Field(description="Absolute directory it works in.")] = None,
) -> Worker:
    """Register a worker: a named Codex, Gemini or Claude agent and its default runtime; then name it in
    dispatch_task."""
    spec = WorkerSpec(
        name=name,
        model=model,
        runtime_mode=runtimeMode,
        fallback_policy=fallbackPolicy,
        instructions=instructions,
        sdk_model=sdkModel,
        cli_model=cliModel,
        timeout_seconds=timeoutSeconds,
        working_directory=workingDirectory,
    )
    orchestrator = await _orchestrator(ctx)
    return await orchestrator.register_worker(spec)


@tool_errors
async def list_workers(ctx: Context) -> WorkerList:
    """List the registered workers."""
    orchestrator = await _orchestrator(ctx)
    return WorkerList(workers=await orchestrator.list_workers())


@tool_errors
async def remove_worker(ctx: Context, name: str) -> Worker:
    """Remove a worker by name; its past runs stay in the history."""
    orchestrator = await _orchestrator(ctx)
    return await orchestrator.remove_worker(name)


@tool_errors
async def dispatch_task(
    ctx: Context,
    task: Annotated[str, Field(description="What the workers should do, in plain words.")],
    strategy: Annotated[str, Field(description=f"One of: {', '.join(dispatchable())}.")] = "single_worker",
    workers: Annotated[list[str] | None, Field(description="Worker names in role order.")] = None,
    runtimeMode: Annotated[RuntimeMode | None, Field(description="Runtime for every step.")] = None,
    runtimeModes: Annotated[
        dict[str, RuntimeMode] | None, Field(description="Runtime by worker name; wins over runtimeMode.")
    ] = None,
    fallbackPolicy: FallbackPolicy | None = None,
    workingDirectory: Annotated[str | None, Field(description="Absolute directory the workers run in.")] = None,
    waitSeconds: Annotated[float, Field(ge=0, le=MAX_WAIT_S, description="Longest wait for the end.")] = DEFAULT_WAIT_S,
    maxRounds: Annotated[int | None, Field(ge=1, le=MAX_ROUNDS, description="review_loop: rounds at most (3).")] = None,
    maxCostUsd: Annotated[float | None, Field(gt=0, description="Budget, US$: no step starts once spent.")] = None,
) -> Run:
    request = DispatchRequest(
        task=task,
        strategy=strategy,
        workers=workers,
        runtime_mode=runtimeMode,
        runtime_modes=runtimeModes,
        fallback_policy=fallbackPolicy,
        working_directory=workingDirectory,
        max_rounds=maxRounds,
        max_cost_usd=maxCostUsd,
    )
    orchestrator = await _orchestrator(ctx)
    async with _progress(ctx) as report:
        # Recorded before anything runs: work that could not be recorded never starts (a full disk
        # refuses the dispatch instead). Durable before the client hears of it: a client that asked
        # for progress hears from the start (heartbeats included), so then before this returns;
        # else wait answers only with what is durable, which spares a fast run an fsync of its own.
        run = await orchestrator.start(request, on_progress=report, durable=report is not None)
        if report is not None:
            report.run_id = run.id
        run = await orchestrator.wait(run.id, waitSeconds, on_progress=report)
    return for_client(run)


@tool_errors
async def continue_worker_run(
    ctx: Context,
    runId: str,
    message: Annotated[str, Field(description="The follow-up.")],
    worker: Annotated[str | None, Field(description="One of the run's workers (default: its writer).")] = None,
    waitSeconds: Annotated[float, Field(ge=0, le=MAX_WAIT_S, description="Longest wait for the end.")] = DEFAULT_WAIT_S,
) -> Run:
    """A follow-up to a finished run's worker, in the same place, resuming its vendor session where
    it can (else from the recorded history). A new run, linked by parentId; wait as for dispatch_task."""
    orchestrator = await _orchestrator(ctx)
    async with _progress(ctx) as report:
        run = await orchestrator.continue_run(runId, message, worker, on_progress=report, durable=report is not None)
        if report is not None:
            report.run_id = run.id
        run = await orchestrator.wait(run.id, waitSeconds, on_progress=report)
    return for_client(run)


@tool_errors
async def list_worker_runs(
    ctx: Context,
    status: Annotated[RunStatus | None, Field(description="Only runs in this status.")] = None,
    strategy: Annotated[str | None, Field(description="Only runs of this strategy.")] = None,
    worker: Annotated[str | None, Field(description="Only runs in which this worker took a step.")] = None,
    limit: Annotated[int, Field(ge=1, le=MAX_PAGE_SIZE, description="Page size.")] = 20,
    cursor: Annotated[str | None, Field(description="nextCursor from the previous page.")] = None,
) -> RunSummaryPage:
    """Runs, newest first: shape, cost, steps (worker, runtime, status), output starts; totals: tokens and
    US$ of all matching runs (with worker: its steps). Pages stop at ~20 KB (nextCursor)."""
    orchestrator = await _orchestrator(ctx)
    page = await orchestrator.list_runs(status=status, strategy=strategy, worker=worker, limit=limit, cursor=cursor)
    return page_for_client(page, cursor_after)


@tool_errors
async def get_worker_run(ctx: Context, runId: str) -> Run:
    """One run with all its steps (model, tokens, cost, diff). Long texts are shortened: read_run_output
    (or runs://{runId}/steps/{index}/output) has them whole."""
    orchestrator = await _orchestrator(ctx)
    return for_client(await orchestrator.get_run(runId))


@tool_errors
async def read_run_output(
    ctx: Context,
    runId: str,
    step: Annotated[int, Field(ge=0, description="The step's index, from 0.")],
    offset: Annotated[int, Field(ge=0, description="nextOffset of the last page.")] = 0,
    limit: Annotated[int, Field(ge=1, le=OUTPUT_PAGE_CHARS, description="Characters at most.")] = OUTPUT_PAGE_CHARS,
    diff: Annotated[bool, Field(description="The step's diff instead (else its worktree's).")] = False,
) -> OutputPage:
    """A page of a step's full output (or diff). Repeat with offset = nextOffset until it is null; pages
    join to the whole text (totalChars)."""
    orchestrator = await _orchestrator(ctx)
    return output_page(await orchestrator.get_run(runId), step, offset, limit, diff=diff)


@tool_errors
async def wait_worker_run(
    ctx: Context,
    runId: str,
    timeoutSeconds: Annotated[
        float, Field(ge=0, le=MAX_WAIT_S, description="Return after this long even if the run goes on.")
    ] = DEFAULT_WAIT_S,
) -> Run:
    """Wait for a run to end, up to timeoutSeconds (default 20, at most 55), with progress meanwhile.
    Returns the run; while it is queued or running, call again (keep timeoutSeconds under your
    tool timeout). Works from any session."""
    async with _progress(ctx, runId) as report:
        orchestrator = await _orchestrator(ctx)
        run = await orchestrator.wait(runId, timeoutSeconds, on_progress=report)
    return for_client(run)


@tool_errors
async def cancel_worker_run(ctx: Context, runId: str) -> CancelResult:
    """Cancel a queued or running run: its process trees are killed, its open steps cancelled, output
    so far kept; an ended run is left as it is."""
    orchestrator = await _orchestrator(ctx)
    run, cancelled = await orchestrator.cancel(runId)
    message = (
        f"run {runId} cancelled; its processes were stopped"
        if cancelled
        else f"run {runId} had already ended ({run.status}); nothing to cancel"
    )
    return CancelResult(run=for_client(run), cancelled=cancelled, message=message)


@tool_errors
async def apply_worker_run(
    ctx: Context,
    runId: str,
    branch: Annotated[str | None, Field(description="best_of_n: a branch label (default: the judge's).")] = None,
) -> DeliveryResult:
    """Apply a finished run's worktree branch to your working tree: all of it, or none and the files in
    the way. Nothing is staged or committed."""
    orchestrator = await _orchestrator(ctx)
    return DeliveryResult.of(await orchestrator.apply(runId, branch))


@tool_errors
async def discard_worker_run(ctx: Context, runId: str) -> DeliveryResult:
    """Remove a finished run's worktrees and branches; its record and diff stay."""
    orchestrator = await _orchestrator(ctx)
    return DeliveryResult.of(await orchestrator.discard(runId))


@tool_errors
async def check_runtimes(ctx: Context) -> ReadinessReport:
    """What can run here (CLIs, credentials, SDKs, endpoints, store, engine), with a hint per failure."""
    state = _state(ctx)
    orchestrator = await state.orchestrator()
    from . import readiness  # loaded with the engine

    # Reading the store first finds (and repairs, keeping the original aside) damage done to
    # it since the last call, so the report below lists it.
    with contextlib.suppress(StoreError):
        await orchestrator.list_workers()
    return await readiness.check(state.settings, orchestrator.store)


def _dispatch_description() -> str:
    return (
        f"Run a task through a strategy. Waits up to waitSeconds (default "
        f"{DEFAULT_WAIT_S:.0f}) for the end; a longer run goes on and returns queued or running: follow it "
        "with wait_worker_run, stop it with cancel_worker_run. "
        + WAITING_GUIDE
        + "\nStrategies:\n"
        + STRATEGY_GIST
        + "\nWorkers: named in role order, else the first registered ones that fit.\n"
        + RUNTIME_GIST
    )


def _hints(*, read_only: bool, destructive: bool = False, idempotent: bool = True, open_world: bool = False) -> Any:
    return ToolAnnotations(
        read_only_hint=read_only, destructive_hint=destructive, idempotent_hint=idempotent, open_world_hint=open_world
    )


class _ToolSpec(NamedTuple):
    fn: Callable[..., Awaitable[Any]]
    title: str
    annotations: ToolAnnotations
    description: str | None = None


# What each tool does to the world, for clients that decide on approval from it. Reading and
# waiting change nothing; a repeated registration or removal is refused and changes nothing more;
# dispatch_task runs agents that edit files and call vendor APIs.
TOOL_SPECS: tuple[_ToolSpec, ...] = (
    _ToolSpec(spawn_worker, "Register a worker", _hints(read_only=False)),
    _ToolSpec(list_workers, "List workers", _hints(read_only=True)),
    _ToolSpec(remove_worker, "Remove a worker", _hints(read_only=False, destructive=True)),
    _ToolSpec(
        dispatch_task,
        "Run a task with workers",
        _hints(read_only=False, destructive=True, idempotent=False, open_world=True),
        _dispatch_description(),
    ),
    _ToolSpec(
        continue_worker_run,
        "Continue a run",
        _hints(read_only=False, destructive=True, idempotent=False, open_world=True),
    ),
    _ToolSpec(list_worker_runs, "List runs", _hints(read_only=True)),
    _ToolSpec(get_worker_run, "Show a run", _hints(read_only=True)),
    _ToolSpec(read_run_output, "Read a step's output", _hints(read_only=True)),
    _ToolSpec(wait_worker_run, "Wait for a run", _hints(read_only=True)),
    _ToolSpec(cancel_worker_run, "Cancel a run", _hints(read_only=False, destructive=True)),
    _ToolSpec(apply_worker_run, "Apply a run's work", _hints(read_only=False, idempotent=False)),
    _ToolSpec(discard_worker_run, "Discard a run's work", _hints(read_only=False, destructive=True)),
    _ToolSpec(check_runtimes, "Check runtimes", _hints(read_only=True)),
)


@resource_errors
async def run_resource(run_id: str, ctx: Context) -> str:
    orchestrator = await _orchestrator(ctx)
    run = await orchestrator.get_run(run_id)
    return json.dumps(run.model_dump(mode="json", by_alias=True), ensure_ascii=False, indent=1)


@resource_errors
async def step_output(run_id: str, index: str, ctx: Context) -> str:
    orchestrator = await _orchestrator(ctx)
    run = await orchestrator.get_run(run_id)
    if not index.isdigit() or int(index) >= len(run.steps):
        steps = f"steps 0 to {len(run.steps) - 1}" if run.steps else "no steps"
        raise ResourceNotFoundError(
            f"run {run_id} has {steps}; got step {shown(index)}. Accepted: runs://{run_id}/steps/N/output"
        )
    return run.steps[int(index)].output


@resource_errors
async def step_diff_resource(run_id: str, index: str, ctx: Context) -> str:
    orchestrator = await _orchestrator(ctx)
    run = await orchestrator.get_run(run_id)
    text = step_diff(run, int(index)) if index.isdigit() and int(index) < len(run.steps) else None
    if text is None:
        writers = [str(s.index) for s in run.steps if step_diff(run, s.index) is not None]
        have = f"steps with a diff: {', '.join(writers)}" if writers else "no step with a diff"
        raise ResourceNotFoundError(
            f"run {run_id} has {have}; got step {shown(index)}. Accepted: runs://{run_id}/steps/N/diff"
        )
    return text


@resource_errors
async def worktree_diff(run_id: str, index: str, ctx: Context) -> str:
    orchestrator = await _orchestrator(ctx)
    run = await orchestrator.get_run(run_id)
    if not index.isdigit() or int(index) >= len(run.worktrees):
        have = f"worktrees 0 to {len(run.worktrees) - 1}" if run.worktrees else "no worktree"
        raise ResourceNotFoundError(
            f"run {run_id} has {have}; got worktree {shown(index)}. Accepted: runs://{run_id}/worktrees/N/diff"
        )
    return run.worktrees[int(index)].diff


class _ResourceSpec(NamedTuple):
    fn: Callable[..., Awaitable[str]]
    uri: str
    mime_type: str
    description: str


# The runs' full texts, for clients that read resources. Registered when first needed (CollabServer).
RESOURCE_SPECS: tuple[_ResourceSpec, ...] = (
    _ResourceSpec(run_resource, "runs://{run_id}", "application/json", "A whole run, full outputs."),
    _ResourceSpec(step_output, "runs://{run_id}/steps/{index}/output", "text/plain", "A step's full output."),
    _ResourceSpec(step_diff_resource, "runs://{run_id}/steps/{index}/diff", "text/x-diff", "A step's own diff."),
    _ResourceSpec(worktree_diff, "runs://{run_id}/worktrees/{index}/diff", "text/x-diff", "A worktree's diff."),
)


# Keys of a JSON Schema whose values are schemas, maps of schemas, or lists of schemas.
_SUBSCHEMA = frozenset({"items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else"})
_SCHEMA_MAPS = frozenset({"properties", "patternProperties"})
_SCHEMA_LISTS = frozenset({"anyOf", "oneOf", "allOf", "prefixItems"})
# What a published output schema leaves out: words for people, and what validates nothing by
# default (``format`` is an annotation in JSON Schema 2020-12) or only rules out fields we may add.
_OUTPUT_ONLY_DROPS = frozenset({"description", "default", "examples", "format", "additionalProperties"})
# A published output schema is typed field by field as deep as fits this size, and at least its top
# level; deeper records are published as plain objects (contracts/ documents every level). Ten tools at
# about this size, with their descriptions and arguments, keep tools/list under 16 KB.
OUTPUT_SCHEMA_BYTES = 1_024
# A record whose top level alone is wider than this (a run, returned by five tools) keeps typed only
# its required fields and the ones a caller acts on, so the five copies stay small.
WIDE_RECORD_BYTES = 900
# The fields of a wide record that stay typed: what a caller acts on.
KEY_OUTPUT_FIELDS = frozenset({"status", "steps", "result", "verdict", "error", "parentId"})
OUTPUT_SCHEMA_MAX_DEPTH = 4


def published_output_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The compact output schema typed as deep as fits ``OUTPUT_SCHEMA_BYTES``; a record too wide
    for that even at its top level keeps its required fields and the ones a caller acts on typed
    (the rest stay allowed, as in every published schema, just not described)."""
    for depth in range(OUTPUT_SCHEMA_MAX_DEPTH, 1, -1):
        compact = compact_schema(schema, output_depth=depth)
        if len(json.dumps(compact, separators=(",", ":"))) <= OUTPUT_SCHEMA_BYTES:
            return compact
    compact = compact_schema(schema, output_depth=1)
    properties = compact.get("properties")
    if len(json.dumps(compact, separators=(",", ":"))) > WIDE_RECORD_BYTES and isinstance(properties, dict):
        keep = set(compact.get("required", ())) | KEY_OUTPUT_FIELDS
        compact["properties"] = {k: v for k, v in properties.items() if k in keep}
    return compact


def compact_schema(schema: Mapping[str, Any], *, output_depth: int | None = None) -> dict[str, Any]:
    """The schema ``tools/list`` publishes: the same constraints in fewer bytes.

    Always: ``$ref`` resolved in place (no ``$defs``), no generated titles, ``anyOf [X, null]``
    folded into X, no ``default: null``. For an output schema (read by a validator; what a model
    needs to know about a result is in the tool's description), given as ``output_depth``: no
    descriptions, defaults, formats or ``additionalProperties``, no ``type`` beside an ``enum``, and
    objects nested deeper than ``output_depth`` typed only as objects. Every result valid against the
    full schema is valid against the published one."""
    output = output_depth is not None
    return _compact(schema, schema.get("$defs", {}), output=output, depth=0, max_depth=output_depth or 0)


def _compact(
    node: Mapping[str, Any], defs: Mapping[str, Any], *, output: bool, depth: int, max_depth: int
) -> dict[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return _compact(defs[ref.removeprefix("#/$defs/")], defs, output=output, depth=depth, max_depth=max_depth)
    if output and node.get("type") == "object" and "properties" in node and depth >= max_depth:
        return {"type": "object"}
    inner = depth + 1 if node.get("type") == "object" else depth
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs") or (output and key in _OUTPUT_ONLY_DROPS) or (key == "default" and value is None):
            continue
        if key in _SCHEMA_MAPS and isinstance(value, Mapping):
            value = {k: _compact(v, defs, output=output, depth=inner, max_depth=max_depth) for k, v in value.items()}
        elif key in _SUBSCHEMA and isinstance(value, Mapping):
            value = _compact(value, defs, output=output, depth=inner, max_depth=max_depth)
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            value = [
                _compact(v, defs, output=output, depth=depth, max_depth=max_depth) if isinstance(v, Mapping) else v
                for v in value
            ]
        out[key] = value
    if output and "enum" in out:
        out.pop("type", None)
    return _fold_nullable(out, output=output)


def _fold_nullable(node: dict[str, Any], *, output: bool) -> dict[str, Any]:
    """``anyOf [X, {"type": "null"}]`` as X with null allowed, where X is a plain type or an enum."""
    options = node.get("anyOf")
    null = {"type": "null"}
    if not isinstance(options, list) or len(options) != 2 or null not in options:
        return node
    other = options[0] if options[1] == null else options[1]
    if not isinstance(other, dict) or other == null or other.keys() & {"anyOf", "oneOf", "allOf"}:
        return node
    folded = dict(other)
    if "const" in folded:
        folded["enum"] = [folded.pop("const")]
    if "enum" in folded:
        folded["enum"] = [*folded["enum"], None]
    kind = folded.get("type")
    if isinstance(kind, str):
        folded["type"] = [kind, "null"]
    elif "enum" not in folded and not (output and folded == {"type": "object"}):
        return node
    elif output and folded == {"type": "object"}:
        folded["type"] = ["object", "null"]
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    if rest.keys() & folded.keys():
        return node
    return rest | folded


class CollabServer(MCPServer[AppState]):
    """An ``MCPServer`` whose tools are registered when first needed, off the event loop, and listed
    with compact schemas. Registration builds every tool's argument model and output schema with
    pydantic: the largest part of start-up, which ``initialize`` does not need."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._registered = False
        self._listed: list[Tool] | None = None
        self._resources_registered = False
        self.engine_deferred = False  # see _Engine: true while serving stdio

    async def run_stdio_async(self) -> None:
        """``MCPServer.run_stdio_async``, with the engine started off the path to the first answer."""
        self.engine_deferred = True
        async with stdio_server() as (read_stream, write_stream):
            lowlevel = self._lowlevel_server
            await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())

    def _register_tools(self) -> None:
        with _LOADING:
            if self._registered:
                return
            build_wire_models()  # before the tools' schemas take them apart (five tools answer a Run)
            for spec in TOOL_SPECS:
                # A docstring's line breaks and indentation would cost every client's model bytes.
                text = spec.description or " ".join((spec.fn.__doc__ or "").split()) or None
                self.add_tool(spec.fn, title=spec.title, description=text, annotations=spec.annotations)
            self._registered = True

    async def ensure_tools(self) -> None:
        if not self._registered:
            await anyio.to_thread.run_sync(self._register_tools)

    async def list_tools(self) -> list[Tool]:
        await self.ensure_tools()
        if self._listed is None:
            self._listed = [
                tool.model_copy(
                    update={
                        "input_schema": compact_schema(tool.input_schema),
                        "output_schema": tool.output_schema and published_output_schema(tool.output_schema),
                    }
                )
                for tool in await super().list_tools()
            ]
        return list(self._listed)

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[AppState, Any] | None = None
    ) -> Any:
        await self.ensure_tools()
        return await super().call_tool(name, arguments, context)

    def _register_resources(self) -> None:
        """The resource templates, registered on the event loop when first needed: they are few and
        cheap, but not free, and ``initialize`` needs none of them."""
        if not self._resources_registered:
            for spec in RESOURCE_SPECS:
                self.resource(spec.uri, mime_type=spec.mime_type, description=spec.description)(spec.fn)
            self._resources_registered = True

    async def list_resource_templates(self) -> list[ResourceTemplate]:
        self._register_resources()
        return await super().list_resource_templates()

    async def read_resource(
        self, uri: AnyUrl | str, context: Context[AppState, Any] | None = None
    ) -> Iterable[ReadResourceContents] | InputRequiredResult:
        self._register_resources()
        return await super().read_resource(uri, context)

    def tool_result(self, name: str, value: Any) -> CallToolResult:
        """``value`` as tool ``name`` answers it on the wire (an MCP task's result, see tasks.py)."""
        self._register_tools()
        tool = self._tool_manager.get_tool(name)
        if tool is None:
            raise KeyError(name)
        return cast(CallToolResult, tool.fn_metadata.convert_result(value))


def build_server(
    settings: Settings | None = None,
    runtimes: Mapping[RuntimeMode, WorkerRuntime] | None = None,
    store: RunStore | None = None,
    *,
    heartbeat_s: float = PROGRESS_HEARTBEAT_S,
) -> MCPServer[AppState]:
    """The MCP server. ``settings`` default to the environment; ``runtimes`` to the real ones;
    ``store`` to the JSON store in the state directory (``serve`` opens it first, so a broken
    state directory is one clear line before any client connects); ``heartbeat_s`` is the longest
    a waiting call goes without a progress notification."""

    @asynccontextmanager
    async def lifespan(_: MCPServer[AppState]) -> AsyncIterator[AppState]:
        resolved = settings or Settings.from_env()
        engine = _Engine(resolved, store, runtimes)
        async with anyio.create_task_group() as tg:
            await tg.start(functools.partial(engine.run, deferred=mcp.engine_deferred))
            try:
                yield AppState(engine=engine, settings=resolved, heartbeat_s=heartbeat_s)
            finally:
                engine.stop()

    mcp = CollabServer(
        "mcp-collab",
        version=__version__,
        instructions=(
            "mcp-collab runs AI coding workers (Codex, Gemini, Claude). Register workers with "
            "spawn_worker, run a task with dispatch_task, and read the history with list_worker_runs "
            "and get_worker_run.\nStrategies:\n" + STRATEGY_GUIDE + "\n" + RUNTIME_GUIDE
        ),
        lifespan=lifespan,
        middleware=[_StrictArguments(lambda: mcp)],
        extensions=[TasksExtension(lambda run: mcp.tool_result(DISPATCH_TOOL, for_client(run)))],
    )

    return mcp


def _normalized(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def _closest(name: str, accepted: list[str]) -> str | None:
    """The accepted argument ``name`` is most likely a misspelling of, if any is close enough."""
    by_form = {_normalized(a): a for a in accepted}
    if _normalized(name) in by_form:
        return by_form[_normalized(name)]
    import difflib  # only a refusal needs it; not paid at start-up

    close = difflib.get_close_matches(_normalized(name), list(by_form), n=1, cutoff=TYPO_SIMILARITY)
    return by_form[close[0]] if close else None


def _client_injected(name: str, accepted: list[str]) -> bool:
    """An argument a client adds on its own: a name real clients are known to send, or one shaped so
    that no tool of ours can take it (a leading '_', as in _meta: the SDK refuses such parameters),
    unless it is close to one of ours."""
    if name in CLIENT_INJECTED_ARGUMENTS:
        return True
    return name.startswith("_") and _closest(name, accepted) is None


class _StrictArguments:
    """A tools/call naming an argument the tool does not take is refused, naming what it accepts,
    unless a client injected it.

    The rule, for each argument a tool does not take:
    - a name a real client is known to add to every tool and send (``CLIENT_INJECTED_ARGUMENTS``:
      gemini-cli's ``wait_for_previous``) is ignored, as is a name no tool of ours can take
      (starting with '_', like ``_meta``) unless it is close to one of ours (``_runId``); ignored
      names are logged at debug;
    - any other name is refused, with the tool's arguments listed and, when the name is close to
      one of them (the same letters ignoring case, '_' and '-', or a likely typo such as
      ``workingDirectry``), that one suggested.
    So a misspelt argument, or an option we do not offer (``access``, ``yolo``), never passes
    silently, while a client's own bookkeeping never breaks a call. The SDK drops the ignored names.
    """

    def __init__(self, server: Callable[[], MCPServer[AppState]]) -> None:
        self.server = server
        self.accepted: dict[str, list[str]] | None = None

    async def __call__(self, ctx: Any, call_next: Any) -> Any:
        params = ctx.params
        if ctx.method == "tools/call" and isinstance(params, Mapping):
            if self.accepted is None:
                self.accepted = {
                    t.name: list((t.input_schema or {}).get("properties", {})) for t in await self.server().list_tools()
                }
            arguments = params.get("arguments")
            tool = params.get("name")
            accepted = self.accepted.get(str(tool))
            if accepted is not None and isinstance(arguments, Mapping):
                unknown = [str(k) for k in arguments if k not in accepted]
                ignored = [k for k in unknown if _client_injected(k, accepted)]
                if ignored:
                    log.debug("%s: ignoring client-injected arguments %s", tool, listing(shown(k) for k in ignored))
                refused = [k for k in unknown if k not in ignored]
                if refused:
                    refusal = CallToolResult(
                        content=[TextContent(type="text", text=_unknown_arguments(str(tool), refused, accepted))],
                        is_error=True,
                    )
                    return _redacted(ctx, refusal)
        try:
            return _redacted(ctx, await call_next(ctx))
        except MCPError as exc:  # a resource read refused (unknown run) quotes the caller's id
            raise MCPError(exc.code, _redactor(ctx)(exc.message), exc.data) from None


def _unknown_arguments(tool: str, refused: list[str], accepted: list[str]) -> str:
    named = []
    for name in sorted(refused):
        close = _closest(name, accepted)
        named.append(f"{shown(name)} (did you mean {close!r}?)" if close else shown(name))
    return f"{tool} does not take {listing(named)}; its arguments are: {', '.join(accepted) or 'none'}"


def _redactor(ctx: Any) -> Redactor:
    state = getattr(ctx, "lifespan_context", None)
    return state.settings.redact if isinstance(state, AppState) else Redactor()


def _redacted(ctx: Any, result: Any) -> Any:
    """A refusal never echoes a credential: every error a tool returns passes the redactor here,
    ours (which quote the caller's input) and the SDK's own (argument validation quotes the values)."""
    redact = _redactor(ctx)
    if isinstance(result, CallToolResult) and result.is_error:
        for content in result.content:
            if isinstance(content, TextContent):
                content.text = redact(content.text)
    elif isinstance(result, dict) and result.get("isError"):  # what the SDK's chain hands back: the wire form
        for item in result.get("content") or ():
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                item["text"] = redact(item["text"])
    return result


# How deep the SDK's dispatch context may be wrapped before ``_wants_progress`` gives up looking.
DISPATCH_WRAPPERS = 3


class _Progress:
    """The orchestrator's progress callback for one tool call; ``run_id`` names the run in heartbeats
    (set once the run exists)."""

    def __init__(self, send: MemoryObjectSendStream[str], run_id: str | None) -> None:
        self._send = send
        self.run_id = run_id

    def __call__(self, message: str) -> None:
        with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):
            self._send.send_nowait(message)  # a slow client loses progress lines, never the run


def _wants_progress(ctx: Context) -> bool:
    """Did the client ask for progress on this call? On the wire, a progress token in the request's
    ``_meta`` (without one the SDK sends nothing). In process, the SDK's direct dispatch carries a
    callback instead of a token, which it exposes nowhere public: its dispatch context is looked at,
    and one of a shape not known here is taken as yes."""
    request = ctx.request_context
    if request.meta is not None and request.meta.get("progressToken") is not None:
        return True
    dispatch: Any = getattr(request.session, "_request_outbound", None)
    for _ in range(DISPATCH_WRAPPERS):
        if hasattr(dispatch, "_on_progress"):  # the direct (in-process) dispatch
            return dispatch._on_progress is not None
        if hasattr(dispatch, "_progress_token"):  # JSON-RPC: the token was in _meta, if anywhere
            return dispatch._progress_token is not None
        dispatch = getattr(dispatch, "_inner", None)  # a wrapper (the modern protocol's)
    return True


@asynccontextmanager
async def _progress(ctx: Context, run_id: str | None = None) -> AsyncIterator[_Progress | None]:
    """A sync callback for the orchestrator whose messages become MCP progress notifications, with a
    heartbeat whenever nothing was sent for ``heartbeat_s``: a client that restarts its timeout on
    progress then never times out while a run is quiet, whatever the orchestrator reports. None when
    the client asked for no progress: nothing would be sent, so nothing is forwarded."""
    if not _wants_progress(ctx):
        yield None
        return
    heartbeat_s = _state(ctx).heartbeat_s
    send, receive = anyio.create_memory_object_stream[str](max_buffer_size=PROGRESS_BUFFER)
    report = _Progress(send, run_id)

    async def forward() -> None:
        count = 0
        started = time.monotonic()
        async with receive:
            while True:
                message = None
                with anyio.move_on_after(heartbeat_s):
                    try:
                        message = await receive.receive()
                    except anyio.EndOfStream:
                        return
                if message is None:
                    message = f"run {report.run_id}: still waiting, {time.monotonic() - started:.0f}s so far"
                count += 1
                await ctx.report_progress(count, None, message)

    async with anyio.create_task_group() as tg:
        tg.start_soon(forward)
        try:
            yield report
        finally:
            send.close()
