"""The MCP edge: tools and resources over the WorkerOrchestrator. No logic lives here.

Every tool is ``async``; every refusal is a ``ToolError`` whose message says what was wrong and
what is accepted; anything unexpected is logged to stderr with its traceback and reported to the
client as a short internal error. Tool results are capped (about 20 KB) so clients with a token
budget stay safe; full outputs are MCP resources (``runs://{runId}``,
``runs://{runId}/steps/{index}/output``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, ParamSpec, TypeVar, cast

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult, TextContent
from pydantic import Field, ValidationError

from . import __version__, readiness
from .config import Settings
from .errors import CollabError, NoFittingWorkerError, StoreError, UnknownRunError, listing, shown
from .models import (
    MAX_ROUNDS,
    DispatchRequest,
    FallbackPolicy,
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
    describe_validation_error,
)
from .orchestrator import MAX_PAGE_SIZE, WorkerOrchestrator
from .runtimes.base import WorkerRuntime
from .security import Redactor
from .store import RunStore, cursor_after
from .strategies import STRATEGIES

log = logging.getLogger("mcp_collab.server")

# A tool result stays under about 20 KB so a client with a per-result token cap is never flooded.
# The result carries its JSON twice (structuredContent, and indented text for older clients), so
# the compact JSON gets well under half of that.
RESULT_BUDGET_BYTES = 8_000
MIN_PREVIEW_CHARS = 120
LIST_PREVIEW_CHARS = 160
# Blocking tools return before a client's request timeout (the TypeScript SDK gives up at 60 s).
DEFAULT_WAIT_S = 45.0
MAX_WAIT_S = 55.0
PROGRESS_BUFFER = 1000
MAX_ERROR_CHARS = 4_000

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class AppState:
    orchestrator: WorkerOrchestrator
    settings: Settings


class WorkerList(WireModel):
    workers: list[Worker]


class DeliveryResult(WireModel):
    run: Run
    applied: bool = Field(description="True when the changes are now in the working tree.")
    files: list[str] = Field(description="The files changed, or the files in the way of a refused apply.")
    message: str


class CancelResult(WireModel):
    run: Run
    cancelled: bool = Field(description="False when the run had already ended.")
    message: str


def _clip(text: str, limit: int, uri: str) -> tuple[str, bool]:
    if len(text) <= limit:
        return text, False
    return f"{text[:limit]}\n[... {len(text) - limit} more characters: read {uri} ...]", True


def _size(model: WireModel) -> int:
    return len(model.model_dump_json(by_alias=True))


def for_client(run: Run, budget: int = RESULT_BUDGET_BYTES) -> Run:
    """A copy of ``run`` that fits the inline budget; the full texts stay readable as resources."""
    limit = budget
    while True:
        view = run.model_copy(deep=True)
        view.task, _ = _clip(view.task, limit, f"runs://{run.id}")
        for step in view.steps:
            step.output, clipped = _clip(step.output, limit, f"runs://{run.id}/steps/{step.index}/output")
            step.output_truncated = step.output_truncated or clipped
        if view.result is not None:
            view.result, _ = _clip(view.result, limit, f"runs://{run.id}/steps/{len(run.steps) - 1}/output")
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
        return RunSummaryPage(runs=runs, next_cursor=page.next_cursor)
    return RunSummaryPage(runs=runs[:kept], next_cursor=cursor_after(page.runs[kept - 1]))


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


STRATEGY_GUIDE = "\n".join(f"- {s.name}: {s.summary}" for s in STRATEGIES.values())
RUNTIME_GUIDE = (
    "Runtime modes: 'cli' runs the vendor's CLI (codex, gemini, claude) as a subprocess in the "
    "working directory, so it can read and edit files; 'openai_sdk' (codex workers) and 'google_sdk' "
    "(gemini workers) call the vendor API directly and only produce text. Under the 'on_error' "
    "fallback policy an SDK step that fails for a retry-safe reason (missing key, network, 429, 5xx) "
    "runs again through 'cli'; each step records runtimeMode (what ran) and fallbackFrom."
)


def build_server(
    settings: Settings | None = None,
    runtimes: Mapping[RuntimeMode, WorkerRuntime] | None = None,
    store: RunStore | None = None,
) -> MCPServer[AppState]:
    """The MCP server. ``settings`` default to the environment; ``runtimes`` to the real ones;
    ``store`` to the JSON store in the state directory (``serve`` opens it first, so a broken
    state directory is one clear line before any client connects)."""

    @asynccontextmanager
    async def lifespan(_: MCPServer[AppState]) -> AsyncIterator[AppState]:
        resolved = settings or Settings.from_env()
        # Runs live in the orchestrator's task group, owned by this lifespan: a request that times
        # out, is cancelled or disconnects does not take its run with it.
        orchestrator = WorkerOrchestrator(resolved, store=store, runtimes=runtimes)
        async with orchestrator, orchestrator.running():
            yield AppState(orchestrator=orchestrator, settings=resolved)

    mcp: MCPServer[AppState] = MCPServer(
        "mcp-collab",
        version=__version__,
        instructions=(
            "mcp-collab runs AI coding workers (Codex, Gemini, Claude). Register workers with "
            "spawn_worker, run a task with dispatch_task, and read the history with list_worker_runs "
            "and get_worker_run.\nStrategies:\n" + STRATEGY_GUIDE + "\n" + RUNTIME_GUIDE
        ),
        lifespan=lifespan,
        middleware=[_StrictArguments(lambda: mcp)],
    )

    @mcp.tool()
    @tool_errors
    async def spawn_worker(
        ctx: Context,
        name: Annotated[str, Field(description="Unique worker name, e.g. 'codex-writer'.")],
        model: Annotated[WorkerModel, Field(description="Worker identity: codex_cli, gemini_cli or claude_cli.")],
        runtimeMode: Annotated[
            RuntimeMode | None,
            Field(description="Default runtime: cli; openai_sdk (codex only); google_sdk (gemini only)."),
        ] = None,
        fallbackPolicy: Annotated[FallbackPolicy | None, Field(description="on_error or never.")] = None,
        instructions: Annotated[str, Field(description="Standing instructions given on every step.")] = "",
        sdkModel: Annotated[str | None, Field(description="Model for the SDK runtime.")] = None,
        cliModel: Annotated[str | None, Field(description="Model passed to the CLI's -m/--model.")] = None,
        timeoutSeconds: Annotated[float | None, Field(description="Wall-clock limit per step.")] = None,
        workingDirectory: Annotated[str | None, Field(description="Absolute directory it works in.")] = None,
    ) -> Worker:
        """Register a worker profile: a named Codex, Gemini or Claude agent with its default runtime.

        Register once, then name the worker in dispatch_task. Fails if the name is taken or the
        runtime mode does not fit the model."""
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
        return await _state(ctx).orchestrator.register_worker(spec)

    @mcp.tool()
    @tool_errors
    async def list_workers(ctx: Context) -> WorkerList:
        """List the registered worker profiles."""
        return WorkerList(workers=await _state(ctx).orchestrator.list_workers())

    @mcp.tool()
    @tool_errors
    async def remove_worker(ctx: Context, name: str) -> Worker:
        """Remove a worker profile by name. Its past runs stay in the history."""
        return await _state(ctx).orchestrator.remove_worker(name)

    @mcp.tool(description=_dispatch_description())
    @tool_errors
    async def dispatch_task(
        ctx: Context,
        task: Annotated[str, Field(description="What the workers should do, in plain words.")],
        strategy: Annotated[str, Field(description=f"One of: {', '.join(STRATEGIES)}.")] = "single_worker",
        workers: Annotated[list[str] | None, Field(description="Worker names in the strategy's role order.")] = None,
        runtimeMode: Annotated[RuntimeMode | None, Field(description="Run every step through this runtime.")] = None,
        runtimeModes: Annotated[
            dict[str, RuntimeMode] | None,
            Field(description="Per-worker runtime, by worker name; wins over runtimeMode."),
        ] = None,
        fallbackPolicy: Annotated[FallbackPolicy | None, Field(description="Override: on_error or never.")] = None,
        workingDirectory: Annotated[str | None, Field(description="Absolute directory the workers run in.")] = None,
        waitSeconds: Annotated[
            float, Field(ge=0, le=MAX_WAIT_S, description="How long to wait for the run to finish before returning.")
        ] = DEFAULT_WAIT_S,
        maxRounds: Annotated[
            int | None, Field(ge=1, le=MAX_ROUNDS, description="review_loop: most rounds (default 3).")
        ] = None,
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
        )
        orchestrator = _state(ctx).orchestrator
        run = await orchestrator.start(request)
        async with _progress(ctx) as report:
            run = await orchestrator.wait(run.id, waitSeconds, on_progress=report)
        return for_client(run)

    @mcp.tool()
    @tool_errors
    async def list_worker_runs(
        ctx: Context,
        status: Annotated[RunStatus | None, Field(description="Only runs in this status.")] = None,
        strategy: Annotated[str | None, Field(description="Only runs of this strategy.")] = None,
        worker: Annotated[str | None, Field(description="Only runs in which this worker took a step.")] = None,
        limit: Annotated[int, Field(ge=1, le=MAX_PAGE_SIZE, description="Page size.")] = 20,
        cursor: Annotated[str | None, Field(description="nextCursor from the previous page.")] = None,
    ) -> RunSummaryPage:
        """List runs, newest first: each with its steps (worker, runtimeMode, fallbackFrom, status) and
        the start of each output. A page stops early (with nextCursor) rather than exceed ~20 KB;
        get_worker_run shows one run in full."""
        page = await _state(ctx).orchestrator.list_runs(
            status=status, strategy=strategy, worker=worker, limit=limit, cursor=cursor
        )
        return page_for_client(page, cursor_after)

    @mcp.tool()
    @tool_errors
    async def get_worker_run(ctx: Context, runId: str) -> Run:
        """One run with all its steps and attempts. Long outputs are shortened inline; the resource
        runs://{runId}/steps/{index}/output holds each step's full output."""
        return for_client(await _state(ctx).orchestrator.get_run(runId))

    @mcp.tool()
    @tool_errors
    async def wait_worker_run(
        ctx: Context,
        runId: str,
        timeoutSeconds: Annotated[
            float, Field(ge=0, le=MAX_WAIT_S, description="Return after this long even if the run goes on.")
        ] = DEFAULT_WAIT_S,
    ) -> Run:
        """Wait for a run started by dispatch_task to finish, up to timeoutSeconds (at most 55 s so no
        client times out), with progress notifications meanwhile. Returns the run: if its status is still
        queued or running, call wait_worker_run again. Works from any session of this server."""
        async with _progress(ctx) as report:
            run = await _state(ctx).orchestrator.wait(runId, timeoutSeconds, on_progress=report)
        return for_client(run)

    @mcp.tool()
    @tool_errors
    async def cancel_worker_run(ctx: Context, runId: str) -> CancelResult:
        """Cancel a queued or running run: its CLI processes are killed (the whole process tree), the
        run and its open step become cancelled, and the output produced so far is kept. Cancelling a
        run that already ended changes nothing and says so."""
        run, cancelled = await _state(ctx).orchestrator.cancel(runId)
        message = (
            f"run {runId} cancelled; its processes were stopped"
            if cancelled
            else f"run {runId} had already ended ({run.status}); nothing to cancel"
        )
        return CancelResult(run=for_client(run), cancelled=cancelled, message=message)

    @mcp.tool()
    @tool_errors
    async def apply_worker_run(
        ctx: Context,
        runId: str,
        branch: Annotated[
            str | None, Field(description="best_of_n: the label of the branch to apply; default: the judge's choice.")
        ] = None,
    ) -> DeliveryResult:
        """Apply a finished run's work (its worktree branch) to your working tree: every change, or
        none with a refusal naming the files in the way (local changes, conflicts). Nothing is staged
        or committed; your index and branches are untouched."""
        done = await _state(ctx).orchestrator.apply(runId, branch)
        return DeliveryResult(
            run=for_client(done.run), applied=done.applied, files=list(done.files), message=done.message
        )

    @mcp.tool()
    @tool_errors
    async def discard_worker_run(ctx: Context, runId: str) -> DeliveryResult:
        """Discard a finished run's work: its worktrees and branches are removed. The run's record
        (with its diff) stays in the history."""
        done = await _state(ctx).orchestrator.discard(runId)
        return DeliveryResult(run=for_client(done.run), applied=False, files=[], message=done.message)

    @mcp.tool()
    @tool_errors
    async def check_runtimes(ctx: Context) -> readiness.ReadinessReport:
        """Which runtimes can run here now: CLIs found and their versions, credentials present (never
        their values), SDKs importable, the store writable; each failure with a hint to fix it."""
        state = _state(ctx)
        # Reading the store first finds (and repairs, keeping the original aside) damage done to
        # it since the last call, so the report below lists it.
        with contextlib.suppress(StoreError):
            await state.orchestrator.list_workers()
        return await readiness.check(state.settings)

    @mcp.resource("runs://{run_id}", mime_type="application/json", description="A whole run, full outputs.")
    @resource_errors
    async def run_resource(run_id: str, ctx: Context) -> str:
        run = await _state(ctx).orchestrator.get_run(run_id)
        return json.dumps(run.model_dump(mode="json", by_alias=True), ensure_ascii=False, indent=1)

    @mcp.resource("runs://{run_id}/steps/{index}/output", mime_type="text/plain", description="A step's full output.")
    @resource_errors
    async def step_output(run_id: str, index: str, ctx: Context) -> str:
        run = await _state(ctx).orchestrator.get_run(run_id)
        if not index.isdigit() or int(index) >= len(run.steps):
            steps = f"steps 0 to {len(run.steps) - 1}" if run.steps else "no steps"
            raise ResourceNotFoundError(
                f"run {run_id} has {steps}; got step {shown(index)}. Accepted: runs://{run_id}/steps/N/output"
            )
        return run.steps[int(index)].output

    return mcp


