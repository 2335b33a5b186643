"""A run before it starts: its strategy, the workers cast into its roles, their runtimes, where
they work. Everything a dispatch can get wrong is refused here, before anything is stored."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from ..config import Settings
from ..errors import InvalidRequestError, StoreError, listing, shown
from ..models import DispatchRequest, FallbackPolicy, Run, RunStatus, RuntimeMode, Worker
from ..runtimes.base import PartialOutput
from ..runtimes.selector import choose_mode, choose_policy
from ..security import Redactor, confine

if TYPE_CHECKING:
    from .continuation import Continuation
    from .spaces import Spaces

from ..strategies import STRATEGIES, Role, Strategy, cast_workers, get_strategy

ProgressCallback = Callable[[str], None]


def new_run_id() -> str:
    # Sortable by creation time at a glance, unique across processes.
    return f"run-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(4)}"


@dataclass
class Plan:
    run: Run
    strategy: Strategy
    cast: list[tuple[Role, Worker]]
    modes: dict[str, RuntimeMode]  # by worker name
    policies: dict[str, FallbackPolicy]
    cwd: Path | None  # the dispatch's directory; None: each worker's own, else the default
    default_cwd: Path | None
    task: str  # as the caller wrote it, for the workers; the run record keeps it redacted
    max_rounds: int | None = None
    continuation: Continuation | None = None  # a follow-up's parent, step and message

    def directory_of(self, worker: Worker) -> Path | None:
        if self.cwd is not None:
            return self.cwd
        return Path(worker.working_directory) if worker.working_directory else self.default_cwd


@dataclass(eq=False)
class ActiveRun:
    """A run this process is executing: its plan, how to stop it, and who is listening."""

    plan: Plan
    done: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    stop_reason: tuple[RunStatus, str] | None = None
    listeners: list[ProgressCallback] = field(default_factory=list)
    partials: dict[int, PartialOutput] = field(default_factory=dict)  # by step index, while it runs
    redact: Redactor = field(default_factory=Redactor)
    spaces: Spaces | None = None  # once the run started
    # Progress said while the run's admission is not yet durable, held back until it is (``release``):
    # nobody hears of a run a power cut could still lose. None: nothing held.
    held: list[str] | None = None
    admission_error: StoreError | None = None  # why the admission could not be made durable

    @property
    def run(self) -> Run:
        return self.plan.run

    def emit(self, message: str) -> None:
        if not self.listeners:
            return  # nobody to tell (one who starts listening later hears from then on)
        message = self.redact(message)
        if self.held is not None:
            self.held.append(message)
            return
        for listener in list(self.listeners):
            listener(message)

    def release(self) -> None:
        """The admission is durable: what was held back is said now, and everything from now on."""
        held, self.held = self.held or [], None
        for message in held:
            for listener in list(self.listeners):
                listener(message)


Confiner = Callable[[str, "tuple[Path, ...]"], Path]


def make_plan(
    settings: Settings,
    request: DispatchRequest,
    registered: list[Worker],
    *,
    roots: tuple[Path, ...] | None = None,
    confiner: Confiner = confine,
    default_cwd: bool = True,
) -> Plan:
    """``roots`` and ``confiner``: where directories may be and how they are checked (this
    machine's roots, resolved on its disk, unless the steps run on other machines); ``default_cwd``:
    resolve the directory of a step that names none here (else where the step runs)."""
    if len(request.task) > settings.max_task_chars:
        raise InvalidRequestError(
            f"task is {len(request.task)} characters; the limit is {settings.max_task_chars} "
            "(MCP_COLLAB_MAX_TASK_CHARS). Put long material in a file in the working directory and refer to it."
        )
    strategy = get_strategy(request.strategy, dispatchable=True)
    if request.max_rounds is not None and not strategy.loops:
        looping = ", ".join(s.name for s in STRATEGIES.values() if s.loops)
        raise InvalidRequestError(f"maxRounds applies to {looping}, not to {strategy.name!r}; leave it out")
    cast = cast_workers(strategy, registered, request.workers)
    workers = list({w.name: w for _, w in cast}.values())
    runtime_modes = request.runtime_modes or {}
    unknown = sorted(set(runtime_modes) - {w.name for w in workers})
    if unknown:
        raise InvalidRequestError(
            f"runtimeModes names {listing(map(shown, unknown))}, which take no step in this run; "
            f"its workers are: {', '.join(w.name for w in workers)}"
        )
    modes = {
        w.name: choose_mode(
            w, default=settings.default_runtime, dispatch_mode=request.runtime_mode, per_worker=runtime_modes
        )
        for w in workers
    }
    policies = {
        w.name: choose_policy(w, default=settings.fallback_policy, dispatch=request.fallback_policy) for w in workers
    }
    roots = settings.workspace_roots if roots is None else roots
    cwd = confiner(request.working_directory, roots) if request.working_directory else None
    for worker in workers:
        if cwd is None and worker.working_directory:
            confiner(worker.working_directory, roots)  # the roots may have narrowed since it registered
    fallback = None
    if default_cwd and cwd is None and not all(w.working_directory for w in workers):
        fallback = default_directory(settings)
    run = Run(
        id=new_run_id(),
        task=settings.redact(request.task),
        strategy=strategy.name,
        status="queued",
        runtime_mode=request.runtime_mode,
        workers=[w.name for _, w in cast],
        max_cost_usd=request.max_cost_usd if request.max_cost_usd is not None else settings.max_cost_usd,
    )
    return Plan(run, strategy, cast, modes, policies, cwd, fallback, task=request.task, max_rounds=request.max_rounds)


# default_directory's answers, by (the server's directory, the roots): the same on every dispatch.
_DEFAULT_DIRECTORIES: dict[tuple[str, tuple[Path, ...]], Path] = {}


def default_directory(settings: Settings) -> Path:
    """Where a step runs when neither the dispatch nor the worker names a directory: the server's
    own directory when it lies inside a workspace root, else the first root.

    Worked out once and remembered while it stays a directory (one ``stat`` per dispatch instead of
    resolving every root): this only picks the directory; each step opens and confines it again
    when it starts (``security.pin``), which is what keeps a step inside the roots."""
    roots = settings.workspace_roots
    key = (os.getcwd(), tuple(roots))
    known = _DEFAULT_DIRECTORIES.get(key)
    if known is not None and _still_directory(known):
        return known
    found = _default_directory(roots)
    _DEFAULT_DIRECTORIES[key] = found
    return found


def _still_directory(path: Path) -> bool:
    """Is ``path`` still a directory itself (not a link to one)?"""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _default_directory(roots: Sequence[Path]) -> Path:
    with contextlib.suppress(InvalidRequestError):
        return confine(os.getcwd(), roots)
    for root in roots:
        with contextlib.suppress(InvalidRequestError):
            return confine(str(root), roots)
    raise InvalidRequestError(
        "no workingDirectory was given and no workspace root exists; set MCP_COLLAB_WORKSPACE_ROOTS "
        f"(now: {', '.join(map(str, roots)) or 'empty'})"
    )
