"""The run lifecycle: admission, a task group that outlives requests, waiting, cancelling,
recovering runs a dead server left, retention.

Runs live in a task group owned by ``running()``, not in the request that started them: a client
that times out, cancels or disconnects never kills a run. A run's program (its strategy) runs
inside the run's own cancel scope, so a cancel or the run's wall-clock limit stops every branch
and, through the supervisor, kills every process tree.

Ownership is by lease: inside ``running()`` the server holds a lease in the run store, renewed in
the background and dropped at a clean exit, and every run it admits names it. A run whose owner's
lease lapsed (or, on this host, whose owner process is gone) is orphaned, and whoever notices --
start-up, a wait on the run, the periodic sweep of any server -- recovers it with a
compare-and-set in the store, so exactly one server does. A server that finds its own lease lapsed
(it was stopped, or cut off from the store) interrupts the runs it held and takes a new lease; a
run another server recovered meanwhile is never written by it again (the store refuses the save).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Container
from datetime import UTC, datetime

import anyio
import anyio.abc
import anyio.to_thread

from .. import worktrees
from ..config import Settings
from ..errors import (
    InvalidRequestError,
    LeaseLostError,
    RunTakenOverError,
    StoreError,
    UnknownRunError,
    WorktreeError,
    shown,
)
from ..models import TERMINAL_RUN_STATUSES, DispatchRequest, Lease, Run, RunOwner, RunStatus, Worker, clone
from ..runtimes.cli.supervisor import ProcessTree, kill_tree, owner_tag, process_running, process_start_ticks
from ..store import RunStore
from . import continuation, delivery
from .delivery import Delivered, prune_worktrees
from .executor import EngineContext, StepExecutor, StepFailed, cap_text, close_accounts, step_label
from .locks import held
from .plan import ActiveRun, Plan, ProgressCallback, make_plan
from .recorder import RunRecorder
from .spaces import Spaces

log = logging.getLogger("mcp_collab.engine")

# A waiting client hears from us at least this often (clients give up on silent calls; 25 s is the
# most a user should wait without a sign of life).
HEARTBEAT_S = 15.0
# A cancel kills process trees within half a second; this bounds the wait for the run to settle.
CANCEL_WAIT_S = 30.0
# Retention is applied at start and after this many finished runs.
PRUNE_EVERY = 100
# How often a wait on a run executed by another server process re-reads the store.
FOREIGN_POLL_S = 0.5
# A server renews its lease this many times per TTL (MCP_COLLAB_LEASE_TTL_S), and sweeps the store
# for orphaned runs as often: two renewals in a row can fail before the lease lapses.
LEASE_RENEWALS_PER_TTL = 3


def this_process(lease: str | None = None) -> RunOwner:
    pid = os.getpid()
    return RunOwner(host=socket.gethostname(), pid=pid, start_ticks=process_start_ticks(pid), lease=lease)


def owner_alive(owner: RunOwner | None, live_leases: Container[str]) -> bool:
    """Is the server that owns a run still at it? The one predicate recovery rests on: an engine
    whose runs are owned elsewhere extends it here.

    On this host, an owner process that is verifiably gone is gone at once, so a crash is recovered
    at the next start, not a TTL later. Otherwise an owner with a lease is alive while the lease is
    (``live_leases``: read from the store *after* the run, so a lease taken before the run was
    stored is in it if still alive). An owner from before leases is judged as it always was: by
    /proc on this host, and alive on any other."""
    if owner is None:
        return False
    if owner.engine == "temporal":
        return True  # Temporal executes it; the temporal engine reconciles it with its workflow
    if owner.host == socket.gethostname() and not process_running(owner.pid, owner.start_ticks):
        return False
    if owner.lease is None:
        return True
    return owner.lease in live_leases


def _described(owner: RunOwner | None) -> str:
    return f"pid {owner.pid} on {owner.host}" if owner is not None else "unknown"


def where(run: Run) -> str:
    """Where a run stands, for heartbeats: its running steps, or why it waits."""
    current = [s for s in run.steps if s.status == "running"]
    if current:
        return "; ".join(f"{step_label(s)} {s.role} {s.worker_name} via {s.runtime_mode}" for s in current)
    return "waiting for a free slot" if run.status == "queued" else run.status


class RunLifecycle:
    def __init__(
        self,
        settings: Settings,
        store: RunStore,
        recorder: RunRecorder,
        executor: StepExecutor,
        workers: Callable[[], Awaitable[list[Worker]]],
    ) -> None:
        self.settings = settings
        self.store = store
        self.recorder = recorder
        self.executor = executor
        self._workers = workers  # the registered workers, when a dispatch is planned
        self._tg: anyio.abc.TaskGroup | None = None
        self._active: dict[str, ActiveRun] = {}
        self._limiter = anyio.CapacityLimiter(settings.max_concurrent_runs)
        self._owner = this_process()  # with a lease inside running()
        self._lease: Lease | None = None
        self._recovering = anyio.Lock()  # one recovery pass at a time in this process
        self._finished = 0
        # Dispatches between the queue check and their run's entry in _active: counted with the
        # queued runs, so the cap holds however many dispatches arrive at once.
        self._admitting = 0
        self._starting: anyio.Event | None = None  # set once start-up recovery is done

    # -- reading -----------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> Run:
        await self.ready()
        # Nothing leaves the server about a run before its admission is durable.
        await self.recorder.sync()
        run = await anyio.to_thread.run_sync(self.store.get_run, run_id)
        if run is None:
            # How to list runs is the surface's to say (a tool, or a command).
            raise UnknownRunError(f"unknown run {shown(run_id)}")
        return run

    # -- the task group ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Own a task group for background runs; recover runs a dead server left behind.

        Leaving the block (the server stops) interrupts whatever is still running and kills its
        processes."""
        await anyio.to_thread.run_sync(self.store.check_writable)
        async with self._leased(), anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self.recorder.write_behind)
            tg.start_soon(self._keep_lease)
            tg.start_soon(self._sweep)
            # Recovery can take a while (killing a dead server's process trees): it runs beside the
            # first requests instead of before them, so a client's start-up probe is answered at
            # once; reads of runs wait for it (``ready``), new runs need not.
            self._starting = anyio.Event()
            tg.start_soon(self._start_up, self._starting)
            try:
                yield
            finally:
                self._tg = None
                tg.cancel_scope.cancel()

    @contextlib.asynccontextmanager
    async def _leased(self) -> AsyncIterator[None]:
        """Hold a lease in the store (see ``_keep_lease``); dropped once the runs' last states are
        stored under it."""
        await self._take_lease()
        try:
            yield
        finally:
            await self._drop_lease()

    async def _take_lease(self) -> None:
        me = this_process()
        fresh = Lease(kind="server", host=me.host, pid=me.pid, start_ticks=me.start_ticks)
        self._lease = await anyio.to_thread.run_sync(self.store.renew_lease, fresh, self.settings.lease_ttl_s)
        self._owner = this_process(lease=self._lease.id)

    async def _keep_lease(self) -> None:
        """Renew the lease until cancelled; a lease found lapsed costs the runs held under it."""
        while True:
            await anyio.sleep(self.settings.lease_ttl_s / LEASE_RENEWALS_PER_TTL)
            assert self._lease is not None
            try:
                self._lease = await anyio.to_thread.run_sync(
                    self.store.renew_lease, self._lease, self.settings.lease_ttl_s
                )
            except LeaseLostError as exc:
                log.error("%s; the runs it held here are interrupted", exc)
                await self._lease_lost(self._lease.id)
            except StoreError as exc:
                # Tried again next time; if the store stays out of reach past the TTL, the lease lapses.
                log.error("the lease of this server was not renewed: %s", exc)

    async def _lease_lost(self, lost: str) -> None:
        """Every run held under the lapsed lease ``lost`` stops (processes killed); its last state is
        stored unless another server recovered it first, whose state then stands. New runs get a
        new lease."""
        try:
            await self._take_lease()
        except StoreError as exc:
            log.error("no new lease was taken (tried again at the next renewal): %s", exc)
        finally:
            for active in list(self._active.values()):
                owner = active.run.owner
                if owner is not None and owner.lease == lost:
                    active.stop_reason = active.stop_reason or (
                        "interrupted",
                        "this server lost its lease on the run store (it was stopped or cut off from the store "
                        f"for longer than MCP_COLLAB_LEASE_TTL_S={self.settings.lease_ttl_s:g}s); its processes "
                        "were killed",
                    )
                    active.scope.cancel()

    async def _sweep(self) -> None:
        """Recover orphaned runs of any server, as often as the lease is renewed, until cancelled."""
        while True:
            await anyio.sleep(self.settings.lease_ttl_s / LEASE_RENEWALS_PER_TTL)
            try:
                await self.recover()
            except StoreError as exc:
                log.error("the sweep for orphaned runs was not completed: %s", exc)

    async def _drop_lease(self) -> None:
        if self._lease is None:
            return
        lease, self._lease = self._lease, None
        self._owner = this_process()
        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(self.store.drop_lease, lease.id)
            except StoreError as exc:
                log.warning("the lease of this server was not dropped (it lapses by itself): %s", exc)

    async def _start_up(self, done: anyio.Event) -> None:
        try:
            await self.recover()
            await self.prune()
        except StoreError as exc:
            log.error("recovery at start was not completed: %s", exc)
        finally:
            done.set()

    async def ready(self) -> None:
        """Until the runs a dead server left are recovered (at once outside ``running``)."""
        if self._starting is not None:
            await self._starting.wait()

    async def dispatch(self, request: DispatchRequest, *, on_progress: ProgressCallback | None = None) -> Run:
        """Plan the run (refusing anything wrong before it starts) and run it to its end."""
        active = await self._admit(request)
        if on_progress is not None:
            active.listeners.append(on_progress)
        if self._tg is not None:
            await self._begin(active)
            await active.done.wait()
        else:
            await self._accepted(active)
            await self._background(active)
        return clone(active.run)

    async def start(
        self, request: DispatchRequest, *, on_progress: ProgressCallback | None = None, durable: bool = True
    ) -> Run:
        """Plan the run and start it in the background (inside ``running``); returns it queued, on
        disk: work that could not be recorded never starts. ``on_progress`` hears the run from its
        first step (until a ``wait`` given the same callback ends, or the run does).

        ``durable=False``: return as soon as the run is recorded and started, its admission not yet
        fsynced, for a caller that tells nobody of the run but through ``wait`` (which answers only
        with what is durable) and ``on_progress`` (which hears nothing before that): the run's own
        end, or the write-behind task, then makes it durable in an fsync it needed anyway."""
        if self._tg is None:
            raise RuntimeError("start() needs the orchestrator's task group: use `async with orchestrator.running()`")
        active = await self._admit(request)
        return await self._started(active, on_progress, durable)

    async def continue_run(
        self,
        parent_id: str,
        message: str,
        worker: str | None = None,
        *,
        on_progress: ProgressCallback | None = None,
        durable: bool = True,
    ) -> Run:
        """Start a follow-up to a finished run (see ``engine.continuation``); returns it queued
        (``durable`` as for ``start``)."""
        if self._tg is None:
            raise RuntimeError("continue_run() needs the task group: use `async with orchestrator.running()`")
        parent = await self.get_run(parent_id)
        active = await self._admit_plan(
            lambda registered: continuation.make_plan(self.settings, parent, message, worker, registered)
        )
        return await self._started(active, on_progress, durable)

    async def _started(self, active: ActiveRun, on_progress: ProgressCallback | None, durable: bool) -> Run:
        # As admitted: the run itself changes from now on. Nothing nested has been filled in yet (no
        # step, no worktree), so its own lists, copied, make the snapshot.
        run = active.run
        admitted = run.model_copy(update={k: list(v) for k, v in run.__dict__.items() if type(v) is list})
        if on_progress is not None:
            active.listeners.append(on_progress)
        if durable:
            await self._begin(active)
        else:
            assert self._tg is not None
            self._tg.start_soon(self._background, active)
        return admitted

    async def _begin(self, active: ActiveRun) -> None:
        """Start an admitted run in the background; return once its admission is durable. The run
        does not wait for that fsync: it starts while the fsync is under way (see ``_accepted``)."""
        assert self._tg is not None
        self._tg.start_soon(self._background, active)
        await self._accepted(active)

    async def _accepted(self, active: ActiveRun) -> None:
        """Until the run's admission, written without an fsync, is durable (see ``_settled``). Its
        processes may already be running: that is safe because the record was written before they
        started (a server killed now leaves it for recovery, which kills them), and a power cut that
        loses the record kills them too. If the fsync fails, the caller is refused with the cause."""
        if active.held is None and active.admission_error is None:
            return
        # Shielded: a caller that gives up must not leave the fsync half awaited (it is short).
        with anyio.CancelScope(shield=True):
            await self.recorder.sync()
        if active.admission_error is not None:
            raise active.admission_error

    def _settled(self, active: ActiveRun, error: StoreError | None) -> None:
        """The run's admission is durable: what it said meanwhile is said now. Or it could not be
        made durable: the run is stopped (its processes killed, recorded failed if the store still
        takes it) and nothing of what it said is."""
        if error is None:
            active.release()
            return
        active.admission_error = error
        active.held = None
        if active.stop_reason is None:
            active.stop_reason = ("failed", str(error))
        active.scope.cancel()

    async def wait(self, run_id: str, timeout_s: float | None, *, on_progress: ProgressCallback | None = None) -> Run:
        """The run when it ends, or as it stands after ``timeout_s``; progress and heartbeats meanwhile."""
        active = self._active.get(run_id)
        if active is None:
            return await self._wait_elsewhere(run_id, timeout_s)
        if on_progress is None:
            # Nobody to keep informed: no heartbeat, so no task to start and cancel.
            with anyio.move_on_after(timeout_s if timeout_s is not None else math.inf):
                await active.done.wait()
        else:
            if on_progress not in active.listeners:  # start() may have added it
                active.listeners.append(on_progress)
            try:
                with anyio.move_on_after(timeout_s if timeout_s is not None else math.inf):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._heartbeat, active, on_progress)
                        await active.done.wait()
                        tg.cancel_scope.cancel()
            finally:
                with contextlib.suppress(ValueError):
                    active.listeners.remove(on_progress)
        if active.done.is_set():
            # The run as it ended, not a copy: nothing changes a run once it ended (callers only
            # read it, and derive what they change), so every waiter may share it.
            return active.run
        # Still going: report what is on disk, never a state (say, "completed") whose save has not
        # landed yet; a crash now would make the store, not our memory, the truth.
        await self.recorder.flush(run_id)
        return await self.get_run(run_id)  # its admission made durable first

    async def cancel(self, run_id: str, *, reason: str = "cancelled on request") -> tuple[Run, bool]:
        """Stop a run: kill its processes, mark it and its open steps cancelled, keep partial output.

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
        return clone(active.run), True

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
        instead of waiting for the next restart or sweep."""
        if run.status in TERMINAL_RUN_STATUSES or run.id in self._active:
            return run
        if owner_alive(run.owner, await self._live_leases([run])):
            return run
        await self.recover()
        return await self.get_run(run.id)

    async def _live_leases(self, runs: list[Run]) -> set[str]:
        """The live leases, read after ``runs`` were (only when one of their owners has a lease)."""
        if not any(run.owner is not None and run.owner.lease is not None for run in runs):
            return set()
        return {lease.id for lease in await anyio.to_thread.run_sync(self.store.live_leases)}

    async def _heartbeat(self, active: ActiveRun, on_progress: ProgressCallback) -> None:
        started = time.monotonic()
        while True:
            await anyio.sleep(HEARTBEAT_S)
            run = active.run
            on_progress(f"run {run.id} still {run.status}: {where(run)}, {time.monotonic() - started:.0f}s waited")

    # -- a run from admission to its end -------------------------------------------------------

    async def _admit(self, request: DispatchRequest) -> ActiveRun:
        async def planned(registered: list[Worker]) -> Plan:
            plan = make_plan(self.settings, request, registered)
            if plan.strategy.needs_repository:
                await self._check_repository(plan)
            return plan

        return await self._admit_plan(planned)

    async def _admit_plan(self, planner: Callable[[list[Worker]], Plan | Awaitable[Plan]]) -> ActiveRun:
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
            registered = await self._workers()
            made = planner(registered)
            plan = await made if inspect.isawaitable(made) else made
            plan.run.owner = self._owner
            active = ActiveRun(plan=plan, redact=self.settings.redact, held=[])
            if not await self.recorder.accept(plan.run, functools.partial(self._settled, active)):
                active.held = None  # durable already: nothing to hold back
            self._active[plan.run.id] = active
        finally:
            self._admitting -= 1
        return active

    async def _check_repository(self, plan: Plan) -> None:
        """A strategy whose writers work side by side needs a worktree each: refused before it starts."""
        name = plan.strategy.name
        if not self.settings.worktrees:
            raise InvalidRequestError(
                f"{name} needs git worktrees, which are off on this server (MCP_COLLAB_WORKTREES=0)"
            )
        first = plan.cast[0][1]
        directory = plan.cwd or plan.directory_of(first)
        if directory is None or await worktrees.inspect(directory, self.settings.workspace_roots) is None:
            raise InvalidRequestError(
                f"{name} needs a git repository: each writer works in a worktree of its own, and "
                f"{directory or 'the working directory'} is not inside one. Use a workingDirectory inside a "
                "git repository, or another strategy"
            )

    async def _background(self, active: ActiveRun) -> None:
        run = active.run
        try:
            with active.scope:
                async with held(self._limiter):  # beyond the limit, runs wait here as `queued`
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

    async def _execute(self, active: ActiveRun) -> None:
        """Run the strategy's program; the run ends completed unless a step it required failed."""
        run = active.run
        run.status = "running"
        run.started_at = datetime.now(UTC)  # saved with the first step's start
        if run.max_cost_usd is None:
            run.max_cost_usd = self.settings.max_cost_usd
        plan = active.plan
        first = plan.cast[0][1] if plan.cast else None
        spaces = active.spaces = Spaces(
            run,
            directory=plan.cwd or (plan.directory_of(first) if first is not None else None),
            roots=self.settings.workspace_roots,
            base_dir=self.settings.worktrees_dir,
            enabled=self.settings.worktrees,
        )
        context = EngineContext(active, self.executor, self.settings, spaces)
        failure = None
        try:
            await plan.strategy.run(context)
        except (StepFailed, WorktreeError) as exc:
            failure = self.settings.redact(exc.reason if isinstance(exc, StepFailed) else str(exc))
        context.settle(run, failure)
        await spaces.finish()
        run.ended_at = datetime.now(UTC)
        close_accounts(run)
        # The one run in flight: its end may be fsynced on the loop (nothing else is waiting there).
        await self.recorder.save(run, alone=len(self._active) == 1 and not self._admitting)
        active.emit(f"run {run.id} {run.status}")

    async def _abandon(self, active: ActiveRun, status: RunStatus, reason: str, *, overwrite: bool = False) -> None:
        """Record a run that stopped abnormally; its open steps keep the output they had produced."""
        run = active.run
        with anyio.CancelScope(shield=True):
            run.status = status
            run.error = reason if overwrite else (run.error or reason)
            now = datetime.now(UTC)
            for step in run.steps:
                if step.status == "running":
                    step.status = {"cancelled": "cancelled", "failed": "failed"}.get(status, "interrupted")  # type: ignore[assignment]
                    step.error = step.error or reason
                    partial = active.partials.get(step.index)
                    step.output, step.output_truncated = cap_text(
                        self.settings.redact(partial.text if partial else ""), self.settings.capture_bytes
                    )
                    step.process = None
                    step.ended_at = now
                elif step.status == "pending":
                    step.status = "skipped"
            if active.spaces is not None:
                await active.spaces.finish()  # the work done before the stop stays on its branch
            run.ended_at = now
            close_accounts(run)
            try:
                await self.recorder.save(run)
            except RunTakenOverError as exc:
                # Another server recovered the run while this one had lost its lease: the stored
                # state is the run's, and those waiting here hear it.
                log.warning("run %s: %s", run.id, exc)
                with contextlib.suppress(StoreError):  # unreadable now: they hear ours, the store keeps its own
                    stored = await anyio.to_thread.run_sync(self.store.get_run, run.id)
                    if stored is not None:
                        active.plan.run = run = stored
            except StoreError as exc:
                # Those who wait on the run still hear how it ended; the store keeps its last
                # state, and the next start marks it interrupted.
                if str(exc) not in (run.error or ""):
                    run.error = f"{run.error}; its end could not be stored: {exc}"
                log.error("run %s ended %s but could not be stored: %s", run.id, run.status, exc)
            active.emit(f"run {run.id} {run.status}: {run.error or reason}")

    async def deliver(self, run: Run, action: str, label: str | None = None) -> Delivered:
        """Apply a finished run's branch (``apply``) or remove its worktrees (``discard``), where the
        worktrees are: on this machine for runs this engine executed."""
        if action == "apply":
            return await delivery.apply(self.settings, run, label)
        return await delivery.discard(run)

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
            removed = await prune_worktrees(self.settings, self.store)
            if removed:
                log.info("removed %d worktrees of pruned runs", len(removed))
        return pruned

    async def recover(self) -> list[Run]:
        """Runs whose owner is gone (``owner_alive``) become interrupted and, on this host, their
        processes die. Each is taken over with a compare-and-set in the store: of servers noticing
        one orphan at once, exactly one recovers it. Returns the runs this call recovered."""
        async with self._recovering:
            recovered = []
            unfinished = await anyio.to_thread.run_sync(self.store.unfinished_runs)
            live = await self._live_leases(unfinished)  # read after the runs: see owner_alive
            for run in unfinished:
                if run.id in self._active or owner_alive(run.owner, live):
                    continue
                if await self._recover_one(run):
                    recovered.append(run)
            return recovered

    async def _recover_one(self, run: Run) -> bool:
        previous = run.owner
        await self._kill_leftovers(run)
        now = datetime.now(UTC)
        for step in run.steps:
            if step.status == "running":
                step.status = "interrupted"
                step.error = "the server running this step stopped"
                step.process = None
                step.ended_at = now
            elif step.status == "pending":
                step.status = "skipped"
        left = run.status
        # Its process verifiably gone (or an owner from before leases): it stopped. Else its lease lapsed.
        gone = previous is None or previous.lease is None or not owner_alive(previous, {previous.lease})
        why = "stopped" if gone else "stopped or lost touch with the run store (its lease lapsed)"
        run.status = "interrupted"
        run.error = (
            f"interrupted: the server that ran it ({_described(previous)}) {why} before it finished; "
            f"recovered by {_described(self._owner)}"
        )
        run.ended_at = now
        # The recovering server owns the run's last state: a late save by the owner that lost it is refused.
        run.owner = self._owner
        self.recorder.redact.scrub(run)
        taken = await anyio.to_thread.run_sync(
            self.store.take_over_run, run, previous.lease if previous is not None else None
        )
        if taken:
            log.warning("run %s was left %s by a server that is gone; marked interrupted", run.id, left)
        return taken

    async def _kill_leftovers(self, run: Run) -> None:
        """Every process a dead server started for ``run``: each recorded step's tree (its leader
        and group while the leader is verified by start time, everything carrying its marker), and
        everything carrying a marker of that server, which covers a spawn whose record never reached
        the store before the crash. A dead server served only this store, so all of it is ours; a
        live one whose lease lapsed may since have started other runs, so only the recorded trees
        are killed (it kills the rest itself when it finds its lease lapsed)."""
        trees = [
            ProcessTree(p.pid, p.pgid, start_ticks=p.start_ticks, marker=p.marker, live=False)
            for p in (step.process for step in run.steps)
            if p is not None
        ]
        owner = run.owner
        if (
            owner is not None
            and owner.host == socket.gethostname()
            and not process_running(owner.pid, owner.start_ticks)
        ):
            tag = owner_tag(owner.pid, owner.start_ticks)
            if tag is not None:
                trees.append(ProcessTree(None, None, live=False, server_tag=tag, since_ticks=owner.start_ticks))
        for tree in trees:
            await kill_tree(tree)
