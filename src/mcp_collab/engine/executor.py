"""Steps: one worker, one prompt, one runtime (and its fallback), recorded as it happens.

``StepExecutor`` runs a step: it appends the step to the run, opens and confines its directory
again (what was checked at dispatch is what is used), chooses the runtime, falls back under the
policy, and records attempts, output, usage and the process it started. ``EngineContext`` is what a
strategy's program sees (``strategies.base.RunContext``): steps one at a time or in parallel,
spaces to write in, and how the run ends.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import anyio

from .. import workspace
from ..config import Settings
from ..errors import InvalidRequestError
from ..models import Access, FallbackPolicy, ProcessRef, Run, RuntimeMode, Step, Worker
from ..runtimes.base import PartialOutput, Resume, RuntimeResult, StepRequest, WorkerRuntime
from ..runtimes.cli.supervisor import process_start_ticks, spawned
from ..runtimes.selector import run_with_fallback
from ..security import pin
from ..strategies import Role, Space
from ..strategies.verdicts import Judgement
from .plan import ActiveRun
from .recorder import RunRecorder
from .spaces import InPlaceSpace, Spaces

T = TypeVar("T")


def answer_bytes(text: str) -> int:
    """Bytes of ``text`` in UTF-8, without encoding it when it is ASCII (the common case)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def cap_text(text: str, limit: int) -> tuple[str, bool]:
    if len(text) <= limit:
        return text, False
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters omitted ...]\n{text[-half:]}", True


def step_label(step: Step) -> str:
    """How progress and listings name a step: its number, and its round and branch when it has them."""
    tags = [f"round {step.round}" if step.round else "", f"branch {step.branch}" if step.branch else ""]
    extra = ", ".join(t for t in tags if t)
    return f"step {step.index + 1}" + (f" ({extra})" if extra else "")


class StepFailed(Exception):
    """Ends a run as failed: a step the strategy required did not complete, or the strategy said so."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BudgetSpent(StepFailed):
    """A step was about to start in a run whose cost had reached its budget: the run stops there."""


# A step's own diff kept with the step (the store puts a long one in a file of its own); apply
# uses the worktree's branch, never this text.
STEP_DIFF_BYTES = 4 << 20


def add_up(run: Run) -> None:
    """The run's token and dollar totals, from its steps."""
    usages = [s.usage for s in run.steps if s.usage is not None]
    run.usage = sum(usages[1:], usages[0]) if usages else None
    costs = [s.cost_usd for s in run.steps if s.cost_usd is not None]
    run.cost_usd = round(sum(costs), 9) if costs else None  # nano-dollars: float noise off, cents kept


def budget_left(run: Run) -> str | None:
    """Why no further step may start (the budget is spent), or None."""
    budget = run.max_cost_usd
    if budget is None or run.cost_usd is None or run.cost_usd < budget:
        return None
    return f"stopped: the run's cost ${run.cost_usd:.6g} reached its budget of ${budget:g} (maxCostUsd)"


class StepSite(Protocol):
    """Where a running step reports: this server's run (its listeners and the store), or a Temporal
    activity (its heartbeats)."""

    partials: dict[int, PartialOutput]  # what each running step has produced so far, by index

    def emit(self, message: str) -> None:
        """A progress message."""

    async def changed(self) -> None:
        """The step's state changed (started, spawned, failed before it started)."""


class _RunSite:
    """A step of a run this process executes: its progress goes to the run's listeners, its
    intermediate states to the store (written behind)."""

    def __init__(self, active: ActiveRun, recorder: RunRecorder) -> None:
        self.active = active
        self.recorder = recorder
        self.partials = active.partials

    def emit(self, message: str) -> None:
        self.active.emit(message)

    async def changed(self) -> None:
        await self.recorder.save(self.active.run, durable=False)


def begin_step(
    run: Run,
    worker: Worker,
    role: Role,
    mode: RuntimeMode,
    *,
    writer_access: Access,
    directory: Path | None,
    round: int | None,
    branch: str | None,
) -> Step:
    """The next step of ``run`` as it starts (the caller appends it and stamps its start)."""
    return Step(
        index=len(run.steps),
        role=role.name,
        round=round,
        branch=branch,
        worker_name=worker.name,
        worker_model=worker.model,
        runtime_mode=mode,
        status="running",
        directory=str(directory) if directory is not None else None,
        # Reviewers stay read-only; writing roles get what the operator allows (never more).
        access=role.access if role.access == "read_only" else writer_access,
    )


