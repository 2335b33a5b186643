"""The WorkerOrchestrator: worker registry, dispatch through a strategy, and the run lifecycle.

Plain Python: no MCP in here. The MCP server, the ``mcp-collab`` command and tests all drive
this one class. Every state change of a run is persisted before the next begins, so the history
always shows what actually happened, including which runtime ran each step.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread

from . import workspace
from .config import Settings
from .errors import InvalidRequestError, StoreError, UnknownRunError, UnknownWorkerError, listing, shown
from .models import (
    TERMINAL_RUN_STATUSES,
    Access,
    DispatchRequest,
    FallbackPolicy,
    ProcessRef,
    Run,
    RunOwner,
    RunPage,
    RunStatus,
    RuntimeMode,
    Step,
    Worker,
    WorkerSpec,
)
from .runtimes.base import PartialOutput, StepRequest, WorkerRuntime
from .runtimes.cli.supervisor import ProcessTree, kill_tree, owner_tag, process_start_ticks, spawned
from .runtimes.selector import choose_mode, choose_policy, run_with_fallback
from .security import PinnedDirectory, Redactor, confine, pin
from .store import JsonStore, RunFilter, RunStore
from .strategies import (
    MAX_QUOTED_DIFF_CHARS,
    PromptContext,
    Strategy,
    assign_workers,
    get_strategy,
    parse_verdict,
)

ProgressCallback = Callable[[str], None]

log = logging.getLogger("mcp_collab.orchestrator")

MAX_PAGE_SIZE = 200
# Worker fields that name or locate something; a credential in one is refused, never redacted.
IDENTITY_FIELDS = (
    ("name", "name"),
    ("sdk_model", "sdkModel"),
    ("cli_model", "cliModel"),
    ("working_directory", "workingDirectory"),
)
# A waiting client hears from us at least this often (clients give up on silent calls; 25 s is the
# most a user should wait without a sign of life).
HEARTBEAT_S = 15.0
# A cancel kills process trees within half a second; this bounds the wait for the run to settle.
CANCEL_WAIT_S = 30.0
# Retention is applied at start and after this many finished runs.
PRUNE_EVERY = 100
# How often a wait on a run executed by another server process re-reads the store.
FOREIGN_POLL_S = 0.5


def this_process() -> RunOwner:
    return RunOwner(host=socket.gethostname(), pid=os.getpid(), start_ticks=process_start_ticks(os.getpid()))


def owner_alive(owner: RunOwner | None) -> bool:
    """Is the server process that owns a run still running (on this host, and the same process)?"""
    if owner is None:
        return False
    if owner.host != socket.gethostname():
        return True  # not ours to judge: a store shared across hosts is the other host's business
    ticks = process_start_ticks(owner.pid)
    return ticks is not None and (owner.start_ticks is None or ticks == owner.start_ticks)


def _where(run: Run) -> str:
    current = next((s for s in run.steps if s.status == "running"), None)
    if current is not None:
        return (
            f"step {current.index + 1}/{len(run.steps)} {current.role} {current.worker_name} via {current.runtime_mode}"
        )
    return "waiting for a free slot" if run.status == "queued" else run.status


@dataclass
class _Plan:
    run: Run
    strategy: Strategy
    workers: list[Worker]
    modes: list[RuntimeMode]
    policies: list[FallbackPolicy]
    cwd: Path | None
    task: str  # as the caller wrote it, for the workers; the run record keeps it redacted


@dataclass(eq=False)
class _Active:
    """A run this process is executing: its plan, how to stop it, and who is listening."""

    plan: _Plan
    done: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    stop_reason: tuple[RunStatus, str] | None = None
    listeners: list[ProgressCallback] = field(default_factory=list)
    partial: PartialOutput = field(default_factory=PartialOutput)
    redact: Redactor = field(default_factory=Redactor)

    @property
    def run(self) -> Run:
        return self.plan.run

    def emit(self, message: str) -> None:
        message = self.redact(message)
        for listener in list(self.listeners):
            listener(message)


def _noop(_: str) -> None:
    return None


def new_run_id() -> str:
    # Sortable by creation time at a glance, unique across processes.
    return f"run-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(4)}"


def default_runtimes(settings: Settings) -> dict[RuntimeMode, WorkerRuntime]:
    from .runtimes.cli import CLIRuntime
    from .runtimes.google_sdk import GoogleSDKRuntime
    from .runtimes.openai_sdk import OpenAISDKRuntime

    return {
        "cli": CLIRuntime(settings),
        "openai_sdk": OpenAISDKRuntime(settings),
        "google_sdk": GoogleSDKRuntime(settings),
    }


def answer_bytes(text: str) -> int:
    """Bytes of ``text`` in UTF-8, without encoding it when it is ASCII (the common case)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def cap_text(text: str, limit: int) -> tuple[str, bool]:
    if len(text) <= limit:
        return text, False
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters omitted ...]\n{text[-half:]}", True


