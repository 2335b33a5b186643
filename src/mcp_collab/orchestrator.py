"""The WorkerOrchestrator: the one front the MCP server, the ``mcp-collab`` command and tests drive.

Plain Python: no MCP in here. It holds no logic of its own; it composes the engine's parts:

- ``engine.registry.WorkerRegistry``: worker profiles;
- ``engine.plan``: a dispatch checked and cast into a plan before anything is stored;
- ``engine.executor``: steps (runtime choice, fallback, confinement, what they produced) and the
  context a strategy's program runs against;
- ``engine.lifecycle.RunLifecycle``: admission, background runs, wait, cancel, recovery, retention;
- ``engine.recorder.RunRecorder``: every state change of a run persisted (durable, or written behind).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping

import anyio.to_thread

from .config import Settings
from .engine.delivery import Delivered
from .engine.executor import StepExecutor
from .engine.lifecycle import RunLifecycle
from .engine.plan import ProgressCallback
from .engine.recorder import RunRecorder
from .engine.registry import WorkerRegistry
from .errors import InvalidRequestError
from .models import MAX_PAGE_SIZE, DispatchRequest, Run, RunPage, RunStatus, RuntimeMode, Worker, WorkerSpec
from .runtimes.base import WorkerRuntime
from .runtimes.registry import RUNTIMES
from .store import RunFilter, RunStore, open_store
from .strategies import get_strategy

__all__ = ["MAX_PAGE_SIZE", "WorkerOrchestrator", "default_runtimes"]


def default_runtimes(settings: Settings) -> dict[RuntimeMode, WorkerRuntime]:
    """One of each runtime in the registry (runtimes/registry.py)."""
    return {mode: spec.create(settings) for mode, spec in RUNTIMES.items()}


class WorkerOrchestrator:
    def __init__(
        self,
        settings: Settings,
        store: RunStore | None = None,
        runtimes: Mapping[RuntimeMode, WorkerRuntime] | None = None,
    ) -> None:
        self.settings = settings
        self.store: RunStore = store if store is not None else open_store(settings)
        self.runtimes: dict[RuntimeMode, WorkerRuntime] = (
            dict(runtimes) if runtimes is not None else default_runtimes(settings)
        )
        self.registry = WorkerRegistry(settings, self.store)
        self.recorder = RunRecorder(self.store, settings.redact)
        self.executor = StepExecutor(settings, self.runtimes, self.recorder)
        lifecycle: type[RunLifecycle] = RunLifecycle
        if settings.engine == "temporal":
            from .engine.temporal.client import TemporalRuns  # temporalio only loads for this engine

            lifecycle = TemporalRuns
        self.runs = lifecycle(settings, self.store, self.recorder, self.executor, self.registry.list)

    async def __aenter__(self) -> WorkerOrchestrator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the runtimes' HTTP clients."""
        for runtime in self.runtimes.values():
            await runtime.aclose()

    # -- workers -----------------------------------------------------------------------------

    async def register_worker(self, spec: WorkerSpec) -> Worker:
        return await self.registry.register(spec)

    async def list_workers(self) -> list[Worker]:
        return await self.registry.list()

    async def remove_worker(self, name: str) -> Worker:
        return await self.registry.remove(name)

    # -- runs --------------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> Run:
        await self.recorder.catch_up()  # the run as it stands now, not as it stood 50 ms ago
        return await self.runs.get_run(run_id)

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
        await self.runs.ready()
        await self.recorder.catch_up()  # a list shows each run as it stands now
        await self.recorder.sync()  # and only runs whose admission is durable
        return await anyio.to_thread.run_sync(self.store.list_runs, run_filter, limit, cursor)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[WorkerOrchestrator]:
        """Own a task group for background runs (see ``RunLifecycle.running``)."""
        async with self.runs.running():
            yield self

    async def dispatch(self, request: DispatchRequest, *, on_progress: ProgressCallback | None = None) -> Run:
        return await self.runs.dispatch(request, on_progress=on_progress)

    async def start(
        self, request: DispatchRequest, *, on_progress: ProgressCallback | None = None, durable: bool = True
    ) -> Run:
        return await self.runs.start(request, on_progress=on_progress, durable=durable)

    async def continue_run(
        self,
        run_id: str,
        message: str,
        worker: str | None = None,
        *,
        on_progress: ProgressCallback | None = None,
        durable: bool = True,
    ) -> Run:
        """A follow-up to a finished run, as a new run linked to it; returns it queued."""
        return await self.runs.continue_run(run_id, message, worker, on_progress=on_progress, durable=durable)

    async def wait(self, run_id: str, timeout_s: float | None, *, on_progress: ProgressCallback | None = None) -> Run:
        return await self.runs.wait(run_id, timeout_s, on_progress=on_progress)

    async def cancel(self, run_id: str, *, reason: str = "cancelled on request") -> tuple[Run, bool]:
        return await self.runs.cancel(run_id, reason=reason)

    async def apply(self, run_id: str, label: str | None = None) -> Delivered:
        """Apply a finished run's branch to the user's working tree: all of it, or a clear refusal
        naming the files in the way (the working tree, index and branches untouched)."""
        run = await self.get_run(run_id)
        delivered = await self.runs.deliver(run, "apply", label)
        if delivered.applied:
            await self.recorder.save(run)
        return delivered

    async def discard(self, run_id: str) -> Delivered:
        """Remove a finished run's worktrees and branches."""
        delivered = await self.runs.deliver(await self.get_run(run_id), "discard")
        await self.recorder.save(delivered.run)
        return delivered

    async def prune(
        self, *, max_runs: int | None = None, max_age_days: float | None = None, everything: bool = False
    ) -> list[str]:
        return await self.runs.prune(max_runs=max_runs, max_age_days=max_age_days, everything=everything)

    async def recover(self) -> list[Run]:
        return await self.runs.recover()
