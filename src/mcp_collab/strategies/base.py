"""What a strategy is: the roles it casts, and a program that asks the engine for steps.

A strategy declares its roles (which worker models fit each, how many workers take it, whether it
may write, the verdicts it may give) so that worker choice happens, deterministically and with
clear refusals, before the run starts. Its ``run`` is a plain async function over a
``RunContext``: it asks for steps one at a time or several in parallel, reads their results, and
decides what comes next; it can loop. Steps are appended to the run as they happen.

The engine implements ``RunContext``; strategies cannot tell runtimes, stores or transports apart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol, TypeVar

from ..errors import InvalidRequestError, NoFittingWorkerError, UnknownWorkerError, listing, shown
from ..models import Access, Step, Verdict, Worker, WorkerModel

T = TypeVar("T")


@dataclass(frozen=True)
class Role:
    name: str
    models: tuple[WorkerModel, ...] | None  # None: any worker
    access: Access
    # The verdicts a judging role may give, passing one first; empty: the role does not judge.
    verdicts: tuple[Verdict, ...] = ()
    findings: bool = False  # a judging role that lists what it found (a red-teamer's vulnerabilities)
    distinct_from_previous: bool = False  # prefer a worker other than the previous role's
    count: tuple[int, int] = (1, 1)  # how many workers take the role: at least, at most

    @property
    def judges(self) -> bool:
        """Its output carries a verdict."""
        return bool(self.verdicts)

    @property
    def fits(self) -> str:
        return "any model" if self.models is None else " or ".join(self.models)


class Space(Protocol):
    """Where writers work and reviewers read: the directory, and what was changed in it."""

    @property
    def directory(self) -> Path | None: ...

    async def diff(self) -> str | None:
        """What the writers changed here since the space was made (None: not a git working tree)."""


class RunContext(Protocol):
    """What a strategy's program may ask of the engine."""

    @property
    def task(self) -> str:
        """The task as the caller wrote it."""

    @property
    def max_rounds(self) -> int | None:
        """The dispatch's maxRounds, for strategies that loop."""

    def cast(self, role: Role) -> list[Worker]:
        """The workers chosen for ``role`` at dispatch, in order."""

    async def space(self, label: str | None = None) -> Space:
        """A place to write in: a worktree of its own in a git repository (label it when several
        writers work at once), else the run's working directory."""

    async def in_repository(self) -> bool:
        """Whether the run's directory is inside a git repository (so writers get worktrees)."""

    async def step(
        self,
        worker: Worker,
        role: Role,
        prompt: str,
        *,
        space: Space | None = None,
        round: int | None = None,
        branch: str | None = None,
        continues: Step | None = None,
        choices: Sequence[str] = (),
    ) -> Step:
        """Run one step to its end and return it (completed or failed; a judge's verdict read, as a
        schema-shaped answer where the runtime can give one, else from its text).
        ``continues``: an earlier step of the same worker whose vendor session this one resumes
        where the runtime can (the prompt must stand on its own for one that cannot).
        ``choices``: the labels the step picks one of (best_of_n's judge); its pick is ``Step.choice``."""

    async def parallel(self, branches: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
        """Run the branches at once; their results in order. Cancelling the run stops all of them."""

    def require(self, step: Step) -> Step:
        """The step if it completed; otherwise the run ends failed, naming the step and its error."""

    def fail(self, reason: str) -> NoReturn:
        """End the run failed with ``reason``."""

    def finish(self, *, result: str | None = None, verdict_of: Step | None = None, chosen: str | None = None) -> None:
        """The run's result text, the step whose verdict is the run's (defaults: the last completed
        step's output, the last judging step's verdict), and the winning worktree's label."""


Program = Callable[[RunContext], Awaitable[None]]


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str
    roles: tuple[Role, ...]
    run: Program
    loops: bool = False  # takes maxRounds
    needs_repository: bool = False  # its writers need worktrees: refused outside a git repository
    internal: bool = False  # started by the engine (a follow-up), never by a dispatch

    def role(self, name: str) -> Role:
        return next(r for r in self.roles if r.name == name)


STRATEGIES: dict[str, Strategy] = {}


def strategy(
    name: str, *, summary: str, roles: tuple[Role, ...], loops: bool = False, needs_repository: bool = False
) -> Callable[[Program], Program]:
    """Register ``run`` as the program of strategy ``name``."""

    def register(run: Program) -> Program:
        STRATEGIES[name] = Strategy(
            name=name, summary=summary, roles=roles, run=run, loops=loops, needs_repository=needs_repository
        )
        return run

    return register


def dispatchable() -> list[str]:
    """The strategies a dispatch may name (the engine's own, like a follow-up, are left out)."""
    return [name for name, found in STRATEGIES.items() if not found.internal]


def get_strategy(name: str, *, dispatchable: bool = False) -> Strategy:
    """A strategy by name; ``dispatchable`` refuses the engine's own (a follow-up is not dispatched)."""
    found = STRATEGIES.get(name)
    if found is None or (dispatchable and found.internal):
        accepted = ", ".join(n for n, s in STRATEGIES.items() if not (dispatchable and s.internal))
        raise InvalidRequestError(f"unknown strategy {shown(name)}; accepted: {accepted}")
    return found


def cast_workers(
    strategy: Strategy, registered: Sequence[Worker], named: Sequence[str] | None
) -> list[tuple[Role, Worker]]:
    """Workers for every role, deterministically: the named ones in role order first, else the
    first registered workers whose model fits. A clear refusal when none fits."""
    by_name = {w.name: w for w in registered}
    names = list(named or [])
    most = sum(r.count[1] for r in strategy.roles)
    if len(names) > most:
        shape = ", ".join(_role_shape(r) for r in strategy.roles)
        raise InvalidRequestError(
            f"strategy {strategy.name!r} takes at most {most} worker(s) ({shape}) but {len(names)} were named"
        )
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"workers names a worker twice: {', '.join(names)}; name each once")
    cast: list[tuple[Role, Worker]] = []
    for i, role in enumerate(strategy.roles):
        # Named workers fill roles in order; a role that takes several keeps enough for the roles after it.
        later_min = sum(r.count[0] for r in strategy.roles[i + 1 :])
        take = min(role.count[1], max(0, len(names) - later_min)) if names else 0
        if names and take < min(role.count[0], len(names)):
            take = min(role.count[0], len(names))
        chosen: list[Worker] = []
        for name in names[:take]:
            worker = by_name.get(name)
            if worker is None:
                known = listing(sorted(by_name), empty="none registered")
                raise UnknownWorkerError(f"unknown worker {shown(name)}; registered workers: {known}")
            if role.models is not None and worker.model not in role.models:
                raise InvalidRequestError(
                    f"worker {worker.name!r} is a {worker.model} worker, but the {role.name} role of "
                    f"{strategy.name!r} needs {role.fits}"
                )
            chosen.append(worker)
        names = names[take:]
        if len(chosen) < role.count[0]:
            candidates = [w for w in registered if role.models is None or w.model in role.models]
            if role.count == (1, 1):
                if role.distinct_from_previous and cast:
                    candidates = [w for w in candidates if w.name != cast[-1][1].name] or candidates
                chosen += candidates[:1]
            else:
                # Several workers: different vendors are the point, so one of each model first.
                pool = [w for w in candidates if w not in chosen]
                firsts = [w for i, w in enumerate(pool) if all(v.model != w.model for v in pool[:i])]
                ordered = firsts + [w for w in pool if w not in firsts]
                chosen += ordered[: role.count[1] - len(chosen)]
            if len(chosen) < role.count[0]:
                fit = f"; {len(candidates)} fit" if role.count[0] > 1 else ""
                raise NoFittingWorkerError(
                    f"no registered worker can take the {role.name} role of {strategy.name!r} "
                    f"(needs {_role_shape(role)}{fit})"
                )
        cast += [(role, w) for w in chosen]
    return cast


def assign_workers(strategy: Strategy, registered: Sequence[Worker], named: Sequence[str] | None) -> list[Worker]:
    """The cast's workers in role order."""
    return [w for _, w in cast_workers(strategy, registered, named)]


def _role_shape(role: Role) -> str:
    low, high = role.count
    many = "" if (low, high) == (1, 1) else (f"{low} " if low == high else f"{low} to {high} ")
    return f"{many}{role.name}: {role.fits}"
