"""Conversations that continue: a follow-up to a finished run, as a new run linked to its parent.

The follow-up goes to one worker of the parent (by default the one whose work the run produced: the
last writing step, or best_of_n's chosen writer; else the last step), in the same place: the
parent's worktree while it is still active (so the branch holds all the work), else a new one, or
the same directory outside git. The vendor's own session is resumed where the runtime can (codex
``exec resume``, ``claude --resume``, the Responses API's ``previous_response_id`` ...); the prompt
also carries the recorded history (the task, the worker's answer, its diff), so a runtime that
cannot resume, or finds the session gone, continues from that instead, and the step records which
(``continuation``: ``session`` or ``history``). It works after a server restart: everything it needs
is in the store.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Settings
from ..errors import InvalidRequestError, UnknownWorkerError, listing, shown
from ..models import TERMINAL_RUN_STATUSES, Run, RunWorktree, Step, Worker, no_control_chars
from ..runtimes.base import Resume
from ..runtimes.selector import choose_policy
from ..strategies import STRATEGIES, Role, RunContext, Strategy
from ..strategies.prompts import MAX_QUOTED_OUTPUT_CHARS, diff_block, quote
from .plan import Plan, new_run_id

CONTINUE = "continue"
# Roles that write when the stored step predates the record of its access.
_WRITING_ROLES = frozenset({"worker", "writer"})


def _access_of(step: Step) -> str:
    return step.access or ("workspace_write" if step.role in _WRITING_ROLES else "read_only")


def pick_step(parent: Run, worker: str | None) -> Step:
    """The step a follow-up continues."""
    done = [s for s in parent.steps if s.status in ("completed", "failed", "cancelled", "interrupted")]
    if not done:
        raise InvalidRequestError(f"run {parent.id} has no step to continue")
    if worker is not None:
        mine = [s for s in done if s.worker_name == worker]
        if not mine:
            names = listing(sorted({s.worker_name for s in done}))
            raise InvalidRequestError(f"worker {shown(worker)} took no step in run {parent.id}; its workers: {names}")
        return mine[-1]
    if parent.chosen is not None:
        chosen = [s for s in done if s.branch == parent.chosen and _access_of(s) != "read_only"]
        if chosen:
            return chosen[-1]
    writing = [s for s in done if _access_of(s) != "read_only"]
    return (writing or done)[-1]


def history_prompt(parent: Run, step: Step, message: str, diff: str | None) -> str:
    """The follow-up with the conversation so far, for a runtime that cannot resume the session."""
    return (
        "This continues earlier work of yours. The task you were given, your answer and, where you "
        "changed files, your diff follow; then the follow-up to act on now.\n\n"
        f"<earlier_task>\n{quote(parent.task, MAX_QUOTED_OUTPUT_CHARS)}\n</earlier_task>\n\n"
        f"<your_answer>\n{quote(step.output, MAX_QUOTED_OUTPUT_CHARS)}\n</your_answer>\n\n"
        + (f"{diff_block(diff, missing=None)}\n\n" if diff else "")
        + f"<follow_up>\n{message}\n</follow_up>"
    )


def worktree_of(parent: Run, step: Step) -> RunWorktree | None:
    if step.directory is None:
        return None
    for record in parent.worktrees:
        if step.directory == record.path or step.directory.startswith(record.path.rstrip("/") + "/"):
            return record
    return None


class Continuation:
    """What the continue program needs; kept on the plan."""

    def __init__(self, parent: Run, step: Step, worker: Worker, role: Role, message: str) -> None:
        self.parent = parent
        self.step = step
        self.worker = worker
        self.role = role
        self.message = message
        self.worktree = worktree_of(parent, step)


def make_plan(settings: Settings, parent: Run, message: str, worker_name: str | None, registered: list[Worker]) -> Plan:
    if parent.status not in TERMINAL_RUN_STATUSES:
        raise InvalidRequestError(f"run {parent.id} is {parent.status}; continue it once it has ended")
    if not message.strip():
        raise InvalidRequestError("message must not be blank: say what the worker should do next")
    try:
        no_control_chars(message)
    except ValueError as exc:
        raise InvalidRequestError(f"message {exc}") from None
    if len(message) > settings.max_task_chars:
        raise InvalidRequestError(
            f"message is {len(message)} characters; the limit is {settings.max_task_chars} (MCP_COLLAB_MAX_TASK_CHARS)"
        )
    step = pick_step(parent, worker_name)
    worker = next((w for w in registered if w.name == step.worker_name), None)
    if worker is None:
        raise UnknownWorkerError(
            f"worker {step.worker_name!r} of run {parent.id} is no longer registered; register it again "
            "(same name and model) to continue its work"
        )
    original = STRATEGIES.get(parent.strategy)
    known = next((r for r in original.roles if r.name == step.role), None) if original else None
    role = known or Role(step.role, None, _access_of(step))  # type: ignore[arg-type]
    mode = step.runtime_mode or settings.default_runtime  # the runtime that holds the session
    directory = Path(step.directory) if step.directory else None
    run = Run(
        id=new_run_id(),
        task=settings.redact(message),
        strategy=CONTINUE,
        status="queued",
        workers=[worker.name],
        parent_id=parent.id,
    )
    plan = Plan(
        run,
        CONTINUE_STRATEGY,
        [(role, worker)],
        {worker.name: mode},
        {worker.name: choose_policy(worker, default=settings.fallback_policy, dispatch=None)},
        cwd=None,
        default_cwd=directory,
        task=message,
    )
    plan.continuation = Continuation(parent, step, worker, role, message)
    return plan


async def _program(run: RunContext) -> None:
    from .executor import EngineContext

    assert isinstance(run, EngineContext)
    info = run.active.plan.continuation
    assert info is not None
    space = await run.spaces.continue_in(info.parent, info.worktree, info.step)
    diff = await space.diff() if space is not None else None
    prompt = history_prompt(info.parent, info.step, info.message, diff)
    resume = Resume(info.step.session_id, info.message) if info.step.session_id else None
    directory = space.directory if space is not None else run.active.plan.default_cwd
    step = await run.executor.run(run.active, info.worker, info.role, prompt, directory=directory, resume=resume)
    if resume is None and step.status == "completed":
        step.continuation = "history"
    run.require(step)


CONTINUE_STRATEGY = Strategy(
    name=CONTINUE,
    summary="A follow-up to a finished run (continue_worker_run): its worker resumes in the same place.",
    roles=(),
    run=_program,
    internal=True,
)
STRATEGIES[CONTINUE] = CONTINUE_STRATEGY
