"""A run as a Temporal workflow: the strategy's program, unchanged, over a ``RunContext`` whose
steps, spaces and diffs are activities.

The workflow is the run's one writer: it holds the run's state and saves it (a local activity) at
each change, so the store shows the run as it stands and the next server reads it. Everything that
touches a disk or a process runs in an activity on the queue of the workers that have the run's
directory. Workflow code must be deterministic: time is ``workflow.now()``, concurrency is
asyncio's, and nothing here reads a clock, a file or the network.

A step's activity is never retried: a CLI may have edited files before it died. A worker that dies
mid-step stops heartbeating; Temporal then fails the activity and the step ends ``interrupted``,
and the run with it. A stop (cancel) is a signal: the program's task is cancelled, which cancels
its running activities (their process trees are killed) and the run ends ``cancelled``.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, TimeoutError, TimeoutType
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from ...models import RunStatus, Step, Worker
    from ...strategies import Role, Space, Strategy, get_strategy
    from ..continuation import history_prompt
    from ..executor import (
        BudgetSpent,
        ProgramContext,
        StepFailed,
        add_up,
        begin_step,
        budget_left,
        close_accounts,
        step_label,
        stop_open_steps,
    )
    from .jobs import (
        DELIVER_WORKFLOW,
        SHORT_ACTIVITY_S,
        STOP_SIGNAL,
        WORKFLOW_NAME,
        Beat,
        ContinueJob,
        ContinueSpaceJob,
        DeliveredJob,
        DeliverJob,
        DiffJob,
        Finished,
        FinishJob,
        OpenedSpace,
        RunJob,
        SaveRun,
        SpaceJob,
        StepDone,
        StepJob,
    )

T = TypeVar("T")

# A step may take the step timeout plus this long before Temporal gives up on it (the worker's own
# timeout ends it first, with the step's output and a clear error).
STEP_GRACE_S = 120.0
ONCE = RetryPolicy(maximum_attempts=1)
# The failure type Temporal's SDK gives an activity its worker cancelled at shutdown.
WORKER_SHUTDOWN = "WorkerShutdown"
# Changes of the workflow's course, marked in the histories of the runs that took them (workflow.patched),
# so a run started by an earlier version replays on this one as it ran.
SHUTDOWN_INTERRUPTS = "worker-shutdown-interrupts-the-step"
BOUNDED_PICKUP = "a-queue-nobody-serves-ends-the-run"
# Runs started since take a leaner course: their saves are coalesced, nothing is saved at their
# start, and a step's activity opens the space it works in. Checked before BOUNDED_PICKUP, which it
# implies: each patch a run checks is a marker and a search-attribute update in its history.
LEAN_RUNS = "lean-runs"
SHORT_RETRIES = RetryPolicy(maximum_attempts=5, initial_interval=timedelta(seconds=1))


class RemoteSpace:
    """A space made by a worker: a worktree, or the run's directory in place. Since LEAN_RUNS
    it is opened by the first step that works in it (in that step's activity), or by an activity
    of its own when something else needs it first (its diff, another space's base)."""

    def __init__(self, context: WorkflowContext, label: str | None, opened: OpenedSpace | None = None) -> None:
        self._context = context
        self.label = label
        self.opened = opened
        self.opening: asyncio.Event | None = None  # a step is opening it; set once that step ended

    @property
    def directory(self) -> Path | None:
        opened = self.opened
        return Path(opened.directory) if opened is not None and opened.directory is not None else None

    async def diff(self) -> str | None:
        opened = await self._context.opened(self)
        if opened is None or (opened.worktree is None and opened.before is None):
            return None
        job = DiffJob(
            run_id=self._context.run.id,
            repository=opened.repository,
            worktree=opened.worktree,
            directory=opened.directory,
            before=opened.before,
        )
        return await self._context.short("space_diff", job, str)


class WorkflowContext(ProgramContext):
    """The engine as a strategy's program sees it when the run is a workflow."""

    def __init__(self, job: RunJob, strategy: Strategy) -> None:
        roles = {role.name: role for role in strategy.roles}
        cast = [(roles.get(c.role) or Role(c.role, None, c.access), c.worker) for c in job.cast]
        super().__init__(job.task, job.max_rounds, cast)
        self.job = job
        self.run = job.run
        self.strategy = strategy
        self.default_cwd: str | None = None
        self.roles_from = strategy.name  # the strategy whose roles the steps take (a follow-up: its parent's)
        self._space_lock = asyncio.Lock()
        self._save_lock = asyncio.Lock()
        # A lean run (started since LEAN_RUNS): its changes reach the store in the background, those
        # made together in one save (a step's end and the run's, say), and only its last save is
        # waited for (each save is a local activity: a worker's CPU and a write); the first step in
        # a space opens it.
        self.lean = False
        self._dirty = False
        self._closing = False  # the run's last save is asked for: it is durable
        self._saving: asyncio.Future[None] | None = None
        self._save_failed: ActivityError | None = None
        self._repo: dict[str, object] | None = None
        self._inspected = False
        self._spaces: list[RemoteSpace] = []
        self._saved_outputs: set[int] = set()

    # -- activities ----------------------------------------------------------------------------

    async def short(self, name: str, arg: object, result_type: type[T], *, pickup_s: float | None = None) -> T | None:
        """A short, idempotent activity on the run's queue (a worktree, a diff); ``pickup_s``: a
        worker must take it within that long (else a SCHEDULE_TO_START timeout). Without it, one
        no worker took within the run's pickup time is asked for again while the queue is served,
        and ends the run (WorkerLost) once it is not."""
        if pickup_s is not None or self.job.pickup_s is None:
            return await self._short(name, arg, result_type, pickup_s)
        while True:
            try:
                return await self._short(name, arg, result_type, self.job.pickup_s)
            except ActivityError as exc:
                cause = exc.cause
                if not (isinstance(cause, TimeoutError) and cause.type == TimeoutType.SCHEDULE_TO_START):
                    raise
                if not await self.queue_served():
                    raise WorkerLost(
                        f"no worker serves task queue {self.job.queue} any more (its machine stopped); the run "
                        "cannot go on"
                    ) from exc

    async def _short(self, name: str, arg: object, result_type: type[T], pickup_s: float | None) -> T | None:
        result: T | None = await workflow.execute_activity(
            name,
            arg,
            result_type=result_type,
            task_queue=self.job.queue,
            start_to_close_timeout=timedelta(seconds=SHORT_ACTIVITY_S),
            schedule_to_start_timeout=timedelta(seconds=pickup_s) if pickup_s is not None else None,
            retry_policy=SHORT_RETRIES,
        )
        return result

    async def queue_served(self) -> bool:
        """Whether a live worker serves the run's step queue (the workers' leases in the store)."""
        served: bool = await workflow.execute_local_activity(
            "queue_served",
            self.job.queue,
            result_type=bool,
            start_to_close_timeout=timedelta(seconds=SHORT_ACTIVITY_S),
            retry_policy=SHORT_RETRIES,
        )
        return served

    async def record(self) -> None:
        """The run changed: its state goes to the store (lean: in the background, with what else
        changes before that save starts)."""
        if not self.lean:
            await self.save()
            return
        self._dirty = True
        if self._saving is None or self._saving.done():
            self._saving = asyncio.ensure_future(self._flush())

    async def save(self) -> None:
        """The run's state into the store, waited for (lean: once every change is in)."""
        if not self.lean:
            await self._send()
            return
        self._closing = True
        await self.record()
        assert self._saving is not None
        await self._saving
        if self._save_failed is not None:
            raise self._save_failed

    async def _flush(self) -> None:
        while self._dirty:
            self._dirty = False
            try:
                await self._send(durable=self._closing)
                self._save_failed = None
            except ActivityError as exc:  # the next save sends it all again; the last one must land
                workflow.logger.warning("run %s was not saved: %s", self.run.id, exc)
                self._save_failed = exc

    async def _send(self, *, durable: bool = True) -> None:
        """One save; outputs the store already holds are not sent again."""
        async with self._save_lock:
            carried = sorted(self._saved_outputs)
            steps = [
                s.model_copy(update={"output": "", "diff": ""}) if s.index in self._saved_outputs else s
                for s in self.run.steps
            ]
            # Steps that end while this save is under way are not in it: their outputs go with the next.
            ended = {s.index for s in self.run.steps if s.status not in ("running", "pending")}
            sent = self.run.model_copy(update={"steps": steps})
            await workflow.execute_local_activity(
                "save_run",
                SaveRun(run=sent, carried=carried, durable=durable),
                start_to_close_timeout=timedelta(seconds=SHORT_ACTIVITY_S),
                retry_policy=SHORT_RETRIES,
            )
            self._saved_outputs.update(ended)

    # -- RunContext ------------------------------------------------------------------------------

    def directory_of(self, worker: Worker) -> str | None:
        if self.job.cwd is not None:
            return self.job.cwd
        return worker.working_directory or self.default_cwd

    def _space_job(self, label: str | None) -> SpaceJob:
        first = self.job.cast[0].worker if self.job.cast else None
        directory = self.job.cwd or (self.directory_of(first) if first is not None else None)
        return SpaceJob(
            run_id=self.run.id,
            directory=directory,
            label=label,
            repo=self._repo,
            inspected=self._inspected,
            worktrees=self.job.worktrees,
        )

    def _adopt(self, space: RemoteSpace, opened: OpenedSpace) -> None:
        """A space opened by a worker: the run records its worktree (in the order its spaces were
        asked for) and notes; its repository, as found, is every later space's base."""
        space.opened = opened
        self._repo, self._inspected = opened.repo, True
        if opened.worktree is not None:
            self.run.worktrees.append(opened.worktree)
            self.run.repository = opened.repository
            order = {s.opened.worktree.path: i for i, s in enumerate(self._spaces) if s.opened and s.opened.worktree}
            self.run.worktrees.sort(key=lambda w: order.get(w.path, len(order)))
        self.run.notes += [n for n in opened.notes if n not in self.run.notes]

    async def space(self, label: str | None = None) -> Space:
        async with self._space_lock:  # one inspection of the repository, so every writer shares its base
            space = RemoteSpace(self, label)
            if self.lean:
                if not self._inspected:  # an earlier space is inspected first: this one takes its base
                    for earlier in self._spaces:
                        await self._open_now(earlier)
                self._spaces.append(space)
                return space
            self._spaces.append(space)
            await self._open_now(space)
            return space

    async def opened(self, space: RemoteSpace) -> OpenedSpace | None:
        """The space, opened now if no step has opened it yet."""
        if space.opened is None:
            async with self._space_lock:
                await self._open_now(space)
        return space.opened

    async def _open_now(self, space: RemoteSpace) -> None:
        """Open ``space`` in an activity of its own, unless a step opens it (then after that step);
        the space lock is held."""
        if space.opening is not None:
            await space.opening.wait()
        if space.opened is None:
            opened = await self.short("open_space", self._space_job(space.label), OpenedSpace)
            assert opened is not None
            self._adopt(space, opened)

    async def in_repository(self) -> bool:
        async with self._space_lock:
            if not self._inspected:
                first = self.job.cast[0].worker if self.job.cast else None
                directory = self.job.cwd or (self.directory_of(first) if first is not None else None)
                job = SpaceJob(run_id=self.run.id, directory=directory)
                self._repo, self._inspected = await self.short("inspect_repository", job, dict), True
            return self._repo is not None

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
        resume = None
        if continues is not None and continues.session_id and continues.worker_name == worker.name:
            resume = (continues.session_id, prompt)
        return await self.run_step(
            worker, role, prompt, space=space, round=round, branch=branch, resume=resume, choices=choices
        )

    async def run_step(
        self,
        worker: Worker,
        role: Role,
        prompt: str,
        *,
        space: Space | None = None,
        round: int | None = None,
        branch: str | None = None,
        resume: tuple[str, str] | None = None,
        choices: Sequence[str] = (),
    ) -> Step:
        """A step as an activity; ``resume``: the vendor session to resume and the message it takes.
        A space nothing has opened yet is opened by the step's own activity (``step_in_space``)."""
        run = self.run
        spent = budget_left(run)
        if spent is not None:
            raise BudgetSpent(spent)
        claim: RemoteSpace | None = None
        opening = asyncio.Event()  # set once this step's activity ended, when it opens the space
        if self.lean and isinstance(space, RemoteSpace) and space.opened is None:
            if space.opening is None:
                claim, space.opening = space, opening
            else:
                await self.opened(space)  # another step is opening it: this one starts once it is open
        directory = space.directory if space is not None and space.directory is not None else None
        where = str(directory) if directory is not None else self.directory_of(worker)
        step = begin_step(
            run,
            worker,
            role,
            self.job.modes[worker.name],
            writer_access=self.job.writer_access,
            directory=Path(where) if where is not None else None,
            round=round,
            branch=branch,
        )
        step.started_at = workflow.now()
        run.steps.append(step)
        await self.record()
        job = StepJob(
            run_id=run.id,
            strategy=self.roles_from,
            role=role.name,
            step=step,
            worker=worker,
            prompt=prompt,
            policy=self.job.policies[worker.name],
            resume_session=resume[0] if resume is not None else None,
            resume_message=resume[1] if resume is not None else None,
            choices=list(choices),
            space=self._space_job(claim.label) if claim is not None else None,
            step_settings=self.job.step_settings,
        )
        try:
            done = await self._step_activity(job, worker, claim)
        finally:
            opening.set()
        run.steps[step.index] = done
        add_up(run)
        await self.record()
        return done

    async def _step_activity(self, job: StepJob, worker: Worker, claim: RemoteSpace | None) -> Step:
        """The step's activity to its end; a step that did not end by itself is recorded as it
        stopped (cancelled: raised on to the run's stop; its worker lost: WorkerLost)."""
        step = job.step
        timeout = (worker.timeout_seconds or self.job.step_timeout_s) + STEP_GRACE_S
        pickup = self.job.pickup_s

        def lost(how: str) -> WorkerLost:
            reason = (
                f"the worker running this step (task queue {self.job.queue}) {how}. "
                "A step is never run twice (it may have edited files)"
            )
            step.status, step.error = "interrupted", reason
            step.ended_at = workflow.now()
            return WorkerLost(f"{step_label(step)} ({step.role}, worker {worker.name}) was interrupted: {reason}")

        shut_down = "was shut down before the step ended (its process tree was killed)"
        try:
            while True:
                try:
                    done: Step | StepDone = await workflow.execute_activity(
                        "step_in_space" if self.lean else "run_step",
                        job,
                        result_type=StepDone if self.lean else Step,
                        task_queue=self.job.queue,
                        start_to_close_timeout=timedelta(seconds=timeout),
                        schedule_to_start_timeout=timedelta(seconds=pickup) if pickup is not None else None,
                        heartbeat_timeout=timedelta(seconds=self.job.heartbeat_timeout_s),
                        retry_policy=ONCE,  # a CLI may have edited files: never run a step twice
                        cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                    )
                    break
                except ActivityError as exc:
                    cause = exc.cause
                    if not (isinstance(cause, TimeoutError) and cause.type == TimeoutType.SCHEDULE_TO_START):
                        raise
                    if await self.queue_served():
                        continue  # every slot busy: it never started, so it is asked for again
                    step.status = "interrupted"
                    step.error = (
                        f"no worker serves task queue {self.job.queue} any more (its machine stopped); the step "
                        "never started"
                    )
                    step.ended_at = workflow.now()
                    raise WorkerLost(f"{step_label(step)} ({step.role}, worker {worker.name}): {step.error}") from exc
        except ActivityError as exc:
            cause = exc.cause
            died = isinstance(cause, TimeoutError) and cause.type == TimeoutType.HEARTBEAT
            if died and claim is not None and isinstance(cause, TimeoutError) and cause.last_heartbeat_details:
                beat = Beat.model_validate(cause.last_heartbeat_details[0])
                if beat.opened is not None:  # its worktree, as the step's first heartbeat told
                    self._adopt(claim, beat.opened)
            stopped = (
                isinstance(cause, ApplicationError)
                and cause.type == WORKER_SHUTDOWN
                # Runs that met this before it counted as an interruption replay as they ran.
                and workflow.patched(SHUTDOWN_INTERRUPTS)
            )
            if died or stopped:
                raise lost(
                    f"stopped: no heartbeat for {self.job.heartbeat_timeout_s:g}s" if died else shut_down
                ) from exc
            if isinstance(cause, TimeoutError):
                step.status = "failed"
                step.error = f"the step exceeded {timeout:g}s on its worker and was stopped ({cause.type})"
            elif isinstance(cause, ApplicationError):
                # The SDK's own failures ("Failed decoding arguments") carry their reason as a cause.
                inner = cause.cause
                why = f"{cause.message}: {inner.message}" if isinstance(inner, ApplicationError) else cause.message
                step.status, step.error = "failed", f"the worker could not run the step: {why}"
            else:
                raise  # cancelled: the run's stop handles it
            step.ended_at = workflow.now()
            return step
        if isinstance(done, Step):
            return done
        if claim is not None and done.opened is not None:
            self._adopt(claim, done.opened)
        if done.step.status == "interrupted":  # its worker was shutting down
            raise lost(shut_down)
        if done.step.status == "running":  # stopped by the run's cancel, with its space reported
            self.run.steps[step.index] = done.step
            raise asyncio.CancelledError()
        return done.step

    async def parallel(self, branches: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
        spent: list[BudgetSpent] = []

        async def one(branch: Callable[[], Awaitable[T]]) -> T | None:
            try:
                return await branch()
            except BudgetSpent as stop:
                spent.append(stop)  # the other branches finish their step, then stop
                return None

        tasks = [asyncio.ensure_future(one(b)) for b in branches]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        if spent:
            raise spent[0]
        return results  # type: ignore[return-value]  # every slot was filled


class WorkerLost(StepFailed):
    """A step's worker died: the run ends interrupted."""


@workflow.defn(name=WORKFLOW_NAME)
class RunWorkflow:
    def __init__(self) -> None:
        self._stop: tuple[RunStatus, str] | None = None

    @workflow.signal(name=STOP_SIGNAL)
    def stop(self, reason: str) -> None:
        if self._stop is None:
            self._stop = ("cancelled", reason)

    @workflow.run
    async def run(self, job: RunJob) -> str:
        strategy = get_strategy(job.run.strategy)
        context = WorkflowContext(job, strategy)
        run = context.run
        run.status = "running"
        run.started_at = workflow.now()
        follow_up = job.continuation
        needs_default = job.cwd is None and not all(c.worker.working_directory for c in job.cast)

        async def body() -> None:
            # Inside the program, so a queue nobody serves any more ends the run like a lost step.
            if needs_default:
                context.default_cwd = await context.short("default_directory", run.id, str)
            if not context.lean:  # lean: the store shows the run queued until its first step begins
                await context.save()
            await (strategy.run(context) if follow_up is None else _continue(context, follow_up))

        context.lean = workflow.patched(LEAN_RUNS)
        if context.lean or workflow.patched(BOUNDED_PICKUP):
            program = asyncio.ensure_future(body())
        else:  # a run started before: as it ran
            if needs_default:
                context.default_cwd = await context.short("default_directory", run.id, str)
            await context.save()
            program = asyncio.ensure_future(
                strategy.run(context) if follow_up is None else _continue(context, follow_up)
            )
        failure: str | None = None
        try:
            await workflow.wait_condition(lambda: program.done() or self._stop is not None, timeout=job.run_timeout_s)
        except builtins.TimeoutError:
            self._stop = (
                "failed",
                f"the run hit its wall-clock limit of {job.run_timeout_s:g}s (MCP_COLLAB_RUN_TIMEOUT); "
                "its processes were killed",
            )
        except asyncio.CancelledError:  # cancelled through Temporal itself (not our stop signal)
            self._stop = self._stop or ("cancelled", "the run's workflow was cancelled in Temporal")
        if not program.done():
            program.cancel()
        try:
            await asyncio.shield(asyncio.gather(program, return_exceptions=False))
        except WorkerLost as lost:
            self._stop = ("interrupted", lost.reason)
        except StepFailed as stop:
            failure = stop.reason
        except (asyncio.CancelledError, ActivityError):
            self._stop = self._stop or ("interrupted", "the run's workflow was cancelled")
        if self._stop is not None:
            status, reason = self._stop
            run.status, run.error = status, run.error or reason
            stop_open_steps(run, status, reason, workflow.now())
        else:
            context.settle(run, failure)
        await self._finish(context)
        return run.status

    async def _finish(self, context: WorkflowContext) -> None:
        run = context.run
        if run.worktrees:
            job = FinishJob(run_id=run.id, repository=run.repository, worktrees=run.worktrees)
            finished = await _finish_spaces(context, job)
            if finished is not None:
                run.worktrees = finished.worktrees
                run.notes += finished.notes
        run.ended_at = workflow.now()
        close_accounts(run)
        await context.save()


async def _finish_spaces(context: WorkflowContext, job: FinishJob) -> Finished | None:
    """The worktrees committed, by a worker of the run's queue that takes the job (after a worker
    died or was stopped: the one restarted, or another with the same roots); None, with a note, once
    no live worker serves the queue, so the run ends instead of waiting for a machine that is gone."""
    queue = context.job.queue
    while True:
        try:
            return await context.short("finish_spaces", job, Finished, pickup_s=context.job.finish_pickup_s)
        except ActivityError as exc:
            cause = exc.cause
            if not (isinstance(cause, TimeoutError) and cause.type == TimeoutType.SCHEDULE_TO_START):
                raise
        if not await context.queue_served():
            context.run.notes.append(
                f"its worktrees were not committed: no worker serves task queue {queue} any more; they stay "
                "on that machine as its steps left them"
            )
            return None


async def _continue(context: WorkflowContext, follow_up: ContinueJob) -> None:
    """A follow-up's program (``engine.continuation``'s, with its space and step as activities)."""
    [(role, worker)] = context._cast
    context.roles_from = follow_up.parent.strategy
    job = ContinueSpaceJob(
        run_id=context.run.id, parent=follow_up.parent, step=follow_up.step, worktree=follow_up.worktree
    )
    opened = await context.short("continue_space", job, OpenedSpace)
    space: RemoteSpace | None = None
    if opened is not None:
        space = RemoteSpace(context, None, opened)
        if opened.worktree is not None:
            context.run.worktrees.append(opened.worktree)
            context.run.repository = opened.repository
        context.run.notes += [n for n in opened.notes if n not in context.run.notes]
    diff = await space.diff() if space is not None else None
    prompt = history_prompt(follow_up.parent, follow_up.step, follow_up.message, diff)
    session = follow_up.step.session_id
    step = await context.run_step(
        worker, role, prompt, space=space, resume=(session, follow_up.message) if session else None
    )
    if session is None and step.status == "completed":
        step.continuation = "history"
    context.require(step)


@workflow.defn(name=DELIVER_WORKFLOW)
class DeliverWorkflow:
    """Apply or discard a run's work where its worktrees are (one activity on the run's queue)."""

    @workflow.run
    async def run(self, job: DeliverJob) -> DeliveredJob:
        result: DeliveredJob = await workflow.execute_activity(
            "deliver",
            job,
            result_type=DeliveredJob,
            task_queue=job.queue,
            start_to_close_timeout=timedelta(seconds=SHORT_ACTIVITY_S),
            retry_policy=ONCE,  # applying twice could meet its own first half: the operator retries
        )
        return result
