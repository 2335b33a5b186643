"""MCP tasks (SEP-2663, extension ``io.modelcontextprotocol/tasks``): a long ``dispatch_task`` as a
task the client polls, instead of a tool call that must end before the client's tool timeout.

A client that declares the extension on its ``tools/call`` (protocol 2026-07-28 and later; the
extension does not exist on older wires) gets, for a run that is still going after
``TASK_INLINE_WAIT_S``, a ``CreateTaskResult`` (``resultType: "task"``) instead of the run. The task
is the run: its id is the run's id, so the run store is the task store and a ``tasks/get`` after a
server restart answers from it with no state of its own. Run ids are listed to every client by
``list_worker_runs``, so a task id is no more a secret than a run id; each client of this server
has the same authority over every run.

The run's status as a task's:

- ``queued``/``running``: ``working``, its ``statusMessage`` saying where the run stands (the SEP
  carries progress there; ``notifications/progress`` is not used with tasks);
- ``completed``, ``failed``, ``interrupted``: ``completed``, its ``result`` exactly the
  ``CallToolResult`` ``dispatch_task`` answers for that run (shortened as always). A run that failed
  is a tool-level outcome, not a JSON-RPC error, and the SEP reserves ``failed`` for the latter;
- ``cancelled``: ``cancelled``, with the reason; the run (partial output kept) stays readable with
  ``get_worker_run``.

``tasks/cancel`` cancels the run (its process trees are killed) and acknowledges once it has
settled; ``tasks/update`` has nothing to take (no run asks the client for input) and acknowledges a
known task. An unknown task id is ``-32602``, a client that did not declare the extension
``-32021``.

Clients without the extension are untouched: ``dispatch_task`` waits up to ``waitSeconds`` and
returns the run, followed with ``wait_worker_run``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from mcp.server.context import ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.server.mcpserver import require_client_extension
from mcp.shared.exceptions import MCPError
from mcp.types import INTERNAL_ERROR, INVALID_PARAMS, CallToolRequestParams, CallToolResult, RequestParams
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ConfigDict, Field

from .errors import CollabError, InvalidRequestError, UnknownRunError, shown
from .models import TERMINAL_RUN_STATUSES, Run

__all__ = ["DISPATCH_TOOL", "TASKS_EXTENSION", "TasksExtension"]

TASKS_EXTENSION = "io.modelcontextprotocol/tasks"
DISPATCH_TOOL = "dispatch_task"
# A run that ends this fast is answered at once, as to any client: a task would only add a poll.
TASK_INLINE_WAIT_S = 1.0
# How often a client should poll: a tasks/get is one read of the run's file, and a person waiting
# for a run that takes minutes does not notice two seconds.
TASK_POLL_INTERVAL_MS = 2_000
MS_PER_DAY = 86_400_000

ResultOf = Callable[[Run], CallToolResult]


class TaskParams(RequestParams):
    """``tasks/get`` and ``tasks/cancel``: the task's id."""

    # Built when a task is first asked about, not at start: the server's first answer needs neither.
    model_config = ConfigDict(defer_build=True)

    task_id: str = Field(alias="taskId", min_length=1)


class UpdateTaskParams(TaskParams):
    input_responses: dict[str, Any] | None = Field(default=None, alias="inputResponses")


def declared(ctx: ServerRequestContext[Any, Any]) -> bool:
    """Did the client declare the extension on this request, on a wire where it exists?"""
    if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        return False
    capabilities = ctx.session.client_capabilities
    extensions = capabilities.extensions if capabilities is not None else None
    return extensions is not None and TASKS_EXTENSION in extensions


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _last_update(run: Run) -> datetime:
    moments = [run.created_at, run.started_at, run.ended_at]
    for step in run.steps:
        moments += [step.started_at, step.ended_at]
    return max(m for m in moments if m is not None)


