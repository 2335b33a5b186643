"""Which runtime runs a step, and what happens when it fails.

Choice, most specific first: the dispatch's per-worker override, the dispatch's override, the
worker profile, the server default (``MCP_WORKER_RUNTIME_DEFAULT``). The same inputs always give
the same choice; an incompatible choice is refused, never silently replaced.

Fallback (``MCP_WORKER_FALLBACK_POLICY`` or the worker's ``fallbackPolicy``): under ``on_error`` an
SDK step whose failure is ``unavailable`` or ``transient`` runs again through ``cli``; a ``fatal``
failure never falls back. SDK steps only produce text, so repeating one through the CLI cannot
repeat a side effect; a CLI step is never retried, since it may have edited files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from ..errors import InvalidRequestError, RuntimeFailure, RuntimeUnavailable
from ..models import Attempt, FallbackPolicy, RuntimeMode, Worker, compatibility_error
from .base import RuntimeResult, StepRequest, WorkerRuntime

FALLBACK_MODE: RuntimeMode = "cli"


def choose_mode(
    worker: Worker,
    *,
    default: RuntimeMode,
    dispatch_mode: RuntimeMode | None = None,
    per_worker: Mapping[str, RuntimeMode] | None = None,
) -> RuntimeMode:
    if per_worker and worker.name in per_worker:
        mode, source = per_worker[worker.name], f"runtimeModes[{worker.name!r}]"
    elif dispatch_mode is not None:
        mode, source = dispatch_mode, "runtimeMode"
    elif worker.runtime_mode is not None:
        mode, source = worker.runtime_mode, f"worker {worker.name!r}"
    else:
        # The server default applies to identities that can take it (an SDK runtime serves one
        # vendor's identity); the others run through their CLI.
        problem = compatibility_error(worker.model, default)
        return default if problem is None else FALLBACK_MODE
    problem = compatibility_error(worker.model, mode)
    if problem:
        raise InvalidRequestError(f"{source}: {problem} (worker {worker.name!r})")
    return mode


def choose_policy(worker: Worker, *, default: FallbackPolicy, dispatch: FallbackPolicy | None) -> FallbackPolicy:
    return dispatch or worker.fallback_policy or default


@dataclass(frozen=True)
class StepOutcome:
    mode: RuntimeMode
    fallback_from: RuntimeMode | None
    attempts: list[Attempt]
    result: RuntimeResult | None
    failure: RuntimeFailure | None


async def run_with_fallback(
    runtimes: Mapping[RuntimeMode, WorkerRuntime],
    request: StepRequest,
    mode: RuntimeMode,
    policy: FallbackPolicy,
    on_attempt: Callable[[Attempt], None] | None = None,
) -> StepOutcome:
    """Run ``request`` through ``mode``, then through the CLI if the policy allows; record every try."""
    attempts: list[Attempt] = []
    plan = [mode]
    while plan:
        current = plan.pop(0)
        started_at, t0 = datetime.now(UTC), time.monotonic()
        runtime = runtimes.get(current)
        try:
            if runtime is None:
                raise RuntimeUnavailable(f"no {current} runtime is configured on this server", code="not_configured")
            result = await runtime.run(request)
        except RuntimeFailure as failure:
            attempt = _attempt(current, started_at, t0, failure=failure)
            attempts.append(attempt)
            if on_attempt:
                on_attempt(attempt)
            can_fall_back = (
                policy == "on_error" and current != FALLBACK_MODE and failure.kind in ("unavailable", "transient")
            )
            if can_fall_back:
                request.on_progress(
                    f"{request.worker.name}: {current} failed ({failure.kind}: {failure.message}); "
                    f"falling back to {FALLBACK_MODE}"
                )
                plan.append(FALLBACK_MODE)
                continue
            return StepOutcome(current, mode if current != mode else None, attempts, None, failure)
        attempt = _attempt(current, started_at, t0, exit_code=result.exit_code)
        attempts.append(attempt)
        if on_attempt:
            on_attempt(attempt)
        return StepOutcome(current, mode if current != mode else None, attempts, result, None)
    raise AssertionError("unreachable: the plan always ends in a return")


def _attempt(
    mode: RuntimeMode,
    started_at: datetime,
    t0: float,
    *,
    failure: RuntimeFailure | None = None,
    exit_code: int | None = None,
) -> Attempt:
    return Attempt(
        runtime_mode=mode,
        status="failed" if failure else "completed",
        started_at=started_at,
        ended_at=datetime.now(UTC),
        duration_ms=int((time.monotonic() - t0) * 1000),
        error_kind=failure.kind if failure else None,
        error_code=failure.code if failure else None,
        error=failure.message if failure else None,
        exit_code=failure.exit_code if failure else exit_code,
    )