class StepExecutor:
    def __init__(self, settings: Settings, runtimes: Mapping[RuntimeMode, WorkerRuntime], recorder: RunRecorder):
        self.settings = settings
        self.runtimes = runtimes
        self.recorder = recorder
        # Steps run inside the workspace roots, or in a run's worktree (made by the server itself).
        self.roots = (*settings.workspace_roots, settings.worktrees_dir)

    def under(self, settings: Settings) -> StepExecutor:
        """The same runtimes and recorder under other settings (a run's own limits)."""
        return StepExecutor(settings, self.runtimes, self.recorder)

    async def run(
        self,
        active: ActiveRun,
        worker: Worker,
        role: Role,
        prompt: str,
        *,
        directory: Path | None,
        round: int | None = None,
        branch: str | None = None,
        resume: Resume | None = None,
        choices: Sequence[str] = (),
        diffable: bool = True,
    ) -> Step:
        """A step of a run this process executes: appended to the run, run, recorded. ``diffable=False``:
        its directory is known to be outside any git working tree, so no snapshot is taken for its
        own diff."""
        run, plan = active.run, active.plan
        spent = budget_left(run)
        if spent is not None:
            active.emit(spent)
            raise BudgetSpent(spent)
        step = begin_step(
            run,
            worker,
            role,
            plan.modes[worker.name],
            writer_access=self.settings.writer_access,
            directory=directory,
            round=round,
            branch=branch,
        )
        step.started_at = datetime.now(UTC)
        run.steps.append(step)
        site = _RunSite(active, self.recorder)
        await self.perform(
            site,
            step,
            worker,
            role,
            prompt,
            policy=plan.policies[worker.name],
            resume=resume,
            choices=choices,
            diffable=diffable,
        )
        add_up(run)
        return step

    async def perform(
        self,
        site: StepSite,
        step: Step,
        worker: Worker,
        role: Role,
        prompt: str,
        *,
        policy: FallbackPolicy,
        resume: Resume | None = None,
        choices: Sequence[str] = (),
        diffable: bool = True,
    ) -> None:
        """Run a begun step (``begin_step``) to its end, wherever it runs: this server's own run, or
        an activity of a run on Temporal. ``site`` hears of its progress and intermediate states."""
        # A judging step is asked for its verdict (findings, choice) as a schema-shaped answer too.
        judgement = Judgement(role.verdicts, role.findings, tuple(choices)) if role.judges or choices else None
        directory = Path(step.directory) if step.directory is not None else None
        access = step.access or "read_only"
        with contextlib.ExitStack() as held:
            child_cwd = None
            if directory is not None:
                # Confined at dispatch, but a queued run or a later step starts after that: the
                # directory is opened again now, and everything of this step runs in what was opened.
                try:
                    child_cwd = held.enter_context(pin(directory, self.roots)).cwd
                except InvalidRequestError as exc:
                    step.status = "failed"
                    step.error = str(exc)
                    step.ended_at = datetime.now(UTC)
                    await site.changed()
                    site.emit(f"{step_label(step)} failed before it started: {exc}")
                    return
            schema = judgement.schema() if judgement is not None else None
            # A writing step's own change: its directory before and after (a git working tree's only).
            writes = access != "read_only" and child_cwd is not None and diffable
            before = await workspace.snapshot(child_cwd, self.roots) if writes else None
            result = await self._execute(
                site, step, worker, prompt, policy, access, directory, child_cwd, resume, schema
            )
            if before is not None:
                after = await workspace.snapshot(child_cwd, self.roots)
                if after is not None and after != before:
                    text = await workspace.diff(child_cwd, self.roots, before, after, STEP_DIFF_BYTES)
                    step.diff = self.settings.redact(text or "")
        if judgement is not None and result is not None and step.status == "completed":
            self._judge(step, judgement, result)

    def _judge(self, step: Step, judgement: Judgement, result: RuntimeResult) -> None:
        """The step's verdict, findings and choice: from the runtime's structured answer when it gave
        one that fits the schema (the step's output becomes its text form), else from the text."""
        reading, why = None, result.structured_error
        if result.structured is not None:
            reading, why = judgement.read(result.structured)
        if reading is not None:
            step.output = self.settings.redact(judgement.render(reading))
            step.verdict_source = "structured"
        else:
            reading = judgement.read_text(step.output)
            step.verdict_source = "text"
            step.verdict_note = self.settings.redact.optional(f"{why}; read from the text instead" if why else None)
        if judgement.verdicts:
            step.verdict, step.findings = reading.verdict, reading.findings
        step.choice = reading.choice

    async def _execute(
        self,
        site: StepSite,
        step: Step,
        worker: Worker,
        prompt: str,
        policy: FallbackPolicy,
        access: str,
        cwd: Path | None,
        child_cwd: Path | None,
        resume: Resume | None = None,
        output_schema: dict[str, Any] | None = None,
    ) -> RuntimeResult | None:
        """Run the step through its runtime (and fallback) and record the outcome; the runtime's
        result when the step completed."""
        progress = site.emit
        mode = step.runtime_mode
        assert mode is not None
        t0 = time.monotonic()
        await site.changed()
        progress(f"{step_label(step)} started: {step.role} {worker.name} via {mode}")
        timeout = worker.timeout_seconds or self.settings.step_timeout_s
        partial = site.partials[step.index] = PartialOutput()
        request = StepRequest(
            worker=worker,
            prompt=prompt,
            instructions=worker.instructions,
            access=access,  # type: ignore[arg-type]
            timeout_s=timeout,
            idle_timeout_s=min(self.settings.idle_timeout_s, timeout),
            working_directory=cwd,
            child_cwd=child_cwd,
            on_progress=progress,
            on_spawn=functools.partial(self._record_process, site, step),
            partial=partial,
            resume=resume,
            output_schema=output_schema,
        )
        outcome = await run_with_fallback(self.runtimes, request, mode, policy)
        site.partials.pop(step.index, None)
        step.process = None
        redact = self.settings.redact
        step.attempts = [a.model_copy(update={"error": redact.optional(a.error)}) for a in outcome.attempts]
        step.runtime_mode = outcome.mode
        step.fallback_from = outcome.fallback_from
        step.ended_at = datetime.now(UTC)
        step.duration_ms = int((time.monotonic() - t0) * 1000)
        # The answer is kept whole (the store puts a long one in its own file; tools clip what they
        # return), up to MCP_COLLAB_MAX_ANSWER_BYTES; a bigger one fails the step rather than be cut.
        cap = self.settings.max_answer_bytes
        if outcome.result is not None and (size := answer_bytes(outcome.result.text)) > cap:
            result = outcome.result
            step.status = "failed"
            step.error = (
                f"fatal error from {outcome.mode}: the answer is {size} bytes, over the {cap}-byte cap on an answer "
                "(MCP_COLLAB_MAX_ANSWER_BYTES); its start and end are kept as the output. Raise "
                "MCP_COLLAB_MAX_ANSWER_BYTES to keep it whole"
            )
            step.exit_code = result.exit_code
            step.output, step.output_truncated = cap_text(redact(result.text), self.settings.capture_bytes)
        elif outcome.result is not None:
            result = outcome.result
            step.output = redact(result.text)
            step.output_truncated = result.truncated
            step.usage = result.usage
            step.model = result.model
            step.cli_version = result.cli_version
            step.cost_usd, step.cost_source = self.settings.prices.cost(result.model, result.usage, result.cost_usd)
            step.session_id = result.session_id
            step.exit_code = result.exit_code
            step.status = "completed"
            if resume is not None:
                step.continuation = "session" if result.resumed else "history"
        else:
            failure = outcome.failure
            assert failure is not None
            step.status = "failed"
            step.error = redact(f"{failure.kind} error from {outcome.mode}: {failure.message}")
            step.exit_code = failure.exit_code
            # What a failed step had produced is kept as whole as an answer would be.
            step.output, step.output_truncated = cap_text(redact(failure.output), cap)
        via = f"{step.runtime_mode}" + (f" (fell back from {step.fallback_from})" if step.fallback_from else "")
        progress(f"{step_label(step)} {step.status}: {step.role} {worker.name} via {via}")
        return outcome.result if step.status == "completed" else None

    async def _record_process(self, site: StepSite, step: Step, pid: int) -> None:
        tree = spawned(pid)
        if tree is None:  # not a supervised spawn (a runtime of a test's): the pid is all we know
            step.process = ProcessRef(pid=pid, pgid=pid, start_ticks=process_start_ticks(pid))
        else:
            step.process = ProcessRef(pid=pid, pgid=pid, start_ticks=tree.start_ticks, marker=tree.marker)
        await site.changed()