class WorkerOrchestrator:
    def __init__(
        self,
        settings: Settings,
        store: RunStore | None = None,
        runtimes: Mapping[RuntimeMode, WorkerRuntime] | None = None,
    ) -> None:
        self.settings = settings
        self.store: RunStore = store if store is not None else JsonStore(settings.store_dir)
        self.runtimes: dict[RuntimeMode, WorkerRuntime] = (
            dict(runtimes) if runtimes is not None else default_runtimes(settings)
        )
        self._tg: anyio.abc.TaskGroup | None = None
        self._active: dict[str, _Active] = {}
        self._limiter = anyio.CapacityLimiter(settings.max_concurrent_runs)
        self._owner = this_process()
        # Store writes go one at a time, so a write-behind batch never lands after a newer state.
        self._write_lock = anyio.Lock()
        self._pending: dict[str, Run] = {}
        self._pending_ready = anyio.Event()
        self._finished = 0
        # Dispatches between the queue check and their run's entry in _active: counted with the
        # queued runs, so the cap holds however many dispatches arrive at once.
        self._admitting = 0
        self._last_store_error: str | None = None

    async def __aenter__(self) -> WorkerOrchestrator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the runtimes' HTTP clients."""
        for runtime in self.runtimes.values():
            close = getattr(runtime, "aclose", None)
            if close is not None:
                await close()

    # -- workers -----------------------------------------------------------------------------

    async def register_worker(self, spec: WorkerSpec) -> Worker:
        worker = Worker(**spec.model_dump())
        # A name, model or directory is used to find or run something: a redacted one would not be
        # what the caller meant (and two would collide), so one holding a credential is refused.
        for attr, wire in IDENTITY_FIELDS:
            value = getattr(worker, attr)
            if value is not None and self.settings.redact.finds(value):
                raise InvalidRequestError(
                    f"{wire} holds a credential (a value of the server's key variables, or a key's shape); "
                    f"it is not repeated here. Credentials belong in the environment: choose another {wire}"
                )
        if worker.working_directory is not None:
            worker.working_directory = str(confine(worker.working_directory, self.settings.workspace_roots))
        self.settings.redact.scrub(worker)  # free text (instructions, and any field added later)
        await anyio.to_thread.run_sync(self.store.add_worker, worker)
        return worker

    async def list_workers(self) -> list[Worker]:
        return await anyio.to_thread.run_sync(self.store.list_workers)

    async def remove_worker(self, name: str) -> Worker:
        removed = await anyio.to_thread.run_sync(self.store.remove_worker, name)
        if removed is None:
            raise await self._unknown_worker(name)
        return removed

    async def _unknown_worker(self, name: str) -> UnknownWorkerError:
        known = listing(sorted(w.name for w in await self.list_workers()), empty="none registered")
        return UnknownWorkerError(f"unknown worker {shown(name)}; registered workers: {known}")

    # -- runs --------------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> Run:
        run = await anyio.to_thread.run_sync(self.store.get_run, run_id)
        if run is None:
            raise UnknownRunError(f"unknown run {shown(run_id)}")  # each surface says where runs are listed
        return run

    async def list_runs(
        self,
        *,
        status: RunStatus | None = None,
        strategy: str | None = None,
        worker: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> RunPage:
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise InvalidRequestError(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}")
        if strategy is not None:
            get_strategy(strategy)  # an unknown name is refused with the accepted ones, not answered with nothing
        run_filter = RunFilter(status=status, strategy=strategy, worker=worker)
        return await anyio.to_thread.run_sync(self.store.list_runs, run_filter, limit, cursor)

    # -- the run lifecycle ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[WorkerOrchestrator]:
        """Own a task group for background runs; recover runs a dead server left behind.

        Runs started with ``start`` live here, not in the request that started them: a client that
        times out, cancels or disconnects never kills a run. Leaving the block (the server stops)
        interrupts whatever is still running and kills its processes."""
        await anyio.to_thread.run_sync(self.store.check_writable)
        await self.recover()
        await self.prune()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._write_behind)
            try:
                yield self
            finally:
                self._tg = None
                tg.cancel_scope.cancel()

    async def dispatch(self, request: DispatchRequest, *, on_progress: ProgressCallback | None = None) -> Run:
        """Plan the run (refusing anything wrong before it starts) and run it to its end."""
        active = await self._admit(request)
        if on_progress is not None:
            active.listeners.append(on_progress)
        if self._tg is not None:
            self._tg.start_soon(self._background, active)
            await active.done.wait()
        else:
            await self._background(active)
        return active.run.model_copy(deep=True)

    async def start(self, request: DispatchRequest) -> Run:
        """Plan the run and start it in the background (inside ``running``); returns it queued."""
        if self._tg is None:
            raise RuntimeError("start() needs the orchestrator's task group: use `async with orchestrator.running()`")
        active = await self._admit(request)
        self._tg.start_soon(self._background, active)
        return active.run.model_copy(deep=True)

    async def wait(self, run_id: str, timeout_s: float | None, *, on_progress: ProgressCallback | None = None) -> Run:
        """The run when it ends, or as it stands after ``timeout_s``; progress and heartbeats meanwhile."""
        active = self._active.get(run_id)
        if active is None:
            return await self._wait_elsewhere(run_id, timeout_s)
        if on_progress is not None:
            active.listeners.append(on_progress)
        try:
            with anyio.move_on_after(timeout_s if timeout_s is not None else math.inf):
                async with anyio.create_task_group() as tg:
                    if on_progress is not None:
                        tg.start_soon(self._heartbeat, active, on_progress)
                    await active.done.wait()
                    tg.cancel_scope.cancel()
        finally:
            if on_progress is not None:
                active.listeners.remove(on_progress)
        if active.done.is_set():
            return active.run.model_copy(deep=True)
        # Still going: report what is on disk, never a state (say, "completed") whose save has not
        # landed yet; a crash now would make the store, not our memory, the truth.
        return await self.get_run(run_id)

    async def cancel(self, run_id: str, *, reason: str = "cancelled on request") -> tuple[Run, bool]:
        """Stop a run: kill its processes, mark it and its open step cancelled, keep partial output.

        Returns the run and whether this call cancelled it (False: it had already ended)."""
        active = self._active.get(run_id)
        if active is None:
            run = await self._orphan_checked(await self.get_run(run_id))
            if run.status in TERMINAL_RUN_STATUSES:
                return run, False
            owner = f" (pid {run.owner.pid} on {run.owner.host})" if run.owner else ""
            raise InvalidRequestError(
                f"run {run_id} is {run.status} in another mcp-collab server process{owner}; cancel it there"
            )
        if active.stop_reason is None:
            active.stop_reason = ("cancelled", reason)
        active.scope.cancel()
        with anyio.fail_after(CANCEL_WAIT_S):
            await active.done.wait()
        return active.run.model_copy(deep=True), True

    async def _wait_elsewhere(self, run_id: str, timeout_s: float | None) -> Run:
        """A run this process is not executing: another server on the same store may be."""
        run = await self._orphan_checked(await self.get_run(run_id))
        with anyio.move_on_after(timeout_s if timeout_s is not None else math.inf):
            while run.status not in TERMINAL_RUN_STATUSES:
                await anyio.sleep(FOREIGN_POLL_S)
                run = await self._orphan_checked(await self.get_run(run_id))
        return run

    async def _orphan_checked(self, run: Run) -> Run:
        """A run still open in the store whose server died after we started is recovered now,
        instead of waiting for the next restart."""
        if run.status in TERMINAL_RUN_STATUSES or run.id in self._active or owner_alive(run.owner):
            return run
        await self.recover()
        return await self.get_run(run.id)

    async def _heartbeat(self, active: _Active, on_progress: ProgressCallback) -> None:
        started = time.monotonic()
        while True:
            await anyio.sleep(HEARTBEAT_S)
            run = active.run
            on_progress(f"run {run.id} still {run.status}: {_where(run)}, {time.monotonic() - started:.0f}s waited")

    async def _admit(self, request: DispatchRequest) -> _Active:
        # Checked and claimed with no await in between: the event loop runs nothing else here, so
        # no number of concurrent dispatches can slip past the cap together.
        waiting = self._admitting + sum(1 for a in self._active.values() if a.run.status == "queued")
        if waiting >= self.settings.max_queued_runs:
            raise InvalidRequestError(
                f"{waiting} runs are already waiting for a slot (the limit is {self.settings.max_queued_runs}, "
                f"MCP_COLLAB_MAX_QUEUED_RUNS; {self.settings.max_concurrent_runs} run at once, "
                "MCP_COLLAB_MAX_CONCURRENT_RUNS); wait for some to finish or cancel them"
            )
        self._admitting += 1
        try:
            plan = await self._plan(request, request.runtime_modes or {})
            plan.run.owner = self._owner
            await self._save(plan.run)
            active = _Active(plan=plan, redact=self.settings.redact)
            self._active[plan.run.id] = active
        finally:
            self._admitting -= 1
        return active

    async def _background(self, active: _Active) -> None:
        run = active.run
        try:
            with active.scope:
                async with self._limiter:  # beyond the limit, runs wait here as `queued`
                    deadline = anyio.current_time() + self.settings.run_timeout_s
                    active.scope.deadline = deadline
                    try:
                        await self._execute(active)
                    except anyio.get_cancelled_exc_class():
                        if active.stop_reason is None:
                            if anyio.current_time() >= deadline:
                                active.stop_reason = (
                                    "failed",
                                    f"the run hit its wall-clock limit of {self.settings.run_timeout_s:g}s "
                                    "(MCP_COLLAB_RUN_TIMEOUT); its processes were killed",
                                )
                            else:
                                active.stop_reason = ("interrupted", "the server stopped while the run was in progress")
                        raise
            if active.stop_reason is not None and run.status not in TERMINAL_RUN_STATUSES:
                await self._abandon(active, *active.stop_reason)  # cancelled while still queued
        except StoreError as exc:
            # The disk is full, read-only or gone: this run fails with the cause; the server and
            # every other run go on.
            log.error("run %s: %s", run.id, exc)
            await self._abandon(active, "failed", str(exc), overwrite=True)
        except anyio.get_cancelled_exc_class():
            await self._abandon(active, *(active.stop_reason or ("interrupted", "the server stopped")))
            raise
        except Exception as exc:
            # A bug must cost one run, never the server: record it, log the details, carry on.
            log.exception("run %s failed inside mcp-collab", run.id)
            await self._abandon(
                active, "failed", f"internal error ({type(exc).__name__}); the server log has the details"
            )
        finally:
            active.done.set()
            self._active.pop(run.id, None)
        self._finished += 1
        if self._finished % PRUNE_EVERY == 0:
            try:
                await self.prune()
            except StoreError as exc:
                log.error("retention was not applied: %s", exc)

    async def _plan(self, request: DispatchRequest, runtime_modes: Mapping[str, RuntimeMode]) -> _Plan:
        if len(request.task) > self.settings.max_task_chars:
            raise InvalidRequestError(
                f"task is {len(request.task)} characters; the limit is {self.settings.max_task_chars} "
                "(MCP_COLLAB_MAX_TASK_CHARS). Put long material in a file in the working directory and refer to it."
            )
        strategy = get_strategy(request.strategy)
        registered = await self.list_workers()
        workers = assign_workers(strategy, registered, request.workers)
        unknown = sorted(set(runtime_modes) - {w.name for w in workers})
        if unknown:
            raise InvalidRequestError(
                f"runtimeModes names {listing(map(shown, unknown))}, which take no step in this run; "
                f"its workers are: {', '.join(w.name for w in workers)}"
            )
        modes = [
            choose_mode(
                w,
                default=self.settings.default_runtime,
                dispatch_mode=request.runtime_mode,
                per_worker=runtime_modes,
            )
            for w in workers
        ]
        policies = [
            choose_policy(w, default=self.settings.fallback_policy, dispatch=request.fallback_policy) for w in workers
        ]
        roots = self.settings.workspace_roots
        cwd = confine(request.working_directory, roots) if request.working_directory else None
        for worker in workers:
            if cwd is None and worker.working_directory:
                confine(worker.working_directory, roots)  # the roots may have narrowed since it registered
        if cwd is None and not all(w.working_directory for w in workers):
            cwd = self._default_directory()
        run = Run(
            id=new_run_id(),
            task=self.settings.redact(request.task),
            strategy=strategy.name,
            status="queued",
            runtime_mode=request.runtime_mode,
            workers=[w.name for w in workers],
            steps=[
                Step(index=i, role=role.name, worker_name=w.name, worker_model=w.model, runtime_mode=mode)
                for i, (role, w, mode) in enumerate(zip(strategy.roles, workers, modes, strict=True))
            ],
        )
        return _Plan(run, strategy, workers, modes, policies, cwd, task=request.task)

    def _default_directory(self) -> Path:
        """Where a step runs when neither the dispatch nor the worker names a directory: the server's
        own directory when it lies inside a workspace root, else the first root."""
        roots = self.settings.workspace_roots
        with contextlib.suppress(InvalidRequestError):
            return confine(os.getcwd(), roots)
        for root in roots:
            with contextlib.suppress(InvalidRequestError):
                return confine(str(root), roots)
        raise InvalidRequestError(
            "no workingDirectory was given and no workspace root exists; set MCP_COLLAB_WORKSPACE_ROOTS "
            f"(now: {', '.join(map(str, roots)) or 'empty'})"
        )

    async def _execute(self, active: _Active) -> None:
        plan, run = active.plan, active.run
        run.status = "running"
        run.started_at = datetime.now(UTC)  # saved with the first step's start
        diff_text: str | None = None
        for i, (role, worker) in enumerate(zip(plan.strategy.roles, plan.workers, strict=True)):
            step = run.steps[i]
            step_dir = plan.cwd or (Path(worker.working_directory) if worker.working_directory else None)
            with contextlib.ExitStack() as held:
                # Confined at dispatch, but a queued run or a later step starts after that: the
                # directory is opened again now, and everything of this step runs in what was opened.
                pinned = self._pin(step, step_dir)
                step_cwd = held.enter_context(pinned).cwd if pinned is not None else None
                before = None
                if step.status == "pending":
                    before = (
                        await workspace.snapshot(step_cwd, self.settings.workspace_roots)
                        if plan.strategy.wants_diff and i == 0
                        else None
                    )
                    prompt = role.prompt(PromptContext(task=plan.task, previous=run.steps[:i], diff=diff_text))
                    # Reviewers stay read-only; writing roles get what the operator allows (never more).
                    access = role.access if role.access == "read_only" else self.settings.writer_access
                    await self._run_step(
                        active, step, worker, plan.modes[i], plan.policies[i], prompt, access, step_dir, step_cwd
                    )
                if step.status != "completed":
                    for later in run.steps[i + 1 :]:
                        later.status = "skipped"
                    run.status = "failed"
                    run.error = f"step {i + 1} ({step.role}, worker {step.worker_name}) failed: {step.error}"
                    break
                if role.judges:
                    step.verdict, step.findings = parse_verdict(step.output, role.verdicts)
                    run.verdict, run.findings = step.verdict, list(step.findings)
                if before is not None:
                    after = await workspace.snapshot(step_cwd, self.settings.workspace_roots)
                    if after is not None and after != before:
                        diff_text = await workspace.diff(
                            step_cwd, self.settings.workspace_roots, before, after, MAX_QUOTED_DIFF_CHARS
                        )
        else:
            run.status = "completed"
            run.result = run.steps[-1].output
        run.ended_at = datetime.now(UTC)
        await self._save(run)
        active.emit(f"run {run.id} {run.status}")

    def _pin(self, step: Step, directory: Path | None) -> PinnedDirectory | None:
        """The step's directory, opened and confined again; a step whose directory changed fails
        here, before anything runs."""
        if directory is None:
            return None
        try:
            return pin(directory, self.settings.workspace_roots)
        except InvalidRequestError as exc:
            step.status = "failed"
            step.error = str(exc)
            step.started_at = step.ended_at = datetime.now(UTC)
            return None

    async def _run_step(
        self,
        active: _Active,
        step: Step,
        worker: Worker,
        mode: RuntimeMode,
        policy: FallbackPolicy,
        prompt: str,
        access: Access,
        cwd: Path | None,
        child_cwd: Path | None,
    ) -> None:
        run, progress = active.run, active.emit
        step.status = "running"
        step.started_at = datetime.now(UTC)
        t0 = time.monotonic()
        await self._save(run, durable=False)
        progress(f"step {step.index + 1}/{len(run.steps)} started: {step.role} {worker.name} via {mode}")
        timeout = worker.timeout_seconds or self.settings.step_timeout_s
        request = StepRequest(
            worker=worker,
            prompt=prompt,
            instructions=worker.instructions,
            access=access,
            timeout_s=timeout,
            idle_timeout_s=min(self.settings.idle_timeout_s, timeout),
            working_directory=cwd,
            child_cwd=child_cwd,
            on_progress=progress,
            on_spawn=functools.partial(self._record_process, run, step),
            partial=active.partial,
        )
        active.partial.text = ""
        outcome = await run_with_fallback(self.runtimes, request, mode, policy)
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
            step.session_id = result.session_id
            step.exit_code = result.exit_code
            step.status = "completed"
        else:
            failure = outcome.failure
            assert failure is not None
            step.status = "failed"
            step.error = self.settings.redact(f"{failure.kind} error from {outcome.mode}: {failure.message}")
            step.exit_code = failure.exit_code
            # What a failed step had produced is kept as whole as an answer would be.
            step.output, step.output_truncated = cap_text(self.settings.redact(failure.output), cap)
        via = f"{step.runtime_mode}" + (f" (fell back from {step.fallback_from})" if step.fallback_from else "")
        progress(f"step {step.index + 1}/{len(run.steps)} {step.status}: {step.role} {worker.name} via {via}")

    async def _record_process(self, run: Run, step: Step, pid: int) -> None:
        tree = spawned(pid)
        if tree is None:  # not a supervised spawn (a runtime of a test's): the pid is all we know
            step.process = ProcessRef(pid=pid, pgid=pid, start_ticks=process_start_ticks(pid))
        else:
            step.process = ProcessRef(pid=pid, pgid=pid, start_ticks=tree.start_ticks, marker=tree.marker)
        await self._save(run, durable=False)

    async def _abandon(self, active: _Active, status: RunStatus, reason: str, *, overwrite: bool = False) -> None:
        """Record a run that stopped abnormally; its open step keeps the output it had produced."""
        run = active.run
        with anyio.CancelScope(shield=True):
            run.status = status
            run.error = reason if overwrite else (run.error or reason)
            now = datetime.now(UTC)
            for step in run.steps:
                if step.status == "running":
                    step.status = {"cancelled": "cancelled", "failed": "failed"}.get(status, "interrupted")  # type: ignore[assignment]
                    step.error = step.error or reason
                    step.output, step.output_truncated = cap_text(
                        self.settings.redact(active.partial.text), self.settings.capture_bytes
                    )
                    step.process = None
                    step.ended_at = now
                elif step.status == "pending":
                    step.status = "skipped"
            run.ended_at = now
            try:
                await self._save(run)
            except StoreError as exc:
                # Those who wait on the run still hear how it ended; the store keeps its last
                # state, and the next start marks it interrupted.
                if str(exc) not in (run.error or ""):
                    run.error = f"{run.error}; its end could not be stored: {exc}"
                log.error("run %s ended %s but could not be stored: %s", run.id, run.status, exc)
            active.emit(f"run {run.id} {run.status}: {run.error or reason}")

    async def prune(
        self, *, max_runs: int | None = None, max_age_days: float | None = None, everything: bool = False
    ) -> list[str]:
        """Apply the retention limits (the settings' unless given; 0 is no limit, as in the settings):
        finished runs only. ``everything`` forgets every finished run."""
        runs: int | None
        days: float | None
        if everything:
            runs, days = 0, None  # the store's own 0: keep none
        else:
            runs = self.settings.retain_runs if max_runs is None else (max_runs or None)
            days = self.settings.retain_days if max_age_days is None else (max_age_days or None)
        if runs is None and days is None:
            return []
        pruned = await anyio.to_thread.run_sync(functools.partial(self.store.prune, max_runs=runs, max_age_days=days))
        if pruned:
            log.info("pruned %d runs past the retention limits (%s runs, %s days)", len(pruned), runs, days)
        return pruned

    async def recover(self) -> list[Run]:
        """Runs left queued or running by a server that is gone become interrupted; their processes die."""
        recovered = []
        for run in await anyio.to_thread.run_sync(self.store.unfinished_runs):
            if run.id in self._active or owner_alive(run.owner):
                continue
            await self._kill_leftovers(run)
            for step in run.steps:
                if step.status == "running":
                    step.status = "interrupted"
                    step.error = "the server running this step stopped"
                    step.process = None
                    step.ended_at = datetime.now(UTC)
                elif step.status == "pending":
                    step.status = "skipped"
            who = f"pid {run.owner.pid}" if run.owner else "unknown"
            run.status = "interrupted"
            run.error = f"interrupted: the server that ran it ({who}) stopped before it finished; found at restart"
            run.ended_at = datetime.now(UTC)
            await self._save(run)
            recovered.append(run)
            log.warning("run %s was left %s by a stopped server; marked interrupted", run.id, run.status)
        return recovered

    async def _kill_leftovers(self, run: Run) -> None:
        """Every process a dead server started for ``run``: each recorded step's tree (its leader
        and group while the leader is verified by start time, everything carrying its marker), and
        everything carrying a marker of that server, which covers a spawn whose record never reached
        the store before the crash. A dead server served only this store, so all of it is ours."""
        trees = [
            ProcessTree(p.pid, p.pgid, start_ticks=p.start_ticks, marker=p.marker, live=False)
            for p in (step.process for step in run.steps)
            if p is not None
        ]
        owner = run.owner
        if owner is not None and owner.host == socket.gethostname():
            tag = owner_tag(owner.pid, owner.start_ticks)
            if tag is not None:
                trees.append(ProcessTree(None, None, live=False, server_tag=tag, since_ticks=owner.start_ticks))
        for tree in trees:
            await kill_tree(tree)

    async def _save(self, run: Run, *, durable: bool = True) -> None:
        """Persist a run's state. Durable saves are on disk when this returns (a run handed to a
        client, a run's end). Intermediate states (a step started, its process spawned) are written
        behind, batched with other runs' into one fsync, so they cost the step nothing.

        Every string of the run passes the redactor here, the one door to the store and, through the
        run kept in memory, to every caller."""
        self.settings.redact.scrub(run)
        if not durable and self._tg is not None:
            self._pending[run.id] = run.model_copy(deep=True)
            self._pending_ready.set()
            return
        async with self._write_lock:
            self._pending.pop(run.id, None)
            await anyio.to_thread.run_sync(self.store.save_run, run)

    async def _write_behind(self) -> None:
        while True:
            await self._pending_ready.wait()
            self._pending_ready = anyio.Event()
            async with self._write_lock:
                batch = list(self._pending.values())
                self._pending.clear()
                if not batch:
                    continue
                try:
                    await anyio.to_thread.run_sync(self.store.save_runs, batch)
                except StoreError as exc:
                    # Intermediate states only: each run's next durable save carries its whole
                    # state (or fails that run). Said once per distinct cause, not per batch.
                    if str(exc) != self._last_store_error:
                        log.error("intermediate run states were not stored: %s", exc)
                    self._last_store_error = str(exc)
                else:
                    self._last_store_error = None
