"""The store seam: what the orchestrator needs from a run history, whatever holds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..models import Run, RunPage, RunStatus, Worker


@dataclass(frozen=True)
class RunFilter:
    status: RunStatus | None = None
    strategy: str | None = None
    worker: str | None = None

    def matches(self, run: Run) -> bool:
        return (
            (self.status is None or run.status == self.status)
            and (self.strategy is None or run.strategy == self.strategy)
            and (self.worker is None or self.worker in run.workers)
        )


class RunStore(Protocol):
    """Blocking calls: the orchestrator runs them off the event loop."""

    def check_writable(self) -> None:
        """Raise StoreError (naming the path and the cause) if nothing could be stored now."""

    def list_workers(self) -> list[Worker]: ...

    def workers_if_current(self) -> list[Worker] | None:
        """The workers, answered at once without blocking (the one call safe on an event loop),
        or None when that cannot be done now: then call ``list_workers`` off the loop."""

    def get_worker(self, name: str) -> Worker | None: ...

    def add_worker(self, worker: Worker) -> None:
        """Add a worker; raises InvalidRequestError if the name is taken."""

    def remove_worker(self, name: str) -> Worker | None: ...

    def save_run(self, run: Run) -> None:
        """Insert or replace a run, atomically and durably."""

    def save_runs(self, runs: list[Run], *, durable: bool = True) -> None:
        """Several runs' new states, atomically and durably, in one write. ``durable=False``: they
        are intermediate states, and must survive the server's death but not a power cut (the
        next durable write may carry them to disk)."""

    def get_run(self, run_id: str) -> Run | None: ...

    def unfinished_runs(self) -> list[Run]:
        """Runs still queued or running (by this process or another)."""

    def prune(self, *, max_runs: int | None, max_age_days: float | None) -> list[str]:
        """Forget finished runs past the limits, with their outputs; returns their ids."""

    def list_runs(self, filter: RunFilter, limit: int, cursor: str | None) -> RunPage:
        """Runs newest first; ``cursor`` is the ``nextCursor`` of the previous page."""