class TasksExtension(Extension):
    """Serves ``dispatch_task`` as a task to clients that declare the extension (see the module doc).

    ``result_of`` turns a run into the ``CallToolResult`` ``dispatch_task`` answers for it."""

    identifier = TASKS_EXTENSION

    def __init__(self, result_of: ResultOf) -> None:
        self._result_of = result_of

    def methods(self) -> Sequence[MethodBinding]:
        versions = frozenset(MODERN_PROTOCOL_VERSIONS)
        return (
            MethodBinding("tasks/get", TaskParams, self._get, versions),
            MethodBinding("tasks/update", UpdateTaskParams, self._update, versions),
            MethodBinding("tasks/cancel", TaskParams, self._cancel, versions),
        )

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: Any
    ) -> Any:
        if params.name != DISPATCH_TOOL or not declared(ctx):
            return await call_next(ctx)
        arguments = params.arguments
        if arguments is not None:
            # The run goes on in the background either way; a task client only waits long enough to
            # be answered at once when the run is that short. A wait the tool would refuse is left
            # for it to refuse.
            wait = arguments.get("waitSeconds", TASK_INLINE_WAIT_S)
            if isinstance(wait, int | float) and not isinstance(wait, bool) and 0 <= wait:
                arguments["waitSeconds"] = min(wait, TASK_INLINE_WAIT_S)
        result = await call_next(ctx)
        run = _run_of(result)
        if run is None or run.status in TERMINAL_RUN_STATUSES:
            return result  # a refusal, or a run already over: the ordinary answer
        # The run was stored durably when it was admitted, so a tasks/get for it resolves now.
        return {"resultType": "task", **_task(ctx, run)}

    # -- the methods ---------------------------------------------------------------------------

    async def _get(self, ctx: ServerRequestContext[Any, Any], params: TaskParams) -> dict[str, Any]:
        require_client_extension(ctx, TASKS_EXTENSION)
        # wait(0) is the run's latest settled state: a finished run from memory, a running one as
        # stored, and one whose server died marked interrupted first.
        run = await _known(ctx, params.task_id, lambda o: o.wait(params.task_id, 0))
        task = _task(ctx, run)
        if task["status"] == "completed":
            task["result"] = self._result_of(run).model_dump(mode="json", by_alias=True, exclude_none=True)
        return {"resultType": "complete", **task}

    async def _update(self, ctx: ServerRequestContext[Any, Any], params: UpdateTaskParams) -> dict[str, Any]:
        require_client_extension(ctx, TASKS_EXTENSION)
        # No run asks its client for input, so every response is for a request not outstanding,
        # which the SEP says to ignore; an unknown task is still an error.
        await _known(ctx, params.task_id, lambda o: o.get_run(params.task_id))
        return {"resultType": "complete"}

    async def _cancel(self, ctx: ServerRequestContext[Any, Any], params: TaskParams) -> dict[str, Any]:
        require_client_extension(ctx, TASKS_EXTENSION)
        reason = "cancelled by the client (tasks/cancel)"
        await _known(ctx, params.task_id, lambda o: o.cancel(params.task_id, reason=reason))
        return {"resultType": "complete"}


def _task(ctx: ServerRequestContext[Any, Any], run: Run) -> dict[str, Any]:
    """The task a run is. Its time to live is the store's retention by age (runs beyond the retained
    count may go sooner, which the SEP allows: a purged task is an unknown one)."""
    from .engine.lifecycle import where  # loaded with the engine, which answered for the run

    if run.status in ("queued", "running"):
        status, message = "working", f"run {run.id} {run.status}: {where(run)}"
    elif run.status == "cancelled":
        status, message = "cancelled", f"run {run.id} cancelled: {run.error or 'on request'}"
    else:
        status = "completed"
        message = f"run {run.id} {run.status}" + (f": {run.error}" if run.error else "")
    days = ctx.lifespan_context.settings.retain_days
    return {
        "taskId": run.id,
        "status": status,
        "statusMessage": message,
        "createdAt": _iso(run.created_at),
        "lastUpdatedAt": _iso(_last_update(run)),
        "ttlMs": round(days * MS_PER_DAY) if days else None,
        "pollIntervalMs": TASK_POLL_INTERVAL_MS,
    }


def _run_of(result: Any) -> Run | None:
    """The run a successful ``dispatch_task`` answered with; None for a refusal."""
    if not isinstance(result, CallToolResult) or result.is_error or result.structured_content is None:
        return None
    return Run.model_validate(result.structured_content)


async def _known(ctx: ServerRequestContext[Any, Any], task_id: str, act: Callable[[Any], Any]) -> Any:
    """``act`` on the orchestrator for a task's run, its failures as the SEP's JSON-RPC errors."""
    try:
        return await act(await ctx.lifespan_context.orchestrator())
    except UnknownRunError:
        raise MCPError(
            INVALID_PARAMS,
            f"Failed to retrieve task: no task {shown(task_id)} here (a task is a run of dispatch_task; "
            "list_worker_runs shows the runs this server keeps)",
        ) from None
    except InvalidRequestError as exc:  # a run another server process executes: cancel it there
        raise MCPError(INVALID_PARAMS, str(exc)) from None
    except CollabError as exc:
        raise MCPError(INTERNAL_ERROR, f"task {shown(task_id)} could not be read: {exc}") from None