class _StrictArguments:
    """A tools/call naming an argument the tool does not take is refused, naming what it accepts.

    The SDK would drop unknown arguments silently; a client that misspells `runtimeMode`, or tries
    an option we do not offer, deserves to hear that nothing happened."""

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
            accepted = self.accepted.get(str(params.get("name")))
            if accepted is not None and isinstance(arguments, Mapping):
                unknown = sorted(shown(str(k)) for k in arguments if k not in accepted)
                if unknown:
                    message = (
                        f"{params.get('name')} does not take {listing(unknown)}; "
                        f"its arguments are: {', '.join(accepted) or 'none'}"
                    )
                    refusal = CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)
                    return _redacted(ctx, refusal)
        try:
            return _redacted(ctx, await call_next(ctx))
        except MCPError as exc:  # a resource read refused (unknown run) quotes the caller's id
            raise MCPError(exc.code, _redactor(ctx)(exc.message), exc.data) from None


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


def _dispatch_description() -> str:
    return (
        "Run a task through a collaboration strategy and return the run with its steps. Waits up to "
        "waitSeconds (default 45) for it to finish; a longer run keeps going in the server and comes back "
        "with status queued or running and its id: follow it with wait_worker_run, stop it with "
        "cancel_worker_run. Progress notifications report each step and the workers' own events.\n"
        "Strategies:\n" + STRATEGY_GUIDE + "\n"
        "Workers: named ones in role order, else the first registered worker of the model each role needs.\n"
        + RUNTIME_GUIDE
    )


@asynccontextmanager
async def _progress(ctx: Context) -> AsyncIterator[Callable[[str], None]]:
    """A sync callback for the orchestrator whose messages become MCP progress notifications."""
    send, receive = anyio.create_memory_object_stream[str](max_buffer_size=PROGRESS_BUFFER)

    def report(message: str) -> None:
        with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):
            send.send_nowait(message)  # a slow client loses progress lines, never the run

    async def forward() -> None:
        count = 0
        async with receive:
            async for message in receive:
                count += 1
                await ctx.report_progress(count, None, message)

    async with anyio.create_task_group() as tg:
        tg.start_soon(forward)
        try:
            yield report
        finally:
            send.close()