class ProgramContext:
    """What every engine's ``RunContext`` shares: the plan as a strategy reads it, and how the
    program ends the run (``settle`` applies it)."""

    def __init__(self, task: str, max_rounds: int | None, cast: Sequence[tuple[Role, Worker]]) -> None:
        self._task = task
        self._max_rounds = max_rounds
        self._cast = list(cast)
        self.result: str | None = None
        self.verdict_of: Step | None = None
        self.chosen: str | None = None

    @property
    def task(self) -> str:
        return self._task

    @property
    def max_rounds(self) -> int | None:
        return self._max_rounds

    def cast(self, role: Role) -> list[Worker]:
        return [w for r, w in self._cast if r.name == role.name]

    def require(self, step: Step) -> Step:
        if step.status != "completed":
            raise StepFailed(f"{step_label(step)} ({step.role}, worker {step.worker_name}) failed: {step.error}")
        return step

    def fail(self, reason: str) -> NoReturn:
        raise StepFailed(reason)

    def finish(self, *, result: str | None = None, verdict_of: Step | None = None, chosen: str | None = None) -> None:
        if result is not None:
            self.result = result
        if verdict_of is not None:
            self.verdict_of = verdict_of
        if chosen is not None:
            self.chosen = chosen

    def settle(self, run: Run, failure: str | None) -> None:
        """The run's outcome once its program returned (``failure``: why it ended failed)."""
        if failure is not None:
            run.status = "failed"
            run.error = failure
        else:
            run.status = "completed"
            done = [s for s in run.steps if s.status == "completed"]
            run.result = self.result if self.result is not None else (done[-1].output if done else None)
        judged = self.verdict_of or next((s for s in reversed(run.steps) if s.verdict is not None), None)
        if judged is not None and judged.verdict is not None:
            run.verdict, run.findings = judged.verdict, list(judged.findings)
        run.chosen = self.chosen


