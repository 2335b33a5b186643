"""The WorkerOrchestrator: worker registry, dispatch through a strategy, and the run lifecycle.

Plain Python: no MCP in here. The MCP server, the ``mcp-collab`` command and tests all drive
this one class. Every state change of a run is persisted before the next begins, so the history
always shows what actually happened, including which runtime ran each step.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.to_thread

from . import workspace
from .config import Settings
from .errors import InvalidRequestError, UnknownRunError, UnknownWorkerError
from .models import (
    Access,
    DispatchRequest,
    FallbackPolicy,
    Run,
    RunPage,
    RunStatus,
    RuntimeMode,
    Step,
    Worker,
    WorkerSpec,
)
from .runtimes.base import StepRequest, WorkerRuntime
from .runtimes.selector import choose_mode, choose_policy, run_with_fallback
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

MAX_PAGE_SIZE = 200


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
        self.store: RunStore = store if store is not None else JsonStore(settings.store_path)
        self.runtimes: dict[RuntimeMode, WorkerRuntime] = (
            dict(runtimes) if runtimes is not None else default_runtimes(settings)
        )

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
        if worker.working_directory is not None:
            self._check_directory(worker.working_directory, "workingDirectory")
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
        known = ", ".join(sorted(w.name for w in await self.list_workers())) or "none registered"
        return UnknownWorkerError(f"unknown worker {name!r}; registered workers: {known}")

    # -- runs --------------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> Run:
        run = await anyio.to_thread.run_sync(self.store.get_run, run_id)
        if run is None:
            raise UnknownRunError(f"unknown run {run_id!r}; list_worker_runs shows the runs this server knows")
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
        run_filter = RunFilter(status=status, strategy=strategy, worker=worker)
        return await anyio.to_thread.run_sync(self.store.list_runs, run_filter, limit, cursor)

    async def dispatch(
        self,
        request: DispatchRequest,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> Run:
        """Plan the run (refusing anything wrong before it starts), then run it to its end."""
        run, strategy, workers, modes, policies, cwd = await self._plan(request, request.runtime_modes or {})
        await self._save(run)
        await self._execute(run, strategy, workers, modes, policies, cwd, on_progress or _noop)
        return run

    async def _plan(
        self, request: DispatchRequest, runtime_modes: Mapping[str, RuntimeMode]
    ) -> tuple[Run, Strategy, list[Worker], list[RuntimeMode], list[FallbackPolicy], Path | None]:
        strategy = get_strategy(request.strategy)
        registered = await self.list_workers()
        workers = assign_workers(strategy, registered, request.workers)
        unknown = sorted(set(runtime_modes) - {w.name for w in workers})
        if unknown:
            raise InvalidRequestError(
                f"runtimeModes names {', '.join(map(repr, unknown))}, which take no step in this run; "
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
        directory = request.working_directory
        if directory is not None:
            self._check_directory(directory, "workingDirectory")
        cwd = Path(directory) if directory else None
        run = Run(
            id=new_run_id(),
            task=request.task,
            strategy=strategy.name,
            status="queued",
            runtime_mode=request.runtime_mode,
            workers=[w.name for w in workers],
            steps=[
                Step(index=i, role=role.name, worker_name=w.name, worker_model=w.model, runtime_mode=mode)
                for i, (role, w, mode) in enumerate(zip(strategy.roles, workers, modes, strict=True))
            ],
        )
        return run, strategy, workers, modes, policies, cwd

    @staticmethod
    def _check_directory(directory: str, field: str) -> None:
        path = Path(directory)
        if not path.is_absolute():
            raise InvalidRequestError(f"{field} must be an absolute path, got {directory!r}")
        if not path.is_dir():
            raise InvalidRequestError(f"{field} {directory!r} is not an existing directory")

    async def _execute(
        self,
        run: Run,
        strategy: Strategy,
        workers: list[Worker],
        modes: list[RuntimeMode],
        policies: list[FallbackPolicy],
        cwd: Path | None,
        progress: ProgressCallback,
    ) -> None:
        run.status = "running"
        run.started_at = datetime.now(UTC)
        await self._save(run)
        diff_text: str | None = None
        try:
            for i, (role, worker) in enumerate(zip(strategy.roles, workers, strict=True)):
                step = run.steps[i]
                step_cwd = cwd or (Path(worker.working_directory) if worker.working_directory else None)
                before = await workspace.snapshot(step_cwd) if strategy.wants_diff and i == 0 else None
                prompt = role.prompt(PromptContext(task=run.task, previous=run.steps[:i], diff=diff_text))
                await self._run_step(run, step, worker, modes[i], policies[i], prompt, role.access, step_cwd, progress)
                if step.status != "completed":
                    for later in run.steps[i + 1 :]:
                        later.status = "skipped"
                    run.status = "failed"
                    run.error = f"step {i + 1} ({step.role}, worker {step.worker_name}) failed: {step.error}"
                    break
                if role.judges:
                    step.verdict, step.findings = parse_verdict(step.output)
                    run.verdict, run.findings = step.verdict, list(step.findings)
                if before is not None:
                    after = await workspace.snapshot(step_cwd)
                    if after is not None and after != before:
                        diff_text = await workspace.diff(step_cwd, before, after, MAX_QUOTED_DIFF_CHARS)
            else:
                run.status = "completed"
                run.result = run.steps[-1].output
        except anyio.get_cancelled_exc_class():
            await self._abandon(run, "cancelled", "the run was cancelled")
            raise
        except Exception as exc:
            await self._abandon(run, "failed", f"internal error: {exc}")
            raise
        run.ended_at = datetime.now(UTC)
        await self._save(run)
        progress(f"run {run.id} {run.status}")

    async def _run_step(
        self,
        run: Run,
        step: Step,
        worker: Worker,
        mode: RuntimeMode,
        policy: FallbackPolicy,
        prompt: str,
        access: Access,
        cwd: Path | None,
        progress: ProgressCallback,
    ) -> None:
        step.status = "running"
        step.started_at = datetime.now(UTC)
        t0 = time.monotonic()
        await self._save(run)
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
            on_progress=progress,
        )
        outcome = await run_with_fallback(self.runtimes, request, mode, policy)
        step.attempts = outcome.attempts
        step.runtime_mode = outcome.mode
        step.fallback_from = outcome.fallback_from
        step.ended_at = datetime.now(UTC)
        step.duration_ms = int((time.monotonic() - t0) * 1000)
        if outcome.result is not None:
            result = outcome.result
            step.output, truncated = cap_text(result.text, self.settings.capture_bytes)
            step.output_truncated = truncated or result.truncated
            step.usage = result.usage
            step.session_id = result.session_id
            step.exit_code = result.exit_code
            step.status = "completed"
        else:
            failure = outcome.failure
            assert failure is not None
            step.status = "failed"
            step.error = f"{failure.kind} error from {outcome.mode}: {failure.message}"
            step.exit_code = failure.exit_code
            step.output, step.output_truncated = cap_text(failure.output, self.settings.capture_bytes)
        via = f"{step.runtime_mode}" + (f" (fell back from {step.fallback_from})" if step.fallback_from else "")
        progress(f"step {step.index + 1}/{len(run.steps)} {step.status}: {step.role} {worker.name} via {via}")

    async def _abandon(self, run: Run, status: RunStatus, reason: str) -> None:
        """Record a run that stopped abnormally; its open step keeps the output it had."""
        with anyio.CancelScope(shield=True):
            run.status = status
            run.error = run.error or reason
            for step in run.steps:
                if step.status == "running":
                    step.status = "cancelled" if status == "cancelled" else "failed"
                    step.ended_at = datetime.now(UTC)
                elif step.status == "pending":
                    step.status = "skipped"
            run.ended_at = datetime.now(UTC)
            await self._save(run)

    async def _save(self, run: Run) -> None:
        await anyio.to_thread.run_sync(self.store.save_run, run)