def close_accounts(run: Run) -> None:
    """A run's totals once it ended: duration, tokens, dollars, and which steps have no price."""
    add_up(run)
    start = run.started_at or run.created_at
    if run.ended_at is not None:
        run.duration_ms = max(0, int((run.ended_at - start).total_seconds() * 1000))
    uncosted = [s for s in run.steps if s.cost_source == "unknown" and s.usage is not None]
    if uncosted:
        named = sorted({s.model for s in uncosted if s.model})
        why = [f"no price is known for {', '.join(named)} (add one with MCP_COLLAB_PRICES)"] if named else []
        if any(s.model is None for s in uncosted):
            why.append("the vendor did not name the model used (set the worker's cliModel or sdkModel)")
        note = f"the cost leaves out {len(uncosted)} step(s): {'; '.join(why)}"
        if note not in run.notes:
            run.notes.append(note)


def stop_open_steps(run: Run, status: str, reason: str, now: datetime) -> None:
    """Steps still open when a run stopped abnormally: running ones end ``status`` (cancelled,
    failed, else interrupted), pending ones are skipped."""
    for step in run.steps:
        if step.status == "running":
            step.status = {"cancelled": "cancelled", "failed": "failed"}.get(status, "interrupted")  # type: ignore[assignment]
            step.error = step.error or reason
            step.process = None
            step.ended_at = now
        elif step.status == "pending":
            step.status = "skipped"


class EngineContext(ProgramContext):
    """The engine as a strategy's program sees it (``strategies.base.RunContext``)."""

    def __init__(self, active: ActiveRun, executor: StepExecutor, settings: Settings, spaces: Spaces) -> None:
        super().__init__(active.plan.task, active.plan.max_rounds, active.plan.cast)
        self.active = active
        self.executor = executor
        self.settings = settings
        self.spaces = spaces

    async def space(self, label: str | None = None) -> Space:
        return await self.spaces.make(label)

    async def in_repository(self) -> bool:
        return await self.spaces.repository() is not None

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
        directory = space.directory if space is not None and space.directory is not None else None
        diffable = not (isinstance(space, InPlaceSpace) and space.outside_repository and directory is not None)
        if directory is None:
            directory = self.active.plan.directory_of(worker)
        resume = None
        if continues is not None and continues.session_id and continues.worker_name == worker.name:
            resume = Resume(continues.session_id, prompt)
        return await self.executor.run(
            self.active,
            worker,
            role,
            prompt,
            directory=directory,
            round=round,
            branch=branch,
            resume=resume,
            choices=choices,
            diffable=diffable,
        )

    async def parallel(self, branches: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
        results: list[T | None] = [None] * len(branches)
        spent: list[BudgetSpent] = []

        async def one(i: int, branch: Callable[[], Awaitable[T]]) -> None:
            try:
                results[i] = await branch()
            except BudgetSpent as stop:
                # The other branches finish the step they are in (the budget stops a run at a step
                # boundary, never inside a step), and stop before their next one.
                spent.append(stop)

        async with anyio.create_task_group() as tg:
            for i, branch in enumerate(branches):
                tg.start_soon(one, i, branch)
        if spent:
            raise spent[0]
        return results  # type: ignore[return-value]  # every slot was filled
